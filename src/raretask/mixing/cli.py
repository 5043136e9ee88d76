"""The fix's commands (`analyze`, `calibrate`, `plan`, `fix`), registered on the main app.

Each command validates everything and computes its whole result before it prints or writes
anything, so a user error (exit 2, one ``error:`` line) never leaves partial output.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from raretask.errors import UserError
from raretask.lm.verdict import LEARNED_ACCURACY

console = Console()


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3g}%"


def _threshold(names, size, calibration, curve, alpha, features, spectra=None,
               unit="examples", budget=None, tokens_per_example=None):
    """Theorem 3, or the calibrated law converted to shares of ``unit``; ``budget`` is the
    training budget in the law's unit (None: the one budget the law saw, else refused)."""
    import math

    from raretask.mixing.calibrate import load_calibration
    from raretask.mixing.thresholds import LawThreshold, TheoryThreshold

    if not (math.isfinite(size) and size > 0):
        raise UserError(f"--size must be a finite number > 0, got {size}")

    if calibration is not None:
        cal = load_calibration(calibration)
        law = cal.law(curve, "--curve")
        per_instance = cal.units.tokens_per_instance
        if per_instance is not None and tokens_per_example is None:  # refuse before asking more
            LawThreshold(law, per_instance, unit, 1.0, None, label=calibration.name)
        budget = law.budget(budget, "--budget", cal.units.budget)
        return LawThreshold(law, per_instance, unit, budget, tokens_per_example,
                            label=calibration.name)
    return TheoryThreshold(names, spectra=spectra, alpha=alpha, features=features)


Size = Annotated[float | None, typer.Option(
    "--size", "-N", help="Model size: the theory's width N, or the calibration's size unit.")]
Calib = Annotated[Path | None, typer.Option(help="Calibration file from `raretask calibrate`.")]
Curve = Annotated[str | None, typer.Option(
    help="Task of the calibration whose law stands for every task (default: its fitted one).")]
Alpha = Annotated[float, typer.Option(help="Theory: spectrum decay of every task.")]
Features = Annotated[int, typer.Option(help="Theory: features per task.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


# -- analyze -----------------------------------------------------------------------------------

ANALYZE_FILES = ("analysis.json", "rank_frequency.png")


ToyAlpha = Annotated[float | None, typer.Option(
    "--alpha", help="Toy theory: spectrum decay of every task (giving it, or --features, asks "
    "for the theory's at-risk marks; default 2).")]
ToyFeatures = Annotated[int | None, typer.Option(
    "--features", help="Toy theory: features per task (default 32).")]
RISK_UNKNOWN = ("unknown: the share a task needs depends on the model and the data; give "
                "--calibration (a law from `raretask calibrate`) or --alpha/--features for the "
                "toy theory")


def analyze(
    data: Annotated[list[Path], typer.Argument(
        help="JSONL, CSV or Parquet files, or datasets save_to_disk directories.")],
    task_field: Annotated[str | None, typer.Option(help="Field naming each row's task.")] = None,
    rules: Annotated[Path | None, typer.Option(
        help="YAML of regex/keyword rules tagging untagged text (docs/mixing.md).")] = None,
    text_field: Annotated[str | None, typer.Option(
        help="Text field whose tokens are counted (default 'text'; a field named here must "
        "occur in the data).")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="Count tokens with this tokenizer: a Hugging Face tokenizer.json, a "
        "save_pretrained directory, or a pretrained name in the local cache (never "
        "downloaded). Default: whitespace words.")] = None,
    tokens_field: Annotated[str | None, typer.Option(
        help="Integer field with each row's token count (instead of counting).")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip malformed rows and count them.")] = False,
    size: Size = None,
    calibration: Calib = None,
    curve: Curve = None,
    alpha: ToyAlpha = None,
    features: ToyFeatures = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write analysis.json and rank_frequency.png here.")] = None,
    as_json: AsJson = False,
) -> None:
    """Counts, shares and tokens per task, a rank-frequency power law, and tasks at risk."""
    import dataclasses

    from raretask.mixing.analyze import analyze as run_analyze
    from raretask.mixing.analyze import mark_risk, rank_frequency_plot
    from raretask.mixing.rules import load_rules

    ruleset = load_rules(rules) if rules is not None else None
    result = run_analyze(data, task_field=task_field, rules=ruleset, text_field=text_field,
                         tokens_field=tokens_field, skip_bad=skip_bad, tokenizer=tokenizer)
    # Theorem 3 with made-up spectra says nothing about real data: mark risk only when the user
    # gave a basis for it (a calibration, or the toy's parameters on purpose)
    risk_known = calibration is not None or alpha is not None or features is not None
    if size is not None and risk_known:
        thr = _threshold(result.names(), size, calibration, curve,
                         2.0 if alpha is None else alpha, 32 if features is None else features)
        result = mark_risk(result, size, thr)
    elif size is not None:
        if not (math.isfinite(size) and size > 0):
            raise UserError(f"--size must be a finite number > 0, got {size}")
        result = dataclasses.replace(result, size=float(size),
                                     extra={**result.extra, "at_risk": RISK_UNKNOWN})
    if out is not None:
        from raretask.runs import store
        from raretask.runs.outset import output_set

        # one set: a kill leaves the old analysis.json + PNG or the new pair, never a mix
        with output_set(out, "analyze", ANALYZE_FILES) as tmp:
            rank_frequency_plot(result, tmp / "rank_frequency.png")
            store.write_json(tmp / "analysis.json", result.to_json())
    if as_json:
        _print_json(result.to_json())
        return
    table = Table(title=f"{result.examples:,} examples in {len(result.tasks)} tasks "
                  f"({result.tagging})", box=box.SIMPLE_HEAD)
    cols = ["rank", "task", "count", "share", "tokens", "token\nshare"]
    marked = size is not None and risk_known
    if marked:
        cols += ["needs", "at risk"]
    rows = []
    for t in result.tasks:
        row = [str(t.rank), t.task, f"{t.count:,}", _pct(t.share),
               "-" if t.tokens is None else f"{t.tokens:,}", _pct(t.token_share)]
        if marked:
            row += [_pct(t.required_share), "[red]yes[/]" if t.at_risk else "no"]
        rows.append(row)
    _fill(table, cols, rows)
    notes = []
    if result.power_law is not None:
        pl = result.power_law
        notes.append(f"share ∝ rank^-{pl.exponent:.3f} ± {pl.stderr:.3f} (R² {pl.r2:.3f})")
    if result.token_unit is not None:
        notes.append(f"tokens: {result.token_unit}")
    else:
        notes.append("no token counts (no row has a 'text' field: --text-field names it)")
    if result.rows_without_text:
        notes.append(f"[yellow]{result.rows_without_text:,} rows have no text field and add no "
                     "tokens[/]")
    if marked:
        notes.append(f"at size {size:g}: {sum(bool(t.at_risk) for t in result.tasks)} at risk "
                     f"by {result.threshold}")
        if result.tokens is not None:  # a task can be safe in examples and short in tokens
            notes.append("needs and at risk judge the example shares; for training that mixes "
                         "tokens, `raretask plan --unit tokens` judges the token shares")
    elif size is not None:
        notes.append(f"at size {size:g}: at risk {RISK_UNKNOWN}")
    if result.skipped:
        notes.append(f"{result.skipped:,} malformed rows skipped")
    if out is not None:
        notes.append(f"wrote {out / 'analysis.json'}, {out / 'rank_frequency.png'}")
    table.caption = "; ".join(notes)
    _print_table(table)


def _fill(table: Table, cols: list[str], rows: list[list[str]]) -> None:
    """Columns that never cut a number: every column but 'task' is as wide as its widest cell
    (no wrapping, no ellipsis); long task names fold onto further lines instead."""
    from rich.text import Text

    for i, c in enumerate(cols):
        if c == "task":
            table.add_column(c, justify="left", overflow="fold", min_width=4)
            continue
        widest = max([Text.from_markup(r[i]).cell_len for r in rows] +
                     [len(part) for part in c.split("\n")])
        table.add_column(c, justify="right", no_wrap=True, min_width=widest)
    for r in rows:
        table.add_row(*r)


def _print_table(table: Table, task_min: int = 8) -> None:
    """Print ``table``, wider than the terminal if its numbers need it (the terminal wraps the
    line, but no number is cut): rich would otherwise shrink every column and cut digits."""
    from rich.measure import Measurement

    wide = console.options.update(max_width=10**5)
    full = Measurement.get(console, wide, table).maximum
    task = next((j for j, c in enumerate(table.columns) if c.header == "task"), None)
    if task is not None:  # the task column can fold down to task_min
        natural = max([len(str(c)) for c in table.columns[task].cells] + [4])
        full -= max(0, natural - task_min)
    if full <= console.width:
        console.print(table)
        return
    Console(width=full, file=console.file, no_color=console.no_color,
            force_terminal=console.is_terminal).print(table)


# -- calibrate ---------------------------------------------------------------------------------


def calibrate(
    run_dirs: Annotated[list[Path], typer.Argument(
        help="Finished toy or LM grids (raretask run), pooled.")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Calibration file to write (default FIRST_RUN_DIR/calibration.json).")]
    = None,
    learned_accuracy: Annotated[float, typer.Option(
        help="LM grids: test accuracy at which the task counts as learned (the threshold "
             "`raretask show` and the report use).")] = LEARNED_ACCURACY,
    holdout: Annotated[list[Path] | None, typer.Option(
        "--holdout", help="A finished grid to predict, never fitted (repeat).")] = None,
    exclude_size: Annotated[list[str] | None, typer.Option(
        "--exclude-size", help="Leave this size (preset or width) out of the fit (repeat).")]
    = None,
    prior_sd: Annotated[float, typer.Option(
        help="Prior sd of each coefficient, per log10 unit (keeps separable grids finite).")]
    = 10.0,
    as_json: AsJson = False,
) -> None:
    """Fit P(learned | size, budget, frequency) per task; cross-validate; score held-out grids."""
    from raretask.mixing.calibrate import calibrate_runs
    from raretask.runs import store

    cal = calibrate_runs(run_dirs, learned_accuracy, prior_sd, holdout, exclude_size)
    path = out or run_dirs[0] / "calibration.json"
    obj = cal.model_dump(mode="json")
    store.write_json(path, obj)
    if as_json:
        _print_json(obj)
        return
    for table in calibration_tables(cal):
        console.print(table)
    for w in cal.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"wrote {path}")


def calibration_tables(cal) -> list[Table]:
    """The law, its ranges and its held-out accuracy, as `calibrate` prints them."""
    u = cal.units
    laws = Table(title=f"learnability law ({cal.kind}; learned: {cal.learned}; f in "
                 f"{u.frequency}, N {u.size}, D {u.budget})", box=box.SIMPLE_HEAD)
    for c in ("task", "cells", "learned", "law", "sizes N", "budgets D", "frequencies f"):
        laws.add_column(c, justify="left" if c in ("task", "law") else "right")
    for law in cal.laws:
        r = law.ranges
        text = law.threshold_law() if law.kind == "logistic" else \
            f"no threshold: scores {law.worst_score:.3g}..{law.best_score:.3g}"
        laws.add_row(law.task, str(law.cells), str(law.learned_cells), text,
                     f"{r.params[0]:.3g}..{r.params[1]:.3g}",
                     f"{r.tokens[0]:.3g}..{r.tokens[1]:.3g}",
                     f"{r.frequency[0]:.3g}..{r.frequency[1]:.3g}")
    laws.caption = "; ".join(law.formula() for law in cal.laws if law.kind == "logistic")
    tables = [laws]
    acc = Table(title="held-out accuracy (cells whose P(learned) is in 0.4-0.6 counted apart)",
                box=box.SIMPLE_HEAD)
    for c in ("task", "scheme", "called right"):
        acc.add_column(c, justify="left")
    for sc in [*cal.cross_validation, *cal.holdout_scores]:
        scheme = sc.scheme if sc.scheme != "held out" else \
            f"held out: {', '.join(cal.holdout_sources)}"
        acc.add_row(sc.task, scheme, sc.text())
    tables.append(acc)
    if cal.theory:
        th = Table(title="toy: the law's size exponent vs Theorem 3", box=box.SIMPLE_HEAD)
        for c in ("task", "widths", "law", "90% interval", "Theorem 3", "agrees"):
            th.add_column(c, justify="left" if c == "task" else "right")
        for t in cal.theory:
            if t["slope"] is None:
                th.add_row(t["task"], "-", "-", "-", "-", "-")
                continue
            lo, hi = t["slope_interval"]
            th.add_row(t["task"], f"{min(t['widths']):g}..{max(t['widths']):g}",
                       f"{t['slope']:.3f}", f"[{lo:.3f}, {hi:.3f}]", f"{t['theory_slope']:.3f}",
                       "yes" if t["agrees"] else "[red]no[/]")
        tables.append(th)
    return tables


# -- plan --------------------------------------------------------------------------------------


def _plan_inputs(source: Path, unit: str):
    """(names, natural shares, available, spectra or None, tokens per example or None, how the
    tokens were counted or None) from an analysis or a task file."""
    from raretask.config import load_task_file
    from raretask.mixing.analyze import Analysis
    from raretask.runs import store

    if source.suffix.lower() == ".json" or source.is_dir():
        path = source / "analysis.json" if source.is_dir() else source
        try:
            data = store.read_json(path)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except ValueError:
            raise UserError(f"{path}: not JSON") from None
        a = Analysis.from_json(data, str(path))
        names = a.names()
        if unit == "tokens":
            if a.tokens is None:
                raise UserError(f"--unit tokens: {path} has no token counts (analyze with a "
                                "text field or --tokens-field)")
            avail = [float(t.tokens) for t in a.tasks]
        else:
            avail = [float(t.count) for t in a.tasks]
        tpe = None
        if a.tokens is not None and all(t.tokens is not None and t.count > 0 for t in a.tasks):
            tpe = [t.tokens / t.count for t in a.tasks]
        return names, avail, avail, None, tpe, a.token_unit
    spec = load_task_file(source)
    names = [t.name for t in spec.tasks]
    weights = [t.weight for t in spec.tasks]
    avail = [float(t.count) for t in spec.tasks] if all(t.count is not None for t in spec.tasks) \
        else None
    return names, weights, avail, [t.spectrum() for t in spec.tasks], None, None


def plan(
    source: Annotated[Path, typer.Argument(
        help="analysis.json (or its directory) from `raretask analyze --out`, or a task file "
        "(YAML/CSV, as for `predict --task-file`).")],
    size: Annotated[float, typer.Option("--size", "-N", help="Model size (theory: width N; "
                                        "calibration: its size unit).")],
    target: Annotated[list[str] | None, typer.Option(
        "--target", "-t", help="A task that must be learned (repeat; default: all).")] = None,
    margin: Annotated[float, typer.Option(help="Safety factor on required shares.")] = 1.5,
    budget: Annotated[float | None, typer.Option(
        help="Training examples (or tokens, --unit tokens); default: the data once.")] = None,
    max_epochs: Annotated[float | None, typer.Option(
        help="Most times one example may be seen (default: no cap).")] = None,
    unit: Annotated[str, typer.Option(help="'examples' or 'tokens'.")] = "examples",
    margin_for: Annotated[list[str] | None, typer.Option(
        "--margin-for", help="TASK=M: this target's own margin (repeat).")] = None,
    max_epochs_for: Annotated[list[str] | None, typer.Option(
        "--max-epochs-for", help="TASK=N: this task's own repetition cap (repeat).")] = None,
    max_fraction: Annotated[list[str] | None, typer.Option(
        "--max-fraction", help="TASK=F: the most of the mix this task may take (repeat).")]
    = None,
    keep_learned: Annotated[bool, typer.Option(
        "--keep-learned", help="Tasks learned under the natural mix stay learned.")] = False,
    keep_margin: Annotated[float | None, typer.Option(
        help="Safety factor for the kept tasks (default: --margin).")] = None,
    calibration: Calib = None,
    curve: Curve = None,
    alpha: Alpha = 2.0,
    features: Features = 32,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write plan.json and every export format here.")] = None,
    path_template: Annotated[str, typer.Option(
        help="Data path per task in exports ({task} is replaced).")] = "{task}",
    sequence_length: Annotated[int | None, typer.Option(
        help="Exports: tokens per training sequence (OLMo-core instance, Mosaic row; default "
        "4096).")] = None,
    global_batch_size: Annotated[int | None, typer.Option(
        help="OLMo-core export: global batch size in tokens (default one sequence).")] = None,
    as_json: AsJson = False,
) -> None:
    """Minimum-KL weights that lift the targets above their thresholds, under repetition caps."""
    from raretask.mixing.export import FORMATS, render_all, write_texts
    from raretask.mixing.plan import make_plan, parse_task_values
    from raretask.runs import store
    from raretask.runs.outset import output_set

    if unit not in ("examples", "tokens"):
        raise UserError(f"--unit must be 'examples' or 'tokens', got {unit!r}")
    names, natural, avail, spectra, tpe, token_unit = _plan_inputs(source, unit)
    thr = _threshold(names, size, calibration, curve, alpha, features, spectra, unit,
                     _law_budget(calibration, budget, avail, unit, tpe), tpe)
    result = make_plan(names, natural, thr, size, targets=target, margin=margin,
                       available=avail, budget=budget, max_epochs=max_epochs, unit=unit,
                       margins=parse_task_values(margin_for, "--margin-for"),
                       max_epochs_for=parse_task_values(max_epochs_for, "--max-epochs-for"),
                       max_fraction=parse_task_values(max_fraction, "--max-fraction"),
                       keep_learned=keep_learned, keep_margin=keep_margin)
    obj = result.to_json()
    both = both_units(result, tpe)
    if both is not None:  # the same mix in examples and in tokens (mixing/units.py)
        obj["tokens_per_example"] = dict(zip(names, tpe, strict=True))
        obj["token_unit"] = token_unit
        obj["shares"] = both
    if calibration is not None:
        obj["extrapolated"] = _plan_extrapolation(result, thr)
    skipped: dict[str, str] = {}
    if out is not None:
        # render all first: a bad template or path fails before anything is written
        texts, skipped = render_all(result, path_template,
                                    None if tpe is None else dict(zip(names, tpe, strict=True)),
                                    **_export_options(sequence_length, global_batch_size))
        obj["exports_skipped"] = skipped
        with output_set(out, "plan", ["plan.json", *FORMATS]) as tmp:  # all or nothing
            store.write_json(tmp / "plan.json", obj)
            write_texts(tmp, texts)
    if as_json:
        _print_json(obj)
        return
    _print_table(plan_table(result, out, obj.get("extrapolated"), both, token_unit))
    for why in skipped.values():  # each reason starts with its file's name
        console.print(f"[yellow]not written:[/] {why}", highlight=False)


def _export_options(sequence_length: int | None, global_batch_size: int | None) -> dict:
    """The export options given (the exports' own defaults otherwise)."""
    opts = {"sequence_length": sequence_length, "global_batch_size": global_batch_size}
    return {k: v for k, v in opts.items() if v is not None}


def _law_budget(calibration, budget, avail, unit, tpe) -> float | None:
    """The plan's budget in the law's unit (LM: tokens; toy: samples = examples). An example
    budget becomes tokens through the data's mean tokens per example; None: not known here."""
    if calibration is None:
        return None
    b = budget if budget is not None else (None if avail is None else float(sum(avail)))
    if b is None or unit == "tokens" or tpe is None:
        return b
    return b * float(sum(a * t for a, t in zip(avail, tpe, strict=True)) / sum(avail)) \
        if avail is not None and sum(avail) > 0 else None


def _plan_extrapolation(result, thr) -> list[str]:
    """Where the plan leans on the law outside what it was fitted on (one phrase each)."""
    out = [f"plan size: {x}" for x in thr.extrapolation(result.size)]
    for name, n in (("natural mix needs", result.natural_size_needed),
                    ("natural mix needs at least", result.natural_size_minimum)):
        if n is not None and math.isfinite(n) and n != result.size:
            out += [f"{name}: {x}" for x in thr.extrapolation(n)]
    return out


def both_units(result, tokens_per_example) -> dict | None:
    """``{"examples": {"natural": {task: share}, "planned": {...}}, "tokens": {...}}``, or None
    without tokens per example (a task file, an analysis without token counts)."""
    from raretask.mixing.units import UNITS, to_unit

    if tokens_per_example is None:
        return None
    names = [t.task for t in result.tasks]
    out = {}
    for unit in UNITS:
        nat = to_unit([t.natural for t in result.tasks], tokens_per_example, result.unit, unit)
        plan = to_unit([t.weight for t in result.tasks], tokens_per_example, result.unit, unit)
        if nat is None or plan is None:
            return None
        out[unit] = {"natural": dict(zip(names, nat, strict=True)),
                     "planned": dict(zip(names, plan, strict=True))}
    return out


def plan_table(result, out: Path | None = None, extrapolated: list[str] | None = None,
               both: dict | None = None, token_unit: str | None = None) -> Table:
    """The plan, task by task; with ``both`` (:func:`both_units`) natural and planned shares in
    examples and in tokens side by side."""
    table = Table(title=f"plan at size {result.size:g}: KL(plan || natural) = {result.kl:.4g} "
                  f"nats", box=box.SIMPLE_HEAD)
    if both is None:
        cols = ["task", "natural", "planned"]
    else:
        cols = ["task", "natural\nexamples", "natural\ntokens", "planned\nexamples",
                "planned\ntokens"]
    cols += ["change", "needs", "cap", "learned", "target"]
    rows = []
    for t in result.tasks:
        learned = f"{'yes' if t.learned_natural else 'no'} -> " \
                  f"{'[green]yes[/]' if t.learned_planned else '[red]no[/]'}"
        if both is None:
            shares = [_pct(t.natural), _pct(t.weight)]
        else:
            ex, tok = both["examples"], both["tokens"]
            shares = [_pct(ex["natural"][t.task]), _pct(tok["natural"][t.task]),
                      _pct(ex["planned"][t.task]), _pct(tok["planned"][t.task])]
        rows.append([
            t.task + (" (F)" if t.frequent else ""), *shares,
            f"{100 * t.relative_change:+.1f}%", _pct(t.lower) if t.lower > 0 else "-",
            _pct(t.cap) if t.cap < 1 else "-", learned,
            "yes" if t.target else ("kept" if t.kept else "")])
    _fill(table, cols, rows)
    taken = -sum(t.change for t in result.tasks if t.frequent and t.change < 0)
    notes = [f"{result.threshold}; margin {result.margin:g}",
             f"taken from the frequent tasks (F): {_pct(taken)} of the data"]
    if both is not None:
        notes.append(f"planned in {result.unit} (change, needs, cap in {result.unit}); tokens: "
                     f"{token_unit or 'as counted by analyze'}")
    if result.natural_size_needed is not None:
        ratio = result.natural_size_needed / result.size
        notes.append(f"the natural mix would need size {result.natural_size_needed:.4g} "
                     f"({ratio:.2f}x) for every target with the same margin (at least "
                     f"{result.natural_size_minimum:.4g} without)")
    if result.binding:  # issue 22: which constraints hold the plan where it is
        notes.append("binding: " + ", ".join(f"{b['task']} {b['constraint']}"
                                             for b in result.binding))
    if extrapolated:
        notes.append(f"[yellow]warning: extrapolated ({'; '.join(extrapolated)})[/]")
    if out is not None:
        notes.append(f"wrote {out}/plan.json and exports")
    table.caption = "; ".join(notes)
    return table


# -- fix ---------------------------------------------------------------------------------------


def fix(
    config: Annotated[Path, typer.Argument(help="A grid holding the fix's arms: "
                                           "configs/fix_toy.yaml (arm axis) or "
                                           "configs/fix_lm.yaml.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a field: key=value (YAML value).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Prove a plan by training: natural mix vs plan vs the bigger model, even vs bursts.

    The arms are an ordinary grid: it runs (and resumes) as `raretask run` would, then the
    study's fix table is printed and fix.json (for the report) written beside it."""
    from raretask.config import load_experiment
    from raretask.mixing.prove import prove
    from raretask.runs.progress import GridProgress

    grid = load_experiment(config, overrides or [])
    with GridProgress(quiet) as progress:
        table, files = prove(grid, out, progress)
    console.print(table)
    console.print(f"wrote {', '.join(f'{out}/{n}' for n in files)}")


def register(app: typer.Typer) -> None:
    """Add the fix's commands to the main app."""
    for fn in (analyze, calibrate, plan, fix):
        app.command()(fn)
