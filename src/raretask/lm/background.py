"""Background text for the language-model study: one config that builds tokens and streams.

The rare tasks (:mod:`raretask.lm.tasks`) are injected into a stream of ordinary text, the
*background*. :class:`BackgroundConfig` turns a corpus (:mod:`raretask.lm.corpus`: the embedded
KJV by default, or the user's text / JSONL / Parquet / ``.bin`` files) into batches of token
ids::

    >>> bg = BackgroundConfig(vocab_size=8192).build()      # KJV; trains + caches the BPE once
    >>> stream = bg.stream(batch_size=32, seq_len=128, seed=0)
    >>> x = next(stream)                                     # LongTensor [32, 129]
    >>> idx, targets = x[:, :-1], x[:, 1:]
    >>> stream.summary()["epochs"]                           # background epochs used so far

The parts, in the order :meth:`BackgroundConfig.build` uses them: the tokenizer and its cache
(:mod:`raretask.lm.tokenizer`), the held-out split (``val_fraction`` of the tokens at the
corpus's end, from a document boundary: :mod:`raretask.lm.tokens`; separate ``validation`` files
replace it), and the streams (:mod:`raretask.lm.stream`) over a source, corpus windows or an
n-gram model (:mod:`raretask.lm.ngram`).

Which source: ``"corpus"`` is real text, but a small corpus is recycled, and after a few epochs a
model starts to memorise the background, which changes what the study measures (capacity spent
on memorising the KJV is capacity the rare task cannot use; Dolma in the paper never repeats).
``"ngram"`` never repeats and keeps the corpus's unigram and local statistics, but has only
short-range structure to learn. The KJV is 0.94M tokens at vocab 8192, so the issue's 2,000 steps
of 256 x 128 tokens (65M) would be ~70 epochs of it: runs that long belong on ``"ngram"`` (a
frequency sweep must not be confounded by memorisation); ``"corpus"`` suits short runs (a few
epochs) and large user corpora. The run summary records which, and the epochs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from raretask.errors import UserError
from raretask.lm.corpus import TextCorpus, TokenDtype, TokenShards, default_dtype, resolve_files
from raretask.lm.ngram import NGramModel
from raretask.lm.stream import CorpusWindows, TokenStream
from raretask.lm.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EOD_TOKEN,
    cache_root,
    tokenise,
    train_tokenizer,
)
from raretask.lm.tokens import TokenArray, heldout_cut

Source = Literal["corpus", "ngram"]


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


__all__ = ["Background", "BackgroundConfig", "Source"]
