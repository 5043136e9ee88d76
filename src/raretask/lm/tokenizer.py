"""The background's tokenizer: a byte-level BPE trained once per corpus, and its token cache.

**Tokenizer.** Byte-level BPE trained locally with HF ``tokenizers`` (ByteLevel pre-tokenizer
with GPT-2's split pattern, no prefix space, no normalizer, ByteLevel decoder, all 256 bytes in
the initial alphabet): any UTF-8 text encodes without unknown tokens and ``decode(encode(text))
== text`` exactly. One special token, ``<|endoftext|>`` (EOD, id 0), appended after every
document; the literal string "<|endoftext|>" inside a document is encoded as ordinary text, never
as EOD. No padding token: batches are full windows, nothing is padded. ``vocab_size`` defaults to
8192 (:data:`DEFAULT_VOCAB_SIZE`): enough merges for whole common words of a few-MB corpus
while keeping the embedding and LM head small next to the 4M- and 20M-parameter presets (at
50,304 the head alone would dwarf them); pass the paper's 50,304 for the large presets. If the
corpus runs out of pairs to merge, the tokenizer has fewer ids than ``vocab_size``;
:attr:`~raretask.lm.background.Background.vocab_size` stays the requested size (the model's V),
the extra ids simply never occur in the background. The tokenizer is trained on the whole
corpus, held-out documents included (as GPT-2's was); the model never trains on them.

**Cache.** ``<cache>/tokenizers/<key>.json`` holds the tokenizer and ``<key>.bin`` the tokenised
corpus (flat token ids, uint16 if vocab_size <= 65,536 else uint32: nanoGPT's layout), where
``key`` hashes the corpus identity (its files' bytes, formats and text field:
:meth:`~raretask.lm.corpus.TextCorpus.identity`), ``vocab_size``, the recipe version
(:data:`TOKENIZER_RECIPE`) and the ``tokenizers`` version. ``<cache>`` is the ``cache_dir``
argument, else ``$RARETASK_CACHE``, else ``$XDG_CACHE_HOME/raretask``, else
``~/.cache/raretask``. Each file is written atomically (:func:`raretask.runs.store.open_atomic`)
under a lock on ``<file>.lock`` (:func:`raretask.runs.store.file_lock`), so that the ranks of one
host train once; the same corpus and vocab size give a byte-identical tokenizer file. Nothing is
downloaded, ever.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from raretask.errors import UserError
from raretask.lm.corpus import TextCorpus, TokenDtype
from raretask.runs import store

DEFAULT_VOCAB_SIZE = 8192
"""BPE vocabulary for the small presets (module docstring says why)."""
EOD_TOKEN = "<|endoftext|>"
"""The end-of-document token; id 0 of every tokenizer trained here."""
TOKENIZER_RECIPE = "raretask-bpe-1"
"""Bumped whenever the training recipe changes, so old cache entries are not reused."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$RARETASK_CACHE``, else ``$XDG_CACHE_HOME/raretask`` or ~/.cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("RARETASK_CACHE"):
        return Path(os.environ["RARETASK_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "raretask"


def _lock_of(path: Path) -> Path:
    """The lock file that guards building the cache file ``path``."""
    return path.with_name(path.name + ".lock")


def tokenizer_key(corpus: TextCorpus, vocab_size: int) -> str:
    """Cache key: the corpus identity, vocab size, recipe and ``tokenizers`` version (hex 16)."""
    import tokenizers

    blob = json.dumps(
        [corpus.identity(), vocab_size, TOKENIZER_RECIPE, tokenizers.__version__]
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_LONG_DOC_CHARS = 1 << 20
_BREAK = re.compile(r"(?<=\S)\n(?=\S)")


def _pieces(doc: str, max_chars: int = _LONG_DOC_CHARS) -> list[str]:
    """Split a long document after single newlines between non-space characters.

    GPT-2's split pattern makes such a newline a pre-token of its own, and BPE never merges across
    pre-tokens, so encoding the pieces and concatenating gives exactly the ids of the whole
    document, without holding millions of offsets at once.
    """
    if len(doc) <= max_chars:
        return [doc]
    out, start = [], 0
    for m in _BREAK.finditer(doc):
        if m.end() - start >= max_chars:
            out.append(doc[start : m.end()])
            start = m.end()
    out.append(doc[start:])
    return out


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not EOD
    return tok


def train_tokenizer(corpus: TextCorpus, vocab_size: int, cache_dir: str | Path | None = None):
    """The byte-level BPE of ``corpus`` with ``vocab_size`` ids, trained once and cached.

    Returns ``(tokenizer, path)``: an HF ``tokenizers.Tokenizer`` and its cached JSON file.
    Deterministic: the same corpus and vocab size give a byte-identical file.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise UserError(
            f"vocab_size must be >= 257 (256 bytes + EOD) to train a BPE, got {vocab_size}"
        )
    path = cache_root(cache_dir) / "tokenizers" / f"{tokenizer_key(corpus, vocab_size)}.json"
    with store.file_lock(_lock_of(path)):
        if not path.exists():
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=[EOD_TOKEN],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            docs = (piece for doc in corpus.documents() for piece in _pieces(doc))
            tok.train_from_iterator(docs, trainer)
            store.write_text(path, tok.to_str())
    tok = _load_tokenizer(path)
    if tok.token_to_id(EOD_TOKEN) != 0:  # pragma: no cover - a foreign file under our key
        raise UserError(f"{path}: cached tokenizer lacks {EOD_TOKEN} at id 0; delete the file")
    return tok, path


def tokenise(corpus: TextCorpus, tokenizer, path: Path, dtype: TokenDtype) -> np.ndarray:
    """Token ids of ``corpus`` (each document followed by EOD), cached at ``path`` (memmap).

    ``path`` is a flat array of ``dtype`` ids (nanoGPT layout), written atomically once, in
    batches of about 4M characters of documents.
    """
    eod = tokenizer.token_to_id(EOD_TOKEN)
    little = np.dtype(dtype).newbyteorder("<")
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    with store.file_lock(_lock_of(path)):
        if not path.exists():
            with store.open_atomic(path, "wb") as out:
                batch: list[str] = []
                last: list[bool] = []  # piece ends its document: EOD follows

                def flush() -> None:
                    encs = encode(batch, add_special_tokens=False)
                    ids = []
                    for enc, end in zip(encs, last, strict=True):
                        ids.append(np.asarray(enc.ids, dtype=dtype))
                        if end:
                            ids.append(np.array([eod], dtype=dtype))
                    out.write(np.concatenate(ids).astype(little).tobytes())
                    batch.clear()
                    last.clear()

                chars = 0
                for doc in corpus.documents():
                    pieces = _pieces(doc)
                    batch += pieces
                    last += [False] * (len(pieces) - 1) + [True]
                    chars += len(doc)
                    if chars >= 1 << 22:
                        flush()
                        chars = 0
                if batch:
                    flush()
    return np.memmap(path, dtype=little, mode="r")


__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "EOD_TOKEN",
    "TOKENIZER_RECIPE",
    "cache_root",
    "tokenise",
    "tokenizer_key",
    "train_tokenizer",
]
