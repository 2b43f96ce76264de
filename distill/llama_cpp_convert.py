"""Run llama.cpp's own ``convert_hf_to_gguf.py`` on an HF folder, in the process this file is started as.

    python distill/llama_cpp_convert.py CONVERTER_DIR SRC --outfile OUT.gguf --outtype f32 [--model-name NAME]

CONVERTER_DIR holds what the Makefile extracts from llama-cpp-python's sdist
(``distill/llama-cpp-converter.txt``): the script, its ``conversion/`` package and
the ``gguf-py`` it is written against. That ``gguf-py`` is newer than the ``gguf``
wheel of the same version number, so the converter runs in a process of its own
(``distill.export_gguf.write_gguf`` starts it) where its copy comes first on
sys.path and never meets the wheel the rest of the pipeline imports.

Two additions. llama.cpp names a BPE tokenizer's pre-tokenizer by hashing the ids of
a test string, which only the published tokenizers it lists pass. A tokenizer
trained here (the tests' tiny models) gets its name from the structure of its
``tokenizer.json`` instead, and only where that structure is exactly one llama.cpp
implements; anything else is refused as before. And llama.cpp takes every 6th Gemma 3
layer as global (full attention) unless the GGUF lists each layer's kind, which the
converter does not write; a depth student keeps its teacher layers' kinds (``layer_types``),
which that rule may not match, so the list is written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The Split regexes of published tokenizers, as their tokenizer.json holds them -> llama.cpp's name.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")
SPLITS = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}


def pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's name for this tokenizer.json's pre-tokenization, or None when it implements no such one."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return SPLITS.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def name_unlisted_tokenizers(text_model) -> None:
    """Fall back to the tokenizer.json's structure where llama.cpp's hash list has no entry."""
    by_hash = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return by_hash(self, tokenizer)
        except NotImplementedError:
            path = Path(self.dir_model) / "tokenizer.json"
            name = pre_tokenizer_name(json.loads(path.read_text(encoding="utf-8"))) if path.exists() else None
            if name is None:
                raise
            return name

    text_model.get_vocab_base_pre = get_vocab_base_pre


def write_layer_kinds(gemma3_model) -> None:
    """Each layer's attention kind in the GGUF, as llama.cpp reads it (sliding_window_pattern, one bool a layer)."""
    base = gemma3_model.set_gguf_parameters

    def set_gguf_parameters(self) -> None:
        base(self)
        kinds = self.hparams.get("layer_types")
        if kinds and self.hparams.get("sliding_window"):
            self.gguf_writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in kinds])

    gemma3_model.set_gguf_parameters = set_gguf_parameters


def main(argv: list[str]) -> None:
    converter, args = Path(argv[0]).resolve(), argv[1:]
    # Started as a script, this file's folder is sys.path[0]: distill's data.py, config.py... must not shadow anything.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    os.environ.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, never the wheel
    sys.path.insert(0, str(converter))
    import convert_hf_to_gguf  # puts converter/gguf-py on sys.path before it imports gguf
    from conversion import TextModel
    from conversion.gemma import Gemma3Model

    name_unlisted_tokenizers(TextModel)
    write_layer_kinds(Gemma3Model)
    sys.argv = [str(converter / "convert_hf_to_gguf.py"), *args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
