"""Tokenizers: UTF-8 bytes by default, or a ``tokenizer.json`` (Hugging Face ``tokenizers``)
saved next to the weights; :func:`train_bpe` trains a byte-level BPE for a training run.

Both kinds end each training document with an end-of-document id (``eos_id``) and report
``vocab_size`` (the model's embedding rows must be at least that many).
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hybrid.atomic import atomic_write

if TYPE_CHECKING:
    import tokenizers

EOS_TOKEN = "<|endoftext|>"
"""The end-of-document token of the BPE tokenizers trained here."""

EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
"""Names an end-of-document token has in a loaded ``tokenizer.json``, tried in this order."""


class Tokenizer(Protocol):
    """What generation and the data pipeline need from a tokenizer."""

    eos_id: int | None  # the end-of-document id (None: the tokenizer has none)
    vocab_size: int  # ids are in [0, vocab_size)

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decoder(self) -> StreamDecoder: ...

    def save(self, directory: str | Path) -> None: ...

    @property
    def fingerprint(self) -> str: ...


class StreamDecoder(Protocol):
    """Turns token ids into text as they arrive (a token may end mid-character)."""

    def feed(self, token: int) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255 and ``eos_id = 256`` (``vocab_size = 257``).

    The decoder drops ids above 255 (the end-of-document id, and any id of a larger model
    vocabulary), so generation prints only text.
    """

    eos_id: int = 256
    vocab_size: int = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` of each text."""
        return [list(text.encode("utf-8")) for text in texts]

    def decoder(self) -> StreamDecoder:
        return _ByteStreamDecoder()

    def save(self, directory: str | Path) -> None:
        """Nothing to write: :func:`load_tokenizer` returns bytes when there is no
        ``tokenizer.json``."""

    @property
    def fingerprint(self) -> str:
        """Identifies the mapping from text to ids (for caches of tokenized data)."""
        return "utf8-bytes+eos256"


class _ByteStreamDecoder:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(bytes([token])) if 0 <= token < 256 else ""


class HFTokenizer:
    """A ``tokenizers.Tokenizer``, read from a ``tokenizer.json`` path or given as an object.

    ``eos_id`` is the first of :data:`EOS_CANDIDATES` in its vocabulary, or None.
    """

    def __init__(self, source: str | Path | tokenizers.Tokenizer) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        if isinstance(source, (str, Path)):
            try:
                source = _Tokenizer.from_file(str(source))
            except Exception as error:  # the library raises a bare Exception on bad JSON
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise ValueError(f"{source}: not a tokenizers tokenizer.json ({message})") from None
        self._tokenizer = source
        self.vocab_size: int = source.get_vocab_size(with_added_tokens=True)
        ids = (source.token_to_id(token) for token in EOS_CANDIDATES)
        self.eos_id: int | None = next((i for i in ids if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text (in parallel), for training data: special-token strings inside
        the text (a literal ``<|endoftext|>``) are encoded as plain text, so document
        boundaries come only from the data pipeline."""
        self._tokenizer.encode_special_tokens = True
        try:
            return [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]
        finally:
            self._tokenizer.encode_special_tokens = False

    def decoder(self) -> StreamDecoder:
        return _PrefixStreamDecoder(self._tokenizer)

    def save(self, directory: str | Path) -> None:
        """Write ``directory/tokenizer.json`` atomically."""
        atomic_write(
            Path(directory) / "tokenizer.json",
            lambda temporary: self._tokenizer.save(str(temporary)),
        )

    @property
    def fingerprint(self) -> str:
        """A hash of the whole tokenizer (vocabulary, merges, pre-tokenizer)."""
        return hashlib.sha256(self._tokenizer.to_str().encode("utf-8")).hexdigest()


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


def train_bpe(texts: Iterable[str], vocab_size: int, max_bytes: int) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, all 256 byte
    symbols in the alphabet, :data:`EOS_TOKEN` as special token 0) on the first ``max_bytes``
    UTF-8 bytes of ``texts`` (the last text is cut to fit).

    The vocabulary is ``vocab_size`` tokens, or fewer when the text has too few distinct pairs
    to merge. Training is deterministic: the same texts give the same tokenizer.
    """
    from tokenizers import Tokenizer as _Tokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = _Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_first_bytes(texts, max_bytes), trainer)
    return HFTokenizer(tokenizer)


def _first_bytes(texts: Iterable[str], max_bytes: int) -> Iterable[str]:
    """The texts up to ``max_bytes`` UTF-8 bytes in all; the last one cut at a character."""
    remaining = max_bytes
    for text in texts:
        data = text.encode("utf-8")
        if len(data) >= remaining:
            yield data[:remaining].decode("utf-8", errors="ignore")
            return
        remaining -= len(data)
        yield text


def load_tokenizer(checkpoint: str | Path) -> Tokenizer:
    """The tokenizer that goes with a checkpoint: ``tokenizer.json`` in a model directory (or
    in a run directory's ``model/``), the one stored inside a ``hybrid train`` ``.ckpt`` file,
    else byte-level."""
    from hybrid.checkpoint import read_training_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    if path.is_file():
        text = read_training_checkpoint(path)["meta"].get("tokenizer_json")
        if text is None:
            return ByteTokenizer()
        import tokenizers

        try:
            return HFTokenizer(tokenizers.Tokenizer.from_str(text))
        except Exception as error:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"{path}: its stored tokenizer does not load ({error})") from None
    json_path = path / "tokenizer.json"
    return HFTokenizer(json_path) if json_path.is_file() else ByteTokenizer()
