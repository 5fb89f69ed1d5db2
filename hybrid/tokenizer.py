"""Tokenizers for generation from the command line: byte-level by default, or a
``tokenizer.json`` (Hugging Face ``tokenizers``) saved next to the weights."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    """What generation needs from a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decoder(self) -> StreamDecoder: ...


class StreamDecoder(Protocol):
    """Turns token ids into text as they arrive (a token may end mid-character)."""

    def feed(self, token: int) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; ids above 255 (if the vocabulary is larger) are dropped."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self) -> StreamDecoder:
        return _ByteStreamDecoder()


class _ByteStreamDecoder:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(bytes([token])) if 0 <= token < 256 else ""


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from ``tokenizer.json``."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tokenizer = _Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decoder(self) -> StreamDecoder:
        return _PrefixStreamDecoder(self._tokenizer)


class _PrefixStreamDecoder:
    """Decodes the growing id list and emits the new suffix (safe for byte-level BPE)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._text = ""

    def feed(self, token: int) -> str:
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return ""
        new, self._text = text[len(self._text) :], text
        return new


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in ``directory`` (``tokenizer.json``), else byte-level."""
    path = Path(directory) / "tokenizer.json"
    return HFTokenizer(path) if path.is_file() else ByteTokenizer()
