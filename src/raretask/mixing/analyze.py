"""`raretask analyze`: how often each task occurs in a dataset, and which ones are at risk.

Streams the rows once (:mod:`raretask.mixing.readers`), takes each row's task from a field or
from tagging rules (:mod:`raretask.mixing.rules`), and counts examples and tokens per task.
Tokens are whitespace-separated words of the text field (``--text-field``), the tokens of a
real tokenizer (``--tokenizer``: a tokenizers JSON file or an offline pretrained name,
:mod:`raretask.mixing.token_counts`), or the integer in ``--tokens-field`` when the data carries
its own token counts. Words differ from a tokenizer's tokens by a factor that varies by domain
(code and numbers split into many more tokens than prose), so plans in tokens for a real
training run should count with the model's tokenizer.

The rank-frequency curve (shares sorted descending against rank 1, 2, ...) is fitted by a power
law ``share ∝ rank^-beta`` (least squares on logs, ``scipy.stats.linregress``: beta, its standard
error, R^2): the paper's ``pi_k ∝ k^-beta``.

Example
-------
>>> import json, tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp()) / "data.jsonl"
>>> _ = d.write_text("".join(json.dumps({"task": t, "text": "a b"}) + "\\n"
...                          for t in ["x"] * 3 + ["y"]))
>>> a = analyze([d], task_field="task")
>>> [(t.task, t.count, t.share, t.tokens) for t in a.tasks]
[('x', 3, 0.75, 6), ('y', 1, 0.25, 2)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from raretask.errors import UserError
from raretask.mixing.readers import bad_field, check_task_names, field_names, read_records
from raretask.mixing.rules import RuleSet
from raretask.mixing.token_counts import BATCH, load_token_counter


@dataclass(frozen=True)
class TaskCount:
    """One task's totals; ``required_share``/``at_risk`` only when a size was given."""

    task: str
    rank: int
    count: int
    share: float
    tokens: int | None
    token_share: float | None
    required_share: float | None = None
    at_risk: bool | None = None


@dataclass(frozen=True)
class PowerLaw:
    """``share ≈ 10**intercept * rank**-exponent`` (least squares on log10)."""

    exponent: float
    stderr: float
    intercept: float
    r2: float
    points: int

    def share(self, rank: np.ndarray | float) -> np.ndarray:
        return 10 ** self.intercept * np.asarray(rank, float) ** -self.exponent


@dataclass(frozen=True)
class Analysis:
    """Counts per task (most frequent first), the fit, and what was skipped."""

    sources: tuple[str, ...]
    tagging: str
    examples: int
    tokens: int | None
    skipped: int
    tasks: tuple[TaskCount, ...]
    power_law: PowerLaw | None
    size: float | None = None
    threshold: str | None = None
    extra: dict = field(default_factory=dict)
    token_unit: str | None = None  # how tokens were counted (words, a field, a tokenizer)
    rows_without_text: int = 0  # rows lacking the text field: they add no tokens

    def to_json(self) -> dict:
        out = asdict(self)
        out["sources"] = list(self.sources)
        out["tasks"] = [asdict(t) for t in self.tasks]
        return out

    @classmethod
    def from_json(cls, data: dict, source: str = "analysis") -> Analysis:
        try:
            tasks = tuple(TaskCount(**t) for t in data["tasks"])
            pl = data.get("power_law")
            result = cls(
                sources=tuple(data.get("sources", ())), tagging=data.get("tagging", ""),
                examples=int(data["examples"]), tokens=data.get("tokens"),
                skipped=int(data.get("skipped", 0)), tasks=tasks,
                power_law=PowerLaw(**pl) if pl else None, size=data.get("size"),
                threshold=data.get("threshold"), extra=data.get("extra", {}),
                token_unit=data.get("token_unit"),
                rows_without_text=data.get("rows_without_text", 0),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{source}: not an analysis file written by raretask analyze "
                            f"({type(err).__name__}: {err})") from None
        _check_loaded(result, source)
        return result

    def names(self) -> list[str]:
        return [t.task for t in self.tasks]

    def shares(self) -> np.ndarray:
        return np.array([t.share for t in self.tasks])


MAX_COUNT = 2**53  # counts above this lose their last digits as floats: no real data has them


def _count_ok(v) -> bool:
    return type(v) is int and 0 <= v <= MAX_COUNT


def _share_ok(v) -> bool:
    return type(v) in (int, float) and 0 <= v <= 1  # NaN and inf fail both comparisons


def _check_loaded(a: Analysis, source: str) -> None:
    """An analysis read back must be one analyze could have written: every count an integer in
    range, shares in [0, 1], task names unique, token counts for every task or for none."""
    def bad(field: str, expected: str, got) -> UserError:
        return bad_field(source, field, expected, got)

    in_range = f"an integer from 0 to {MAX_COUNT:,}"
    for name in ("tagging", "token_unit", "threshold"):
        v = getattr(a, name)
        if not (isinstance(v, str) or (v is None and name != "tagging")):
            raise bad(name, "text", v)
    if not all(isinstance(x, str) for x in a.sources):
        raise bad("sources", "a list of file names", list(a.sources))
    if not isinstance(a.extra, dict):
        raise bad("extra", "a mapping", a.extra)
    if a.size is not None and not (type(a.size) in (int, float) and 0 < a.size < float("inf")):
        raise bad("size", "null or a finite number > 0", a.size)
    for name in ("examples", "skipped", "rows_without_text"):
        if not _count_ok(getattr(a, name)):
            raise bad(name, in_range, getattr(a, name))
    if a.tokens is not None and not _count_ok(a.tokens):
        raise bad("tokens", f"null or {in_range}", a.tokens)
    check_task_names([t.task for t in a.tasks], source)
    for i, t in enumerate(a.tasks):
        if not _count_ok(t.count):
            raise bad(f"tasks.{i}.count", in_range, t.count)
        if t.tokens is None and a.tokens is not None:
            raise UserError(f"{source}: tasks.{i}.tokens: null, but the analysis counts tokens "
                            f"(tokens: {a.tokens}); every task needs its token count")
        if t.tokens is not None and not _count_ok(t.tokens):
            raise bad(f"tasks.{i}.tokens", in_range, t.tokens)
        if t.tokens is not None and a.tokens is None:
            raise UserError(f"{source}: tokens: null, but tasks.{i}.tokens is {t.tokens}; give "
                            "the total or no task's tokens")
        if t.count == 0 and t.tokens:
            raise UserError(f"{source}: tasks.{i}: {t.tokens:,} tokens in 0 examples")
        for name in ("share", "token_share", "required_share"):
            v = getattr(t, name)
            if (v is not None or name == "share") and not _share_ok(v):
                raise bad(f"tasks.{i}.{name}", "a share from 0 to 1", v)
    # the totals are the tasks' sums (analyze writes them so); an edit of one alone is a mistake
    if not a.tasks:
        raise bad("tasks", "at least one task", [])
    counted = sum(t.count for t in a.tasks)
    if a.examples != counted:
        raise UserError(f"{source}: examples: {a.examples:,}, but the tasks' counts add up to "
                        f"{counted:,}")
    if a.tokens is not None and a.tokens != sum(t.tokens for t in a.tasks):
        raise UserError(f"{source}: tokens: {a.tokens:,}, but the tasks' tokens add up to "
                        f"{sum(t.tokens for t in a.tasks):,}")


def fit_power_law(shares: Sequence[float]) -> PowerLaw | None:
    """Fit ``log10 share = intercept - exponent * log10 rank`` over shares sorted descending.

    None with fewer than 3 tasks (a line through 2 points has no error estimate).
    """
    from scipy.stats import linregress

    s = np.sort(np.asarray(shares, float))[::-1]
    s = s[s > 0]
    if s.size < 3:
        return None
    x = np.log10(np.arange(1, s.size + 1))
    res = linregress(x, np.log10(s))
    if np.ptp(s) == 0:  # equal shares: an exact flat line (linregress leaves r2, stderr NaN)
        return PowerLaw(exponent=0.0, stderr=0.0, intercept=float(np.log10(s[0])), r2=1.0,
                        points=int(s.size))
    return PowerLaw(exponent=float(-res.slope), stderr=float(res.stderr),
                    intercept=float(res.intercept), r2=float(res.rvalue ** 2), points=int(s.size))


def _task_of(values: dict, task_field: str | None, tagger) -> tuple[str | None, str | None]:
    """(task, error) of one record."""
    if task_field is not None:
        v = values.get(task_field)
        if v is None:
            return None, f"field {task_field!r} is missing"
        if isinstance(v, bool) or not isinstance(v, str | int):
            return None, f"field {task_field!r} must be a string, got {type(v).__name__}"
        v = str(v).strip()
        if not v:
            return None, f"field {task_field!r} is empty"
        return v, None
    text = values.get(tagger.rules.field)
    if not isinstance(text, str):
        return None, f"field {tagger.rules.field!r} is missing or not text"
    task = tagger(text)
    if task is None:
        return None, "no rule matches and the rules give no default task"
    return task, None


def _tokens_of(values: dict, text_field: str, tokens_field: str | None) -> tuple[
        int | str | None, str | None]:
    """(the row's token count, or its text to count, or None without a text; error)."""
    if tokens_field is not None:
        v = values.get(tokens_field)
        try:
            n = int(v) if not isinstance(v, bool) else None
        except (TypeError, ValueError, OverflowError):
            n = None
        if n is None or n < 0 or n > MAX_COUNT or (isinstance(v, float) and v != n):
            return None, f"field {tokens_field!r} must be an integer >= 0, got {v!r}"
        return n, None
    text = values.get(text_field)
    if text is None:
        return None, None
    if not isinstance(text, str):
        return None, f"field {text_field!r} must be text, got {type(text).__name__}"
    return text, None


class _TokenTally:
    """Tokens per task, texts counted in batches by the token counter."""

    def __init__(self, counter) -> None:
        self.counter = counter
        self.tokens: dict[str, int] = {}
        self.pending: list[tuple[str, str]] = []

    def add(self, task: str, n: int | str) -> None:
        if isinstance(n, str):
            self.pending.append((task, n))
            if len(self.pending) >= BATCH:
                self.flush()
        else:
            self.tokens[task] = self.tokens.get(task, 0) + n

    def flush(self) -> dict[str, int]:
        if self.pending:
            counts = self.counter.count([text for _, text in self.pending])
            for (task, _), n in zip(self.pending, counts, strict=True):
                self.tokens[task] = self.tokens.get(task, 0) + n
            self.pending = []
        return self.tokens


def analyze(
    paths: Sequence[str | Path],
    task_field: str | None = None,
    rules: RuleSet | None = None,
    text_field: str | None = None,
    tokens_field: str | None = None,
    skip_bad: bool = False,
    tokenizer: str | Path | None = None,
) -> Analysis:
    """Count examples and tokens per task over every row of ``paths``.

    Parameters
    ----------
    paths:
        Files or save_to_disk directories (:func:`raretask.mixing.readers.dataset_files`).
    task_field:
        Field naming each row's task. Give this or ``rules``.
    rules:
        Tagging rules for untagged text.
    text_field:
        Field whose tokens are counted (default ``text``; rows without it add none, and are
        counted in ``rows_without_text``). Named explicitly, or with a ``tokenizer``, it must
        occur in some row.
    tokens_field:
        Integer field with each row's token count (instead of counting).
    skip_bad:
        Skip malformed rows and count them, instead of stopping at the first.
    tokenizer:
        A tokenizers JSON file or an offline pretrained name
        (:func:`raretask.mixing.token_counts.load_token_counter`); default whitespace words.

    Raises
    ------
    UserError
        A malformed row (naming file and line) unless ``skip_bad``; no rows at all; a named
        text field that no row has.
    """
    if (task_field is None) == (rules is None):
        raise UserError("--task-field: give either a task field or a rules file, not both "
                        "and not neither")
    if not paths:
        raise UserError("DATA: give at least one file or directory")
    if tokens_field is not None and (tokenizer is not None or text_field is not None):
        raise UserError("--tokens-field: the data's own token counts replace counting the "
                        "text; give it without --tokenizer and --text-field")
    must_have_text = text_field is not None or tokenizer is not None
    text_field = text_field or "text"
    counter = load_token_counter(tokenizer) if tokens_field is None else None
    tagger = rules.compile() if rules is not None else None
    fields = [task_field] if task_field is not None else [rules.field]
    fields += [tokens_field] if tokens_field is not None else [text_field]
    counts: dict[str, int] = {}
    tally = _TokenTally(counter)
    any_tokens = False
    skipped = without_text = 0
    for rec in read_records([Path(p) for p in paths], list(dict.fromkeys(fields))):
        err = rec.error
        task = ntok = None
        if err is None:
            task, err = _task_of(rec.values, task_field, tagger)
        if err is None:
            ntok, err = _tokens_of(rec.values, text_field, tokens_field)
        if err is not None:
            if not skip_bad:
                raise UserError(f"{rec.where}: {err} (--skip-bad skips such rows)")
            skipped += 1
            continue
        counts[task] = counts.get(task, 0) + 1
        if ntok is None:
            without_text += 1
        else:
            any_tokens = True
            tally.add(task, ntok)
    total = sum(counts.values())
    if total == 0:
        raise UserError(f"{', '.join(map(str, paths))}: no usable rows"
                        + (f" ({skipped} malformed skipped)" if skipped else ""))
    if not any_tokens and must_have_text:  # a mistyped field would silently count nothing
        seen = field_names(Path(paths[0]))
        raise UserError(f"--text-field {text_field!r}: no row of {paths[0]} has this field"
                        + (f" (its fields: {', '.join(seen[:12])})" if seen else ""))
    tokens = tally.flush()
    total_tokens = sum(tokens.values()) if any_tokens else None
    order = sorted(counts, key=lambda t: (-counts[t], t))
    rows = tuple(
        TaskCount(
            task=t, rank=i + 1, count=counts[t], share=counts[t] / total,
            tokens=tokens.get(t, 0) if any_tokens else None,
            token_share=(tokens.get(t, 0) / total_tokens if total_tokens else
                         (0.0 if any_tokens else None)),
        )
        for i, t in enumerate(order)
    )
    tagging = f"field {task_field!r}" if task_field is not None else \
        f"{len(rules.rules)} rules on field {rules.field!r}"
    unit = None
    if any_tokens:
        unit = f"field {tokens_field!r}" if tokens_field is not None else \
            f"{counter.name} of {text_field!r}"
    return Analysis(sources=tuple(str(p) for p in paths), tagging=tagging, examples=total,
                    tokens=total_tokens, skipped=skipped, tasks=rows,
                    power_law=fit_power_law([r.share for r in rows]), token_unit=unit,
                    rows_without_text=without_text if tokens_field is None else 0)


def mark_risk(analysis: Analysis, size: float, threshold) -> Analysis:
    """The analysis with each task's required share at ``size`` and whether it falls short.

    ``threshold`` is a :mod:`raretask.mixing.thresholds` model.
    """
    shares = analysis.shares()
    req = threshold.required(shares, size)
    rows = tuple(
        TaskCount(**{**asdict(t), "required_share": float(r), "at_risk": bool(t.share < r)})
        for t, r in zip(analysis.tasks, req, strict=True)
    )
    return Analysis(**{**{f: getattr(analysis, f) for f in analysis.__dataclass_fields__},
                       "tasks": rows, "size": float(size), "threshold": threshold.describe()})


def rank_frequency_plot(analysis: Analysis, path: Path) -> Path:
    """Log-log shares against rank, the power-law fit, tasks at risk in red; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raretask.runs import store

    ranks = np.array([t.rank for t in analysis.tasks])
    shares = analysis.shares()
    risk = np.array([bool(t.at_risk) for t in analysis.tasks])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(ranks[~risk], shares[~risk], "o", color="tab:blue", label="tasks")
    if risk.any():
        ax.loglog(ranks[risk], shares[risk], "o", color="tab:red",
                  label=f"at risk at size {analysis.size:g}")
    if analysis.power_law is not None:
        pl = analysis.power_law
        ax.loglog(ranks, pl.share(ranks), "-", color="gray",
                  label=f"fit: share ∝ rank^-{pl.exponent:.2f} (R² {pl.r2:.2f})")
    if any(t.required_share is not None for t in analysis.tasks):
        req = np.array([t.required_share for t in analysis.tasks])
        ax.loglog(ranks, req, "--", color="tab:red", lw=1, label="share needed")
    ax.set_xlabel("rank")
    ax.set_ylabel("share of examples")
    ax.set_title(f"{analysis.examples:,} examples, {len(ranks)} tasks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    store.write_bytes(Path(path), buf.getvalue())
    return Path(path)
