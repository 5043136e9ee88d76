"""Background text for the language-model study: tokenizer, token cache, held-out split, streams.

The rare tasks (:mod:`raretask.lm.tasks`) are injected into a stream of ordinary text, the
*background*. This module turns a corpus (:mod:`raretask.lm.corpus`: the embedded KJV by default,
or the user's text / JSONL / Parquet / ``.bin`` files) into batches of token ids::

    >>> bg = BackgroundConfig(vocab_size=8192).build()      # KJV; trains + caches the BPE once
    >>> stream = bg.stream(batch_size=32, seq_len=128, seed=0)
    >>> x = next(stream)                                     # LongTensor [32, 129]
    >>> idx, targets = x[:, :-1], x[:, 1:]
    >>> stream.summary()["epochs"]                           # background epochs used so far

**Tokenizer.** Byte-level BPE trained locally with HF ``tokenizers`` (ByteLevel pre-tokenizer
with GPT-2's split pattern, no prefix space, no normalizer, ByteLevel decoder, all 256 bytes in
the initial alphabet): any UTF-8 text encodes without unknown tokens and ``decode(encode(text))
== text`` exactly. One special token, ``<|endoftext|>`` (EOD, id 0), appended after every
document; the literal string "<|endoftext|>" inside a document is encoded as ordinary text, never
as EOD. No padding token: batches are full windows, nothing is padded. ``vocab_size`` defaults to
8192 (:data:`DEFAULT_VOCAB_SIZE`): enough merges for whole common words of a few-MB corpus
while keeping the embedding and LM head small
next to the 4M- and 20M-parameter presets (at 50,304 the head alone would dwarf them); pass the
paper's 50,304 for the large presets. If the corpus runs out of pairs to merge, the tokenizer
has fewer ids than ``vocab_size``; :attr:`Background.vocab_size` stays the requested size (the
model's V), the extra ids simply never occur in the background. The tokenizer is trained on the
whole corpus, held-out documents included (as GPT-2's was); the model never trains on them.

**Cache.** ``<cache>/tokenizers/<key>.json`` holds the tokenizer and ``<key>.bin`` the tokenised
corpus (flat token ids, uint16 if vocab_size <= 65,536 else uint32: nanoGPT's layout), where
``key`` hashes the corpus identity (its files' bytes, formats and text field:
:meth:`~raretask.lm.corpus.TextCorpus.identity`), ``vocab_size``, this module's recipe version
and the ``tokenizers`` version. ``<cache>`` is the ``cache_dir`` argument, else
``$RARETASK_CACHE``, else ``$XDG_CACHE_HOME/raretask``, else ``~/.cache/raretask``. Files are
written to a temporary name and renamed (``os.replace``), under an ``flock`` so that the ranks of
one host train once; the same corpus and vocab size give a byte-identical tokenizer file. Nothing
is downloaded, ever.

**Held-out tokens.** ``val_fraction`` (default 0.01) of the corpus tokens, taken from its end and
starting at a document boundary (the first document that starts in the last 1%; if the last
document is longer than that, the cut falls inside it). Training windows come only from the part
before the cut; :meth:`Background.validation_batches` reads only the part after it. Separate
``validation`` files replace the held-out slice.

**Streams** (:class:`TokenStream`, from :meth:`Background.stream`). ``source`` picks the text:

* ``"corpus"``: windows of T+1 tokens at uniformly random offsets of the training tokens, drawn
  with replacement (nanoGPT's sampler). Real text, but a small corpus is recycled: the stream
  reports ``epochs`` = tokens served / training tokens, and after a few epochs a model starts to
  memorise the background, which changes what the study measures (capacity spent on memorising
  the KJV is capacity the rare task cannot use; Dolma in the paper never repeats).
* ``"ngram"``: rows sampled from an interpolated n-gram model (order 3 by default, Witten-Bell
  backoff to lower orders) fitted to the training tokens (:class:`NGramModel`). It never repeats
  (each row is a fresh chain with its own randomness) and keeps the corpus's unigram and local
  statistics, but it is not language beyond a few tokens: the background loss floors at the
  n-gram's entropy and a model has only short-range structure to learn from it. Use it when the
  token budget is many epochs of the corpus; ``epochs`` is then reported against the training
  tokens too, as a size comparison (no text repeats).

Which to use: the KJV is 0.94M tokens at vocab 8192, so the issue's 2,000 steps of 256 x 128
tokens (65M) would be ~70 epochs of it. Runs that long belong on ``"ngram"`` (the paper's Dolma
never repeats, and a frequency sweep must not be confounded by memorisation); ``"corpus"`` suits
short runs (a few epochs) and large user corpora. The run summary records which, and the epochs.

Measured on a 2-core CPU (tokenizers 0.23, numpy 2.4): the KJV's BPE at 8192 trains in 1.0 s and
tokenises in 1.2 s (944,714 tokens incl. 1,189 EODs; 4.4 characters per token); a cached build
loads in 0.02 s. The n-gram (order 3) fits in 0.2 s (with its lookup tables) and samples
5-10M tokens/s (KJV at vocab 4096 / 8192, batches of 32-256 rows of 128-512 tokens, 4,096 rows
per call looking steps ahead; 1.4-2.4M before the tables replaced two binary searches per
token); corpus windows are served at 4-50M tokens/s. With ``prefetch`` (on when a grid cell
trains on a GPU) the stream samples the next chunk in a background thread while the trainer
trains on the current one.

Each row of step ``s`` draws its randomness from a hash of (seed, s, global row index) alone,
so a batch is a pure function of the step (resuming needs only the step: :meth:`TokenStream.
state_dict`) and of the **global** batch: with ``world_size`` ranks of ``batch_size`` rows each,
the global batch has ``batch_size * world_size`` rows and rank r gets the contiguous rows
``r * batch_size .. (r + 1) * batch_size - 1``; the concatenation over ranks (all_gather order)
equals the one-process batch of ``batch_size * world_size`` rows, whatever the world size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from raretask.errors import UserError
from raretask.lm.corpus import TextCorpus, TokenDtype, TokenShards, default_dtype, resolve_files

DEFAULT_VOCAB_SIZE = 8192
"""BPE vocabulary for the small presets (module docstring says why)."""
EOD_TOKEN = "<|endoftext|>"
"""The end-of-document token; id 0 of every tokenizer trained here."""
TOKENIZER_RECIPE = "raretask-bpe-1"
"""Bumped whenever the training recipe changes, so old cache entries are not reused."""

Source = Literal["corpus", "ngram"]


# -- cache --------------------------------------------------------------------------------------
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$RARETASK_CACHE``, else ``$XDG_CACHE_HOME/raretask`` or ~/.cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("RARETASK_CACHE"):
        return Path(os.environ["RARETASK_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "raretask"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path.lock`` (where fcntl exists) while building ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: atomic renames still keep files whole
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def tokenizer_key(corpus: TextCorpus, vocab_size: int) -> str:
    """Cache key: the corpus identity, vocab size, recipe and ``tokenizers`` version (hex 16)."""
    import tokenizers

    blob = json.dumps(
        [corpus.identity(), vocab_size, TOKENIZER_RECIPE, tokenizers.__version__]
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- tokenizer ----------------------------------------------------------------------------------
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
    with _locked(path):
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
            with _atomic(path) as tmp:
                tmp.write_text(tok.to_str(), encoding="utf-8")
    tok = _load_tokenizer(path)
    if tok.token_to_id(EOD_TOKEN) != 0:  # pragma: no cover - a foreign file under our key
        raise UserError(f"{path}: cached tokenizer lacks {EOD_TOKEN} at id 0; delete the file")
    return tok, path


def tokenise(corpus: TextCorpus, tokenizer, path: Path, dtype: TokenDtype) -> np.ndarray:
    """Token ids of ``corpus`` (each document followed by EOD), cached at ``path`` (memmap).

    ``path`` is a flat array of ``dtype`` ids (nanoGPT layout), written atomically once.
    """
    eod = tokenizer.token_to_id(EOD_TOKEN)
    little = np.dtype(dtype).newbyteorder("<")
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    with _locked(path):
        if not path.exists():
            with _atomic(path) as tmp, open(tmp, "wb") as out:
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


# -- token arrays -------------------------------------------------------------------------------
class TokenArray:
    """A read-only sequence of token ids held as pieces (memmapped shards or slices of them).

    Windows never cross a piece boundary (shards are separate documents streams).
    """

    def __init__(self, pieces: list[np.ndarray]):
        self.pieces = [p for p in pieces if len(p)]
        self._lengths = np.array([len(p) for p in self.pieces], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._lengths)])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def slice(self, lo: int, hi: int) -> TokenArray:
        """Tokens ``lo .. hi - 1`` of the concatenation, as views (no copy)."""
        out = []
        for p, start in zip(self.pieces, self._offsets[:-1], strict=False):
            a, b = max(lo - start, 0), min(hi - start, len(p))
            if a < b:
                out.append(p[a:b])
        return TokenArray(out)

    def find(self, value: int, start: int, chunk: int = 1 << 22) -> int | None:
        """Index of the first ``value`` at or after ``start`` (None if there is none)."""
        for p, off in zip(self.pieces, self._offsets[:-1], strict=False):
            for lo in range(max(start - off, 0), len(p), chunk):
                hits = np.flatnonzero(p[lo : lo + chunk] == value)
                if len(hits):
                    return int(off + lo + hits[0])
        return None

    def window_count(self, length: int) -> int:
        """How many windows of ``length`` tokens fit inside pieces."""
        return int(np.maximum(self._lengths - length + 1, 0).sum())

    def windows(self, index: np.ndarray, length: int) -> np.ndarray:
        """Windows number ``index`` (0 .. window_count - 1, any order) as int64 [M, length]."""
        counts = np.maximum(self._lengths - length + 1, 0)
        ends = np.cumsum(counts)
        piece = np.searchsorted(ends, index, side="right")
        start = index - (ends[piece] - counts[piece])
        out = np.empty((len(index), length), dtype=np.int64)
        ar = np.arange(length)
        for i in np.unique(piece):
            rows = np.flatnonzero(piece == i)
            out[rows] = self.pieces[i][start[rows, None] + ar]
        return out

    def to_numpy(self, max_tokens: int | None = None, block: int = 1 << 20) -> np.ndarray:
        """The tokens as one int64 array; if longer than ``max_tokens``, evenly spaced blocks."""
        n = len(self)
        if max_tokens is None or n <= max_tokens:
            return np.concatenate([p.astype(np.int64) for p in self.pieces])
        block = min(block, max_tokens)
        starts = np.linspace(0, n - block, max_tokens // block).astype(np.int64)
        parts = []
        for s in starts:
            parts += [p.astype(np.int64) for p in self.slice(int(s), int(s) + block).pieces]
        return np.concatenate(parts)


def heldout_cut(tokens: TokenArray, fraction: float, eod_id: int | None) -> int:
    """Where the training part ends: the first document start in the last ``fraction``.

    Falls back to the exact token position when no document starts there (or no EOD is known).
    """
    n = len(tokens)
    if fraction == 0:
        return n
    target = int(n * (1 - fraction))
    found = tokens.find(eod_id, max(target - 1, 0)) if eod_id is not None else None
    cut = found + 1 if found is not None and found + 1 < n else target
    if not 0 < cut < n:
        raise UserError(f"the corpus has {n} tokens, too few to hold out val_fraction={fraction}")
    return cut


# -- randomness: a counter-based hash, so any row of any step is computed on its own ------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_keys(seed: int, step: int, rows: np.ndarray) -> np.ndarray:
    """uint64 key of each global row of step ``step``: the only randomness a row uses."""
    k = _mix(np.array([seed], dtype=np.uint64))
    k = _mix(k ^ np.uint64(step))
    return _mix(k ^ np.asarray(rows, dtype=np.uint64))


def _uniforms(keys: np.ndarray, n: int) -> np.ndarray:
    """[M, n] float64 uniforms in [0, 1): draw j of row m hashes (keys[m], j)."""
    z = keys[:, None] + np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN
    return (_mix(z) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _uniforms_by_draw(keys: np.ndarray, n: int) -> np.ndarray:
    """``_uniforms(keys, n).T``, computed in that layout: [n, M] (row j: draw j of every row)."""
    z = keys[None, :] + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[:, None]
    return (_mix(z) >> np.uint64(11)).astype(np.float64) * 2.0**-53


# -- sources ------------------------------------------------------------------------------------
class CorpusWindows:
    """Source ``"corpus"``: the window at a uniformly random offset of the training tokens."""

    name = "corpus"
    rows_per_call = 1  # gathering windows costs nothing per call: no lookahead

    def __init__(self, tokens: TokenArray):
        self.tokens = tokens

    def rows(self, keys: np.ndarray, length: int) -> np.ndarray:
        n = self.tokens.window_count(length)
        if n == 0:
            raise UserError(
                f"the training corpus ({len(self.tokens)} tokens) is shorter than one window "
                f"of {length} tokens"
            )
        return self.tokens.windows((keys % np.uint64(n)).astype(np.int64), length)


class NGramModel:
    """Source ``"ngram"``: an interpolated n-gram model of token ids that samples fresh rows.

    P(w | h) = lam(h) P_ML(w | h) + (1 - lam(h)) P(w | h'), h' = h without its oldest token, down
    to the unigram, with Witten-Bell weights lam(h) = N(h) / (N(h) + U(h)) (N: times h was seen,
    U: distinct tokens after it; lam = 0 for an unseen h). A row starts from the n-1 tokens before
    a random position of the fitted tokens (so starts follow the corpus) and continues the chain;
    only ids seen in the corpus are ever emitted. Sampling is vectorised over rows (one numpy
    pass per position), with integer cumulative counts, so it is exact and deterministic; lookup
    tables (:meth:`_lookup_tables`) replace its binary searches without changing a row.

    Example::

        >>> ng = NGramModel(vocab_size=8192, order=3).fit(tokens)
        >>> ng.sample(n_rows=4, length=129, seed=0).shape
        (4, 129)
    """

    name = "ngram"
    table_max_entries = 1 << 25
    """:meth:`rows`' lookup tables (:meth:`_lookup_tables`: 4 bytes per counted n-gram
    occurrence, ~order x fitted tokens, plus 8 per distinct n-gram and context length > 1; the
    KJV at order 3 counts 3.0M, 134 MB at the cap) are built when the counts total at most this
    many; else :meth:`rows` searches (same rows, 3-6x slower)."""
    rows_per_call = 4096
    """The stream samples whole steps ahead until it has this many rows per call: the numpy
    overhead of a position is paid once for all of them."""

    def __init__(self, vocab_size: int, order: int = 3):
        self.vocab_size = vocab_size
        self.order = order

    def fit(self, tokens: np.ndarray) -> NGramModel:
        """Count every k-gram (k = 1 .. order) of ``tokens``; returns self."""
        v, k_max = self.vocab_size, self.order - 1
        if self.order < 1:
            raise UserError(f"ngram_order must be >= 1, got {self.order}")
        if v**self.order >= 2**63:
            raise UserError(f"ngram_order {self.order} is too high for vocab_size {v} (int64 keys)")
        x = np.asarray(tokens, dtype=np.int64)
        n = len(x)
        if n <= self.order:
            raise UserError(f"{n} tokens are too few to fit an order-{self.order} n-gram model")
        uni = np.bincount(x, minlength=v)
        nz = np.flatnonzero(uni)
        counts, nexts, first, totals = [uni[nz]], [nz], [np.array([0])], [np.array([n])]
        grams = []  # per level k >= 1: the sorted (k+1)-gram keys, one per entry
        entries = len(nz)
        self._levels = []  # per context length k: (sorted context keys, lam, first segment id)
        n_segments = 1
        for k in range(1, k_max + 1):
            ctx = np.zeros(n - k, dtype=np.int64)
            for j in range(1, k + 1):
                ctx += x[k - j : n - j] * v ** (j - 1)
            pairs, c = np.unique(ctx * v + x[k:], return_counts=True)
            keys, start = np.unique(pairs // v, return_index=True)
            tot = np.add.reduceat(c, start)
            types = np.diff(np.append(start, len(pairs)))
            self._levels.append((keys, tot / (tot + types), n_segments))
            counts.append(c)
            grams.append(pairs)
            nexts.append(pairs % v)
            first.append(entries + start)
            totals.append(tot)
            entries += len(pairs)
            n_segments += len(keys)
        counts_all = np.concatenate(counts)
        self._cum = np.cumsum(counts_all)
        self._next = np.concatenate(nexts)
        self._seg_base = (self._cum - counts_all)[np.concatenate(first)]
        self._seg_total = np.concatenate(totals)
        self._tokens = x
        if k_max >= 1:  # the bigram level as dense [V] tables
            keys1, lam1, seg0 = self._levels[0]
            self._lam1 = np.zeros(v)
            self._lam1[keys1] = lam1
            self._seg1 = np.zeros(v, dtype=np.int64)
            self._seg1[keys1] = seg0 + np.arange(len(keys1))
        self._tables = None
        if int(self._cum[-1]) <= self.table_max_entries:
            self._tables = self._lookup_tables(counts_all, [nz, *grams])
        return self

    def _lookup_tables(self, counts_all: np.ndarray, grams: list[np.ndarray]) -> dict:
        """Tables that replace :meth:`rows`' two binary searches per position (same results).

        * ``entry[c]``: the entry (index of ``_next``) whose cumulative range holds count ``c``,
          i.e. ``searchsorted(_cum, c, side="right")`` for every c (``np.repeat``);
        * ``after[k][e]``: after emitting entry ``e`` of level L (context of L tokens), the index
          in ``keys_k`` of the row's new k-token context, which is the last k tokens of e's
          (L+1)-gram when L + 1 >= k: ``len(keys_k)`` if that context was never seen, -1 when
          L + 1 < k (then the row looks its context up: :meth:`_find`);
        * ``lam[k]``: ``lam_k`` with a 0 appended for "never seen".
        """
        v, k_max = self.vocab_size, self.order - 1
        entry = np.repeat(np.arange(len(counts_all), dtype=np.int32), counts_all)
        bounds = np.cumsum([0] + [len(g) for g in grams])  # entries of level L: bounds[L]..
        after, lam = {}, {}
        for k in range(2, k_max + 1):
            keys_k, lam_k, _ = self._levels[k - 1]
            nxt = np.full(len(counts_all), -1, dtype=np.int64)
            for level in range(k - 1, k_max + 1):
                nxt[bounds[level] : bounds[level + 1]] = self._find(k, grams[level] % v**k)
            after[k] = nxt
            lam[k] = np.append(lam_k, 0.0)
        return {"entry": entry, "after": after, "lam": lam}

    def _find(self, k: int, ctx: np.ndarray) -> np.ndarray:
        """Index of each k-token context in ``keys_k``, ``len(keys_k)`` where it is absent."""
        keys_k = self._levels[k - 1][0]
        i = np.minimum(np.searchsorted(keys_k, ctx), len(keys_k) - 1)
        return np.where(keys_k[i] == ctx, i, len(keys_k))

    def rows(self, keys: np.ndarray, length: int) -> np.ndarray:
        """One fresh row of ``length`` tokens per key (uint64, :func:`row_keys`): [M, length].

        Uses the lookup tables when the model has them (``table_max_entries``), else
        :meth:`rows_search`; both give exactly the same rows.
        """
        if self._tables is None:
            return self.rows_search(keys, length)
        v, k_max = self.vocab_size, self.order - 1
        m = len(keys)
        tables = self._tables
        entry, after, lam_of = tables["entry"], tables["after"], tables["lam"]
        ctx = self._start_contexts(keys)  # ctx[k]: last k tokens
        where = {k: self._find(k, ctx[k]) for k in range(2, k_max + 1)}  # index in keys_k
        u = _uniforms_by_draw(keys, 2 * length)  # [2 length, M]: row 2t picks, 2t + 1 draws
        out = np.empty((length, m), dtype=np.int64)
        for t in range(length):
            pick, draw = u[2 * t], u[2 * t + 1]
            lams, segs = [], []  # as rows_search: longest context first
            for k in range(k_max, 0, -1):
                if k == 1:
                    lams.append(self._lam1[ctx[1]])
                    segs.append(self._seg1[ctx[1]])
                    continue
                lams.append(lam_of[k][where[k]])  # 0 where the context was never seen
                segs.append(self._levels[k - 1][2] + where[k])  # unused where lam is 0
            seg = _choose_segment(lams, segs, pick)
            total = self._seg_total[seg]
            offset = np.minimum((draw * total).astype(np.int64), total - 1)
            e = entry[self._seg_base[seg] + offset]
            tok = self._next[e]
            out[t] = tok
            for k in range(k_max, 0, -1):
                ctx[k] = tok + v * (ctx[k] % v ** (k - 1)) if k > 1 else tok
            for k in range(2, k_max + 1):
                where[k] = after[k][e]
                miss = np.flatnonzero(where[k] < 0)  # emitted from a context shorter than k - 1
                if len(miss):
                    where[k][miss] = self._find(k, ctx[k][miss])
        return np.ascontiguousarray(out.T)

    def _start_contexts(self, keys: np.ndarray) -> list[np.ndarray]:
        """ctx[k] = the k corpus tokens before each row's seeded start, as one base-V integer."""
        v, k_max, x = self.vocab_size, self.order - 1, self._tokens
        pos = (_mix(keys ^ np.uint64(0x5EED)) % np.uint64(len(x) - k_max)).astype(np.int64) + k_max
        ctx = [np.zeros(len(keys), dtype=np.int64) for _ in range(k_max + 1)]
        for k in range(1, k_max + 1):
            for j in range(1, k + 1):
                ctx[k] += x[pos - j] * v ** (j - 1)
        return ctx

    def rows_search(self, keys: np.ndarray, length: int) -> np.ndarray:
        """:meth:`rows` with binary searches instead of tables (the reference; no extra memory)."""
        v, k_max = self.vocab_size, self.order - 1
        m = len(keys)
        ctx = self._start_contexts(keys)  # ctx[k]: last k tokens
        u = _uniforms(keys, 2 * length).reshape(m, length, 2)
        out = np.empty((m, length), dtype=np.int64)
        for t in range(length):
            pick, draw = u[:, t, 0], u[:, t, 1]
            # lam and segment of every level, longest context first; ctx[1] is a token id, so
            # the bigram level is a dense lookup, longer contexts a binary search
            lams, segs = [], []
            for k in range(k_max, 0, -1):
                if k == 1:
                    lams.append(self._lam1[ctx[1]])
                    segs.append(self._seg1[ctx[1]])
                    continue
                keys_k, lam_k, seg0 = self._levels[k - 1]
                i = np.minimum(np.searchsorted(keys_k, ctx[k]), len(keys_k) - 1)
                lams.append(lam_k[i] * (keys_k[i] == ctx[k]))
                segs.append(seg0 + i)
            seg = _choose_segment(lams, segs, pick)
            total = self._seg_total[seg]
            offset = np.minimum((draw * total).astype(np.int64), total - 1)
            tok = self._next[np.searchsorted(self._cum, self._seg_base[seg] + offset, side="right")]
            out[:, t] = tok
            for k in range(k_max, 0, -1):
                ctx[k] = tok + v * (ctx[k] % v ** (k - 1)) if k > 1 else tok
        return out

    def sample(self, n_rows: int, length: int, seed: int = 0) -> np.ndarray:
        """``n_rows`` fresh rows of ``length`` tokens (rows of step 0 of a stream with ``seed``)."""
        return self.rows(row_keys(seed, 0, np.arange(n_rows)), length)


def _choose_segment(lams: list[np.ndarray], segs: list[np.ndarray],
                    pick: np.ndarray) -> np.ndarray:
    """The segment each row draws from, given every level's lam and segment (longest first).

    Level k is used with probability lam_k * prod_{j > k} (1 - lam_j): the highest level whose
    cumulative weight exceeds ``pick`` wins; the unigram (segment 0) takes the rest.
    """
    seg = np.zeros(len(pick), dtype=np.int64)
    cum, rest, thresholds = 0.0, 1.0, []
    for lam in lams:
        cum = cum + rest * lam
        rest = rest * (1.0 - lam)
        thresholds.append(cum)
    for lam_seg, threshold in zip(segs[::-1], thresholds[::-1], strict=True):
        seg = np.where(pick < threshold, lam_seg, seg)  # lower levels first, then override
    return seg


_AHEAD = 1 << 22
"""At most this many tokens per chunk of steps sampled at once (the stream holds the chunk being
served and, with prefetch, the next one)."""


# -- the stream ---------------------------------------------------------------------------------
class TokenStream:
    """Endless batches of background tokens for one rank: LongTensor [batch_size, seq_len + 1].

    Parameters
    ----------
    source : :class:`CorpusWindows` or a fitted :class:`NGramModel`.
    batch_size : rows per rank (B); the global batch has ``batch_size * world_size`` rows.
    seq_len : T; each row has T + 1 tokens (inputs ``x[:, :-1]``, targets ``x[:, 1:]``).
    seed : fixes every batch (module docstring: a batch is a pure function of seed and step).
    rank, world_size : this rank's rows are ``rank * B .. (rank + 1) * B - 1`` of the global batch.
    corpus_tokens : training tokens of the corpus, the denominator of :attr:`epochs`.
    prefetch : sample the next chunk of steps in a background thread while the current one is
        served, so that a GPU trainer's host thread does not wait for the sampler (off by
        default: on a CPU with no idle core the thread only competes with training). Numbers do
        not depend on it: a chunk is a pure function of its steps, and :meth:`state_dict` holds
        only the step of the next batch :meth:`next_batch` returns, never how far the thread
        has sampled.

    Example::

        >>> stream = bg.stream(batch_size=8, seq_len=64, seed=0)
        >>> x = next(stream); state = stream.state_dict()
        >>> y = next(stream); stream.load_state_dict(state); bool((next(stream) == y).all())
        True
    """

    def __init__(
        self,
        source: CorpusWindows | NGramModel,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        corpus_tokens: int = 0,
        prefetch: bool = False,
    ):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside 0 .. world_size - 1 = {world_size - 1}")
        self.source = source
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.corpus_tokens = corpus_tokens
        self.prefetch = prefetch
        self.step = 0
        self._ahead: tuple[int, Tensor] = (0, torch.empty(0))
        self._pending: tuple[int, Future] | None = None  # (first step, chunk being sampled)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _rows(self, steps: range, rows: np.ndarray) -> Tensor:
        """Rows ``rows`` of each step in ``steps``: [len(steps), len(rows), T + 1]."""
        if steps.start < 0:
            raise UserError(f"step must be >= 0, got {steps.start}")
        keys = np.concatenate([row_keys(self.seed, s, rows) for s in steps])
        out = self.source.rows(keys, self.seq_len + 1)
        return torch.from_numpy(out.reshape(len(steps), len(rows), self.seq_len + 1))

    def _chunk(self, first: int) -> Tensor:
        """This rank's rows of the steps ``first ..`` that one call to the source samples."""
        row_tokens = self.batch_size * (self.seq_len + 1)
        n_steps = max(1, min(self.source.rows_per_call // self.batch_size, _AHEAD // row_tokens))
        lo = self.rank * self.batch_size
        return self._rows(range(first, first + n_steps), np.arange(lo, lo + self.batch_size))

    def batch(self, step: int) -> Tensor:
        """This rank's rows of step ``step`` (does not move the stream).

        Sources with ``rows_per_call`` > batch_size sample the following steps in the same call
        and keep them; with ``prefetch`` the chunk after that is sampled in the background. A
        batch depends on (seed, step, row) only, so neither changes a number.
        """
        first, ahead = self._ahead
        if not first <= step < first + len(ahead):
            pending, self._pending = self._pending, None
            if pending is not None and pending[0] == step:
                ahead = pending[1].result()  # the thread's chunk (re-raises its error)
            else:  # first call, resume, or a jump: sample here; a stale chunk is dropped
                ahead = self._chunk(step)
            first = step
            self._ahead = first, ahead
            if self.prefetch:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="raretask-stream")
                nxt = first + len(ahead)
                self._pending = nxt, self._pool.submit(self._chunk, nxt)
        return ahead[step - first].clone()

    def close(self) -> None:
        """Stop the prefetch thread (it also ends when the stream is garbage-collected)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._pending = None, None

    def global_batch(self, step: int) -> Tensor:
        """All ``batch_size * world_size`` rows of step ``step``, in rank order."""
        return self._rows(range(step, step + 1), np.arange(self.global_batch_size))[0]

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Tensor:
        x = self.batch(self.step)
        self.step += 1
        return x

    def next_batch(self) -> Tensor:
        """This rank's rows of the current step, then advance (the trainer's BatchSource)."""
        return next(self)

    @property
    def tokens_served(self) -> int:
        """Training tokens served so far by all ranks: steps * global batch * seq_len (targets)."""
        return self.step * self.global_batch_size * self.seq_len

    @property
    def epochs(self) -> float:
        """tokens_served / training tokens of the corpus (see the module docstring for ngram)."""
        return self.tokens_served / self.corpus_tokens if self.corpus_tokens else 0.0

    def summary(self) -> dict[str, Any]:
        """What a run summary records about its background."""
        name = self.source.name
        if isinstance(self.source, NGramModel):
            name = f"ngram (order {self.source.order})"
        return {
            "background_source": name,
            "background_tokens": self.tokens_served,
            "corpus_tokens": self.corpus_tokens,
            "epochs": self.epochs,
            "repeats": isinstance(self.source, CorpusWindows) and self.epochs > 0,
        }

    def _identity(self) -> dict[str, Any]:
        order = getattr(self.source, "order", None)
        return {
            "source": self.source.name if order is None else f"ngram:{order}",
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "corpus_tokens": self.corpus_tokens,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: the step, plus what must match on resume."""
        return {"step": self.step, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; world size may differ, the global batch may not."""
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise UserError(
                    f"cannot resume the background stream: saved {key} {state.get(key)!r}, "
                    f"this run has {value!r}"
                )
        self.step = int(state["step"])


# -- config and the built background ------------------------------------------------------------
class BackgroundConfig(BaseModel):
    """Which background text, how it is tokenised and held out, and which stream; ``build()``.

    Example::

        >>> bg = BackgroundConfig(vocab_size=512).build()        # the KJV, a tiny BPE
        >>> bg.describe()["val_tokens"] > 0
        True
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: list[str] = Field(
        default_factory=list,
        description="Files or directories (text, JSONL, Parquet, or .bin shards); "
        "empty or ['kjv'] = the embedded King James Bible.",
    )
    text_field: str = Field("text", description="JSONL field / Parquet column holding the text.")
    vocab_size: int = Field(
        DEFAULT_VOCAB_SIZE, gt=0, description="BPE size to train; for .bin, the shards' vocabulary."
    )
    val_fraction: float = Field(
        0.01, ge=0, lt=0.5, description="Share of corpus tokens held out at its end for validation."
    )
    validation: list[str] = Field(
        default_factory=list, description="Separate validation files; replace the held-out slice."
    )
    source: Source = Field("corpus", description="'corpus': real windows; 'ngram': fresh text.")
    ngram_order: int = Field(3, ge=1, le=5, description="Order of the n-gram source.")
    ngram_max_tokens: int = Field(
        20_000_000, gt=0, description="Fit the n-gram on at most this many training tokens."
    )
    token_dtype: TokenDtype | None = Field(
        None, description=".bin dtype; default uint16 if vocab_size <= 65536 else uint32."
    )
    eod_id: int | None = Field(
        None, ge=0, description=".bin corpora only: the end-of-document id of their tokenizer."
    )
    cache_dir: str | None = Field(None, description="Cache root; default $RARETASK_CACHE etc.")

    def build(self) -> Background:
        """Train/load the tokenizer, tokenise/load the corpus, split off validation tokens."""
        root = cache_root(self.cache_dir)
        builtin = self.corpus in ([], ["kjv"])
        files = None if builtin else resolve_files(self.corpus)
        if files is None or files[0].kind != "bin":
            corpus = TextCorpus(tuple(files), self.text_field) if files else TextCorpus.kjv()
            if self.eod_id is not None:
                raise UserError("eod_id is for .bin corpora; a trained tokenizer's EOD is id 0")
            tok, tok_path = train_tokenizer(corpus, self.vocab_size, root)
            eod = tok.token_to_id(EOD_TOKEN)
            dtype = default_dtype(self.vocab_size)
            full = TokenArray([tokenise(corpus, tok, tok_path.with_suffix(".bin"), dtype)])
            name = corpus.name

            def load_validation() -> TokenArray:
                val = TextCorpus.from_paths(self.validation, self.text_field)
                key = hashlib.sha256(val.identity().encode()).hexdigest()[:16]
                return TokenArray(
                    [tokenise(val, tok, tok_path.with_suffix(f".val-{key}.bin"), dtype)]
                )

        else:
            if self.eod_id is None:
                raise UserError(
                    "a pre-tokenised corpus needs eod_id (its tokenizer's end-of-text id, "
                    "e.g. 50256 for GPT-2)"
                )
            if self.eod_id >= self.vocab_size:
                raise UserError(f"eod_id {self.eod_id} >= vocab_size {self.vocab_size}")
            dtype = self.token_dtype or default_dtype(self.vocab_size)
            shards = TokenShards(tuple(files), dtype)
            tok, tok_path, eod, name = None, None, self.eod_id, shards.name
            full = TokenArray(shards.arrays(self.vocab_size))

            def load_validation() -> TokenArray:
                return TokenArray(
                    TokenShards.from_paths(self.validation, dtype).arrays(self.vocab_size)
                )

        if self.validation:
            train, val = full, load_validation()
        else:
            cut = heldout_cut(full, self.val_fraction, eod)
            train, val = full.slice(0, cut), full.slice(cut, len(full))
        return Background(self, train, val, self.vocab_size, eod, tok, tok_path, name)


@dataclass
class Background:
    """A tokenised corpus split into training and validation tokens; makes streams.

    Built by :meth:`BackgroundConfig.build`. ``tokenizer`` is None for pre-tokenised corpora.
    """

    config: BackgroundConfig
    train: TokenArray
    val: TokenArray
    vocab_size: int
    eod_id: int
    tokenizer: Any = None
    tokenizer_path: Path | None = None
    corpus_name: str = ""
    _ngrams: dict[tuple[int, int], NGramModel] = field(default_factory=dict, repr=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOD added)."""
        return self._tok().encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of ``ids``; EOD shows as "<|endoftext|>"."""
        return self._tok().decode(list(map(int, ids)), skip_special_tokens=False)

    def _tok(self):
        if self.tokenizer is None:
            raise UserError("a pre-tokenised corpus has no tokenizer to encode or decode with")
        return self.tokenizer

    def ngram(self, order: int | None = None) -> NGramModel:
        """The n-gram model of the training tokens (fitted on first use, then kept)."""
        order = order or self.config.ngram_order
        key = (order, self.config.ngram_max_tokens)
        if key not in self._ngrams:
            tokens = self.train.to_numpy(self.config.ngram_max_tokens)
            self._ngrams[key] = NGramModel(self.vocab_size, order).fit(tokens)
        return self._ngrams[key]

    def stream(
        self,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        source: Source | None = None,
        prefetch: bool = False,
    ) -> TokenStream:
        """Training batches from ``source`` (default: the config's) for one rank
        (``prefetch``: :class:`TokenStream`)."""
        source = source or self.config.source
        if source not in ("corpus", "ngram"):
            raise UserError(f"background source must be 'corpus' or 'ngram', got {source!r}")
        src = CorpusWindows(self.train) if source == "corpus" else self.ngram()
        return TokenStream(src, batch_size, seq_len, seed, rank, world_size, len(self.train),
                           prefetch)

    def validation_batches(
        self, seq_len: int, batch_size: int, max_tokens: int | None = None
    ) -> Iterator[Tensor]:
        """Held-out windows of T + 1 tokens at stride T, in order: LongTensors [<= B, T + 1].

        Every validation token after the first of each window is a target exactly once; stops
        after ``max_tokens`` targets (rounded down to whole windows) if given.
        """
        length = seq_len + 1
        n = self.val.window_count(length)
        if n == 0:
            raise UserError(
                f"the validation tokens ({len(self.val)}) are fewer than one window of "
                f"{length}; raise val_fraction or lower seq_len"
            )
        index = []
        counts = np.maximum(self.val._lengths - length + 1, 0)
        for count, before in zip(counts, np.cumsum(counts) - counts, strict=True):
            index.append(before + np.arange(0, count, seq_len))
        index = np.concatenate(index)
        if max_tokens is not None:
            index = index[: max(max_tokens // seq_len, 1)]
        for lo in range(0, len(index), batch_size):
            yield torch.from_numpy(self.val.windows(index[lo : lo + batch_size], length))

    def describe(self) -> dict[str, Any]:
        """Corpus name, token counts, vocabulary, EOD and tokenizer file (for run summaries)."""
        return {
            "corpus": self.corpus_name,
            "train_tokens": len(self.train),
            "val_tokens": len(self.val),
            "vocab_size": self.vocab_size,
            "tokenizer_ids": self.tokenizer.get_vocab_size() if self.tokenizer else None,
            "eod_id": self.eod_id,
            "tokenizer": str(self.tokenizer_path) if self.tokenizer_path else None,
        }


__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "EOD_TOKEN",
    "Background",
    "BackgroundConfig",
    "CorpusWindows",
    "NGramModel",
    "TokenArray",
    "TokenStream",
    "cache_root",
    "heldout_cut",
    "row_keys",
    "tokenise",
    "train_tokenizer",
]
