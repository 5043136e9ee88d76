"""Count a text's tokens: whitespace words (the default) or a real tokenizer, offline.

``--tokenizer`` takes

* a Hugging Face ``tokenizers`` JSON file (``tokenizer.json``; any model: BPE, WordPiece,
  Unigram, WordLevel), loaded with ``tokenizers.Tokenizer.from_file``;
* a directory written by ``save_pretrained``, or the name of a pretrained tokenizer already in
  the local Hugging Face cache: ``transformers.AutoTokenizer.from_pretrained(name,
  local_files_only=True)``. Nothing is downloaded; a name not available offline is one line.

Counts exclude special tokens (no BOS/EOS/CLS added: ``add_special_tokens=False``) and ignore any
truncation or padding saved in the tokenizer file, so a long document counts all its tokens.
Texts are encoded in batches (``encode_batch``, which the Rust library runs in parallel).

Example
-------
>>> words = load_token_counter(None)
>>> words.name, words.count(["a b  c", ""])
('whitespace words', [3, 0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from raretask.errors import UserError

BATCH = 1024  # texts per encode_batch call: large enough to use the threads, small in memory


@dataclass(frozen=True)
class TokenCounter:
    """``count(texts)`` returns each text's number of tokens; ``name`` says how they are counted."""

    name: str
    count: Callable[[Sequence[str]], list[int]]


def _words(texts: Sequence[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def _from_backend(tok) -> Callable[[Sequence[str]], list[int]]:
    """Counting with a ``tokenizers.Tokenizer`` (ours: its saved truncation/padding removed)."""
    tok.no_truncation()
    tok.no_padding()

    def count(texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    return count


def _tokenizer_file(path: Path) -> TokenCounter:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust loader raises a bare Exception with serde's message
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"--tokenizer {path}: not a Hugging Face tokenizers JSON file "
                        f"({reason})") from None
    kind = type(tok.model).__name__
    return TokenCounter(f"tokenizer {path.name} ({kind})", _from_backend(tok))


def _pretrained(spec: str) -> TokenCounter:
    import logging

    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        raise UserError(f"--tokenizer {spec!r}: pretrained names need the transformers "
                        "package") from None
    hf_logging.set_verbosity(logging.ERROR)  # its notes about missing optional files
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception as err:  # OSError, ValueError, KeyError... by file and transformers version
        what = "directory" if Path(spec).is_dir() else "name"
        raise UserError(f"--tokenizer {spec!r}: not a tokenizers JSON file, and no pretrained "
                        f"tokenizer of that {what} is available offline ({type(err).__name__}; "
                        "give a tokenizer.json path, or a name already in the Hugging Face "
                        "cache)") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return TokenCounter(f"tokenizer {spec} ({type(backend.model).__name__})",
                            _from_backend(backend))

    def count(texts: Sequence[str]) -> list[int]:  # a slow (Python) tokenizer
        return [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]

    return TokenCounter(f"tokenizer {spec} ({type(tok).__name__})", count)


def load_token_counter(spec: str | Path | None) -> TokenCounter:
    """Whitespace words for None, else the tokenizer named by ``spec`` (see the module doc)."""
    if spec is None:
        return TokenCounter("whitespace words", _words)
    path = Path(spec)
    if path.is_file():
        return _tokenizer_file(path)
    if str(spec).lower().endswith(".json"):
        raise UserError(f"--tokenizer {spec}: no such file")
    return _pretrained(str(spec))
