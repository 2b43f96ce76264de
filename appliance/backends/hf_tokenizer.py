"""A Hugging Face ``tokenizer.json`` served without transformers: ids, token bytes, special tokens.

The generation loop joins raw token bytes itself (so a character split
across tokens is never emitted broken), hence every id must map to the exact
bytes it stands for. Two vocabulary styles exist:
byte-level BPE (GPT-2, Llama 3, SmolLM: each byte written as a printable
stand-in character) and SentencePiece (Llama 2, Gemma: "▁" for a space and
``<0xNN>`` tokens for raw bytes). Text is encoded with or without parsing
control-token text: a user's ``<|im_start|>`` must stay the characters it is.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(spec: dict) -> bool:
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


class HfTokenizer:
    def __init__(self, folder: Path):
        path = Path(folder) / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(path))
        # A second copy that reads special-token text as plain text, rather than one
        # flag flipped around each call: tokenizing may run on another thread than the step loop.
        self._plain = Tokenizer.from_file(str(path))
        self._plain.encode_special_tokens = True
        spec = json.loads(path.read_text(encoding="utf-8"))
        self.special_ids = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        # Added (non-special) tokens are stored as plain text even in byte-level vocabularies.
        self._plain_added_ids = {t["id"] for t in spec.get("added_tokens", []) if not t.get("special")}
        self._bytes = self._token_byte_table(_is_byte_level(spec))
        self.added_bos = self._added_bos()

    def _token_byte_table(self, byte_level: bool) -> list[bytes]:
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        table = []
        for token_id in range(size):
            piece = self.tokenizer.id_to_token(token_id)
            if piece is None or token_id in self.special_ids:
                table.append(b"")  # control tokens print nothing, as in llama.cpp
            elif byte_level and token_id not in self._plain_added_ids:
                table.append(bytes(_unicode_to_byte().get(c, 0x3F) for c in piece))
            else:
                table.append(_sentencepiece_bytes(piece))
        return table

    def _added_bos(self) -> int | None:
        """The id the post-processor puts first when asked to add special tokens, if any."""
        with_special = self.tokenizer.encode("a", add_special_tokens=True).ids
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        return with_special[0] if with_special and with_special[:1] != plain[:1] else None

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of text; ``parse_special`` False keeps control-token text such as ``<|im_start|>`` plain."""
        tokenizer = self.tokenizer if parse_special else self._plain
        return tokenizer.encode(text, add_special_tokens=add_special).ids

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)


def _sentencepiece_bytes(piece: str) -> bytes:
    match = _BYTE_TOKEN.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")
