"""Distillation pipeline on CPU with a tiny random Llama teacher and a tokenizer trained here.

Nothing is downloaded and nothing is committed: the tokenizer is trained on a
corpus generated from a fixed seed (the same on every machine), the teacher is a
random 4-layer Llama.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers, decoders  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from distill.cli import distill  # noqa: E402
from tests.distill_helpers import one_torch_thread  # noqa: E402,F401  (autouse: one torch thread per test)
from distill.config import ConfigError, DistillConfig, load_config  # noqa: E402
from distill.data import expand_sources, load_blocks  # noqa: E402
from distill.losses import distill_loss, kd_kl  # noqa: E402
from distill.pipeline import run_train, save_student  # noqa: E402
from distill.student import build_student, count_params  # noqa: E402
from distill.teacher import load_teacher, load_tokenizer  # noqa: E402

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


# Plant-log sentences: structure a tiny model learns quickly, the same text on every machine and Python.
SUBJECTS = ["the pump", "a valve", "the sensor", "an operator", "the controller", "the motor", "line seven", "the boiler"]
VERBS = ["checks", "starts", "stops", "reads", "cools", "reports", "resets", "measures"]
OBJECTS = ["the pressure", "the flow", "a temperature", "the belt", "the filter", "an alarm", "the tank", "the speed"]
TAILS = ["at noon.", "before the shift ends.", "every ten minutes.", "after the alarm.", "twice an hour.", "on request."]


def synthetic_corpus(dest: Path, n_files: int = 40, sentences: int = 120) -> Path:
    """Text generated from a fixed seed: random.Random.random() is the one sequence Python promises to keep."""
    import random

    rng = random.Random(1234)

    def pick(words):
        return words[int(rng.random() * len(words))]

    dest.mkdir(parents=True)
    for i in range(n_files):
        lines = [f"Log {i:02d}, unit {int(rng.random() * 90) + 10}."]
        lines += [f"{pick(SUBJECTS).capitalize()} {pick(VERBS)} {pick(OBJECTS)} {pick(TAILS)}" for _ in range(sentences)]
        (dest / f"log_{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return dest



@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(teacher folder, corpus folder): a random 4-layer Llama with a BPE tokenizer trained on the corpus."""
    root = tmp_path_factory.mktemp("tiny")
    corpus = synthetic_corpus(root / "corpus")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(p) for p in sorted(corpus.iterdir())], trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<unk>")
    hf_tok.chat_template = CHAT_TEMPLATE
    teacher_dir = root / "teacher"
    config = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(teacher_dir)
    hf_tok.save_pretrained(teacher_dir)
    return teacher_dir, corpus


def tiny_cfg(tiny, tmp_path, **kw) -> DistillConfig:
    teacher_dir, corpus = tiny
    base = dict(
        teacher=str(teacher_dir), data=[str(corpus)], out_dir=str(tmp_path / "run"), block_size=64, batch_size=4,
        max_steps=6, warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_every=0, checkpoint_every=0, log_every=1,
        val_fraction=0.1, eval_batches=2,
    )
    base.update(kw)
    return DistillConfig(**base).validate()


# --- losses ----------------------------------------------------------------------


def test_kl_is_zero_when_student_is_the_teacher(tiny):
    teacher = load_teacher(str(tiny[0]))
    student = copy.deepcopy(teacher)
    x = torch.randint(0, teacher.config.vocab_size, (2, 32))
    loss, parts = distill_loss(student(x), teacher(x), x, alpha=1.0, temperature=2.0)
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # and it is not zero for a different model: the test can fail
        student.model.layers[0].mlp.up_proj.weight.mul_(3.0)
    assert distill_loss(student(x), teacher(x), x, 1.0, 2.0)[1]["kl"] > 1e-4


def test_kl_matches_its_definition():
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    T = 1.7
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * T**2
    assert kd_kl(s, t, T).item() == pytest.approx(expected.item(), rel=1e-5)


# --- students ---------------------------------------------------------------------


def test_depth_student_keeps_chosen_layers_and_loads_in_transformers(tiny, tmp_path):
    teacher = load_teacher(str(tiny[0]))
    cfg = tiny_cfg(tiny, tmp_path, keep_every=2)
    student, keep = build_student(teacher, cfg)
    assert keep == [0, 3]  # every 2nd of 4, the last swapped in for layer 2
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert torch.equal(student.model.layers[1].mlp.down_proj.weight, teacher.model.layers[3].mlp.down_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    s, t = count_params(student), count_params(teacher)
    assert s["layers"] == t["layers"] // 2 and s["other"] == t["other"]

    folder = tmp_path / "student"
    save_student(student, load_tokenizer(str(tiny[0])), folder)
    assert (folder / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.config.num_hidden_layers == 2
    x = torch.randint(0, teacher.config.vocab_size, (1, 16))
    torch.testing.assert_close(loaded(x).logits, student(x).logits)
    tok = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_explicit_layer_list(tiny, tmp_path):
    teacher = load_teacher(str(tiny[0]))
    student, keep = build_student(teacher, tiny_cfg(tiny, tmp_path, keep_layers=[1, 2, 3]))
    assert keep == [1, 2, 3] and len(student.model.layers) == 3
    with pytest.raises(ConfigError):
        build_student(teacher, tiny_cfg(tiny, tmp_path, keep_layers=[3, 1]))


@pytest.mark.parametrize("init", ["prune", "fresh"])
def test_width_student_is_narrower_and_runs(tiny, tmp_path, init):
    teacher = load_teacher(str(tiny[0]))
    cfg = tiny_cfg(tiny, tmp_path, student="width", hidden_size=32, intermediate_size=64, width_init=init)
    student, _ = build_student(teacher, cfg)
    assert student.config.hidden_size == 32 and student.model.layers[0].mlp.up_proj.weight.shape == (64, 32)
    assert count_params(student)["total"] < count_params(teacher)["total"]
    x = torch.randint(0, teacher.config.vocab_size, (1, 8))
    assert torch.isfinite(student(x).logits).all()
    if init == "prune":  # kept channels carry the teacher's values
        kept = student.model.embed_tokens.weight[0]
        assert all(torch.isclose(teacher.model.embed_tokens.weight[0], v).any() for v in kept)


# --- config -------------------------------------------------------------------------


def test_config_precedence_defaults_file_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[loss]\nalpha = 0.5\ntemperature = 3\n[optim]\nmax_steps = 7\n')
    cfg = load_config(path, {"max_steps": 9, "lr": None})
    assert (cfg.alpha, cfg.temperature, cfg.max_steps, cfg.lr) == (0.5, 3.0, 9, DistillConfig().lr)
    path.write_text("alpah = 0.5\n")
    with pytest.raises(ConfigError, match="alpah"):
        load_config(path)
    with pytest.raises(ConfigError, match="alpha"):
        load_config(None, {"alpha": 1.5})


def test_shipped_configs_load():
    for path in sorted(Path(__file__).parent.parent.joinpath("distill", "configs").glob("*.toml")):
        assert load_config(path).max_steps > 0


# --- data -----------------------------------------------------------------------------


def test_blocks_are_packed_and_split_by_document(tiny, tmp_path):
    cfg = tiny_cfg(tiny, tmp_path)
    blocks = load_blocks(cfg, load_tokenizer(cfg.teacher))
    assert blocks["train"].shape[1] == cfg.block_size and len(blocks["train"]) > len(blocks["val"]) > 0
    meta = json.loads((cfg.out / "data" / "blocks.json").read_text())
    assert meta["tokens"]["train"] == blocks["train"].size
    cached = load_blocks(cfg, load_tokenizer(cfg.teacher))  # second call reads the cache
    assert np.array_equal(cached["val"], blocks["val"])


def test_each_source_keeps_its_own_held_out_blocks(tiny, tmp_path):
    # Real text and teacher-generated text are scored apart: val0 and val1 hold each source's held-out documents.
    texts = [p.read_text() for p in sorted(tiny[1].iterdir())]
    generated = tmp_path / "generated.jsonl"
    generated.write_text("".join(json.dumps({"text": t[::-1]}) + "\n" for t in texts))
    cfg = tiny_cfg(tiny, tmp_path, data=[str(tiny[1]), str(generated)], val_fraction=0.3, block_size=32)
    blocks = load_blocks(cfg, load_tokenizer(cfg.teacher))
    assert len(blocks["val0"]) > 0 and len(blocks["val1"]) > 0
    assert len(blocks["val"]) - 1 <= len(blocks["val0"]) + len(blocks["val1"]) <= len(blocks["val"])  # packing remainders
    assert not any(np.array_equal(row, other) for row in blocks["val1"] for other in blocks["val0"])
    cached = load_blocks(cfg, load_tokenizer(cfg.teacher))
    assert set(cached) == {"train", "val", "val0", "val1"} and np.array_equal(cached["val1"], blocks["val1"])


def test_split_is_the_same_wherever_the_corpus_lives(tiny, tmp_path):
    # The split hashes names relative to the data source: two absolute folders, one split.
    tokenizer = load_tokenizer(str(tiny[0]))
    blocks = []
    for where in ("a", "elsewhere/much/deeper"):
        corpus = tmp_path / where / "corpus"
        shutil.copytree(tiny[1], corpus)
        blocks.append(load_blocks(tiny_cfg(tiny, tmp_path / where, data=[str(corpus)]), tokenizer))
    for split in ("train", "val"):
        assert len(blocks[0][split]) > 0 and np.array_equal(blocks[0][split], blocks[1][split]), split


def test_documents_are_named_relative_to_their_source(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    for name in ("a.txt", "sub/b.md"):
        (tmp_path / "data" / name).write_text("x")
    by_folder = expand_sources([str(tmp_path / "data")])
    by_glob = expand_sources([str(tmp_path / "data" / "**" / "*.md")])
    by_file = expand_sources([str(tmp_path / "data" / "sub" / "b.md")])
    assert [name for _, name in by_folder] == ["a.txt", "sub/b.md"]
    assert [name for _, name in by_glob] == ["sub/b.md"] and [name for _, name in by_file] == ["b.md"]


# --- training --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.0, 0.0])  # pure distillation, and the CE-only baseline
def test_loss_falls(tiny, tmp_path, alpha):
    # 48 steps: 24 once fell only 2%, when the split still hashed absolute paths and so changed with
    # pytest's temporary folder (starting losses 7.30 vs 7.57 between runs).
    cfg = tiny_cfg(tiny, tmp_path, max_steps=48, alpha=alpha, eval_every=24, block_size=32, lr=3e-3)
    report = run_train(cfg)
    log = report["runs"]["student"]["train_log"]
    first, last = np.mean([e["loss"] for e in log[:4]]), np.mean([e["loss"] for e in log[-4:]])
    assert last < 0.95 * first, (first, last)
    assert report["metrics"]["student"]["ppl"] < report["runs"]["student"]["eval_log"][0]["val_ppl"] * 1.5


@pytest.mark.slow
def test_resume_reaches_the_same_state(tiny, tmp_path):
    cfg = tiny_cfg(tiny, tmp_path, max_steps=6, checkpoint_every=3, block_size=32)
    run_train(cfg)
    ckpts = sorted((cfg.out / "checkpoints" / "student").glob("step_*.pt"))
    assert [p.name for p in ckpts] == ["step_0000003.pt", "step_0000006.pt"]
    straight = torch.load(ckpts[-1], weights_only=False)
    # A second run folder that stopped after step 3: same data cache, no step-6 checkpoint.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(cfg.out, resumed_dir)
    (resumed_dir / "checkpoints" / "student" / ckpts[-1].name).unlink()
    shutil.rmtree(resumed_dir / "student")
    run_train(tiny_cfg(tiny, tmp_path, max_steps=6, checkpoint_every=3, block_size=32, out_dir=str(resumed_dir)), resume=True)
    again = torch.load(resumed_dir / "checkpoints" / "student" / ckpts[-1].name, weights_only=False)
    assert again["state"]["step"] == 6 and again["config"]["max_steps"] == 6
    for key, tensor in straight["model"].items():
        torch.testing.assert_close(again["model"][key], tensor, rtol=0, atol=0, msg=key)
    assert [e["loss"] for e in again["state"]["train_log"]] == [e["loss"] for e in straight["state"]["train_log"]]
    # and the checkpoint's own weights differ from step 3's: the resumed run really trained
    step3 = torch.load(ckpts[0], weights_only=False)
    assert not torch.equal(step3["model"]["model.norm.weight"], again["model"]["model.norm.weight"])


@pytest.mark.slow
def test_cli_train_with_baseline_writes_report_and_student(tiny, tmp_path):
    teacher_dir, corpus = tiny
    out = tmp_path / "cli"
    config = tmp_path / "tiny.toml"
    config.write_text(
        f'teacher = "{teacher_dir}"\ndata = ["{corpus}"]\nout_dir = "{out}"\nblock_size = 64\nbatch_size = 4\n'
        "max_steps = 8\nwarmup_steps = 2\neval_every = 4\ncheckpoint_every = 0\nval_fraction = 0.1\neval_batches = 2\n"
    )
    result = CliRunner().invoke(distill, ["train", "--config", str(config), "--baseline", "--max-steps", "6", "--seed", "3", "--block-size", "32"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["max_steps"] == 6 and report["config"]["seed"] == 3
    assert set(report["metrics"]) == {"teacher", "student", "baseline"}
    assert 0.0 <= report["metrics"]["student"]["agreement"] <= 1.0
    assert "kl" in report["runs"]["student"]["train_log"][0] and "kl" not in report["runs"]["baseline"]["train_log"][0]
    assert report["runs"]["baseline"]["steps"] == report["runs"]["student"]["steps"] == 6
    assert (out / "report.png").stat().st_size > 10_000 and "| baseline |" in (out / "report.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(out / "student").config.num_hidden_layers == 2

    assert report["metrics_by_source"] == {}  # one source: the held-out set is that source's

    result = CliRunner().invoke(distill, ["eval", "--config", str(config), "--block-size", "32"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    again = json.loads((out / "report.json").read_text())
    assert again["metrics"]["student"]["ppl"] == pytest.approx(report["metrics"]["student"]["ppl"], rel=1e-4)


def test_generate_samples_chat_formatted_texts(tiny, tmp_path):
    out = tmp_path / "gen"
    args = ["generate", "--teacher", str(tiny[0]), "--out-dir", str(out), "--generate-n", "3", "--gen-max-new-tokens", "8", "--gen-batch-size", "2"]
    result = CliRunner().invoke(distill, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    records = [json.loads(line) for line in (out / "data" / "generated.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["text"].startswith("<|im_start|>user\n") for r in records)
    assert all(len(r["text"]) > len(r["prompt"]) + 30 for r in records)


def test_a_problem_found_while_running_is_a_one_line_error(tiny, tmp_path):
    one_file = tmp_path / "one"
    one_file.mkdir()
    shutil.copy(next(tiny[1].iterdir()), one_file)
    args = ["train", "--teacher", str(tiny[0]), "--data", json.dumps([str(one_file)]), "--out-dir", str(tmp_path / "run"),
            "--block-size", "64", "--max-steps", "1"]
    result = CliRunner().invoke(distill, args)
    assert result.exit_code == 1 and "data too small" in result.output, result.output + repr(result.exception)
    assert isinstance(result.exception, SystemExit)  # handled by click, not a traceback


def test_help_lists_every_setting():
    result = CliRunner().invoke(distill, ["train", "--help"])
    assert result.exit_code == 0
    for name in ("--alpha", "--temperature", "--keep-every", "--hidden-weight", "--grad-accum", "--resume", "--baseline"):
        assert name in result.output


def test_hidden_cosine_term_is_zero_for_the_teacher_and_mapped_by_layer(tiny, tmp_path):
    teacher = load_teacher(str(tiny[0]))
    x = torch.randint(0, teacher.config.vocab_size, (2, 16))
    t_out = teacher(x, output_hidden_states=True)
    same = distill_loss(teacher(x, output_hidden_states=True), t_out, x, 0.5, 1.0, hidden_weight=1.0, layer_map=[0, 1, 2, 3])
    assert same[1]["cos"] == pytest.approx(0.0, abs=1e-5)
    student, keep = build_student(teacher, tiny_cfg(tiny, tmp_path, keep_layers=[0, 3]))
    s_out = student(x, output_hidden_states=True)
    # layer 0 is copied, so only the jump from layer 0 to teacher layer 3 costs anything
    assert distill_loss(s_out, t_out, x, 0.5, 1.0, hidden_weight=1.0, layer_map=keep)[1]["cos"] > 1e-4
    assert distill_loss(s_out, t_out, x, 0.5, 1.0, hidden_weight=1.0, layer_map=[0])[1]["cos"] == pytest.approx(0.0, abs=1e-5)
