"""The fix's commands (`analyze`, `calibrate`, `plan`, `fix`), registered on the main app.

Each command validates everything and computes its whole result before it prints or writes
anything, so a user error (exit 2, one ``error:`` line) never leaves partial output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from raretask.errors import UserError

console = Console()


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3g}%"


def _threshold(names, size, calibration, curve, alpha, features, spectra=None):
    import math

    from raretask.mixing.calibrate import load_calibration
    from raretask.mixing.thresholds import TheoryThreshold

    if not (math.isfinite(size) and size > 0):
        raise UserError(f"--size must be a finite number > 0, got {size}")

    if calibration is not None:
        return load_calibration(calibration, curve)
    return TheoryThreshold(names, spectra=spectra, alpha=alpha, features=features)


Size = Annotated[float | None, typer.Option(
    "--size", "-N", help="Model size: the theory's width N, or the calibration's size unit.")]
Calib = Annotated[Path | None, typer.Option(help="Calibration file from `raretask calibrate`.")]
Curve = Annotated[str | None, typer.Option(help="Curve of the calibration (name or index).")]
Alpha = Annotated[float, typer.Option(help="Theory: spectrum decay of every task.")]
Features = Annotated[int, typer.Option(help="Theory: features per task.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


# -- analyze -----------------------------------------------------------------------------------


def analyze(
    data: Annotated[list[Path], typer.Argument(
        help="JSONL, CSV or Parquet files, or datasets save_to_disk directories.")],
    task_field: Annotated[str | None, typer.Option(help="Field naming each row's task.")] = None,
    rules: Annotated[Path | None, typer.Option(
        help="YAML of regex/keyword rules tagging untagged text (docs/mixing.md).")] = None,
    text_field: Annotated[str, typer.Option(help="Text field; its words count as tokens.")]
    = "text",
    tokens_field: Annotated[str | None, typer.Option(
        help="Integer field with each row's token count (instead of counting words).")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip malformed rows and count them.")] = False,
    size: Size = None,
    calibration: Calib = None,
    curve: Curve = None,
    alpha: Alpha = 2.0,
    features: Features = 32,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write analysis.json and rank_frequency.png here.")] = None,
    as_json: AsJson = False,
) -> None:
    """Counts, shares and tokens per task, a rank-frequency power law, and tasks at risk."""
    from raretask.mixing.analyze import analyze as run_analyze
    from raretask.mixing.analyze import mark_risk, rank_frequency_plot
    from raretask.mixing.rules import load_rules

    ruleset = load_rules(rules) if rules is not None else None
    result = run_analyze(data, task_field=task_field, rules=ruleset, text_field=text_field,
                         tokens_field=tokens_field, skip_bad=skip_bad)
    if size is not None:
        thr = _threshold(result.names(), size, calibration, curve, alpha, features)
        result = mark_risk(result, size, thr)
    if out is not None:
        from raretask.runs import store

        with store.run_lock(out):  # a second process writing here refuses: files never mix
            rank_frequency_plot(result, out / "rank_frequency.png")
            store.write_json(out / "analysis.json", result.to_json())
    if as_json:
        _print_json(result.to_json())
        return
    table = Table(title=f"{result.examples:,} examples in {len(result.tasks)} tasks "
                  f"({result.tagging})", box=box.SIMPLE_HEAD)
    cols = ["rank", "task", "count", "share", "tokens", "token share"]
    if size is not None:
        cols += ["needs", "at risk"]
    for c in cols:
        table.add_column(c, justify="left" if c == "task" else "right")
    for t in result.tasks:
        row = [str(t.rank), t.task, f"{t.count:,}", _pct(t.share),
               "-" if t.tokens is None else f"{t.tokens:,}", _pct(t.token_share)]
        if size is not None:
            row += [_pct(t.required_share), "[red]yes[/]" if t.at_risk else "no"]
        table.add_row(*row)
    notes = []
    if result.power_law is not None:
        pl = result.power_law
        notes.append(f"share ∝ rank^-{pl.exponent:.3f} ± {pl.stderr:.3f} (R² {pl.r2:.3f})")
    if size is not None:
        notes.append(f"at size {size:g}: {sum(bool(t.at_risk) for t in result.tasks)} at risk "
                     f"by {result.threshold}")
    if result.skipped:
        notes.append(f"{result.skipped:,} malformed rows skipped")
    if out is not None:
        notes.append(f"wrote {out / 'analysis.json'}, {out / 'rank_frequency.png'}")
    table.caption = "; ".join(notes)
    console.print(table)


# -- calibrate ---------------------------------------------------------------------------------


def calibrate(
    run_dir: Annotated[Path, typer.Argument(help="A finished toy or LM grid (raretask run).")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Calibration file to write (default RUN_DIR/calibration.json).")]
    = None,
    learned_accuracy: Annotated[float, typer.Option(
        help="LM grids: test accuracy at which the task counts as learned.")] = 0.9,
    as_json: AsJson = False,
) -> None:
    """Fit the frequency a task needs against model size (toy: checked against the theory)."""
    from raretask.mixing.calibrate import calibrate_rows, calibration_json
    from raretask.runs import store
    from raretask.runs.grid import load_summary

    if not 0 < learned_accuracy <= 1:
        raise UserError(f"--learned-accuracy must be in (0, 1], got {learned_accuracy}")
    rows = load_summary(run_dir)
    try:
        kind, curves = calibrate_rows(rows, learned_accuracy)
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, StopIteration, ZeroDivisionError) as err:
        # rows edited outside raretask: a missing field or a wrong type
        raise UserError(f"{run_dir}: malformed summary rows ({type(err).__name__}: {err})") \
            from None
    learned = (f"test accuracy >= {learned_accuracy:g}" if kind == "lm"
               else "normalised signal >= the grid's learned_threshold")
    obj = calibration_json(kind, str(run_dir), curves, learned)
    store.write_json(out or run_dir / "calibration.json", obj)
    if as_json:
        _print_json(obj)
        return
    for c in curves:
        table = Table(title=f"{c.name}", box=box.SIMPLE_HEAD)
        cols = ["size", "threshold", "bracket", "errors"]
        if kind == "toy":
            cols += ["theory bracket", "agrees"]
        for col in cols:
            table.add_column(col, justify="right")
        for p in c.points:
            bracket = f"{_pct(p.low)} .. {_pct(p.high)}"
            row = [f"{p.size:g}", p.censored or _pct(p.threshold), bracket, f"{p.errors}/{p.n}"]
            if kind == "toy":
                row += [f"{_pct(p.theory_low)} .. {_pct(p.theory_high)}",
                        "yes" if p.agrees else "[red]no[/]"]
            table.add_row(*row)
        notes = []
        if c.fit is not None:
            notes.append(f"fit: f* = 10^{c.fit.log10_c:.3f} x size^{c.fit.slope:.3f} "
                         f"(slope ± {c.fit.cov[1][1] ** 0.5:.3f})")
        if c.theory_fit is not None:
            notes.append(f"theory: slope {c.theory_fit.slope:.3f}")
        table.caption = "; ".join(notes)
        console.print(table)
    console.print(f"wrote {out or run_dir / 'calibration.json'}")


# -- plan --------------------------------------------------------------------------------------


def _plan_inputs(source: Path, unit: str):
    """(names, natural shares, available, spectra or None) from an analysis or a task file."""
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
        return names, avail, avail, None
    spec = load_task_file(source)
    names = [t.name for t in spec.tasks]
    weights = [t.weight for t in spec.tasks]
    avail = [float(t.count) for t in spec.tasks] if all(t.count is not None for t in spec.tasks) \
        else None
    return names, weights, avail, [t.spectrum() for t in spec.tasks]


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
    calibration: Calib = None,
    curve: Curve = None,
    alpha: Alpha = 2.0,
    features: Features = 32,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write plan.json and every export format here.")] = None,
    path_template: Annotated[str, typer.Option(
        help="Data path per task in exports ({task} is replaced).")] = "{task}",
    as_json: AsJson = False,
) -> None:
    """Minimum-KL weights that lift the targets above their thresholds, under repetition caps."""
    from raretask.mixing.export import FORMATS, render, write_all
    from raretask.mixing.plan import make_plan
    from raretask.runs import store

    if unit not in ("examples", "tokens"):
        raise UserError(f"--unit must be 'examples' or 'tokens', got {unit!r}")
    names, natural, avail, spectra = _plan_inputs(source, unit)
    thr = _threshold(names, size, calibration, curve, alpha, features, spectra)
    result = make_plan(names, natural, thr, size, targets=target, margin=margin,
                       available=avail, budget=budget, max_epochs=max_epochs, unit=unit)
    if out is not None:
        for fmt in FORMATS:  # render all first: a bad template fails before anything is written
            render(result, fmt, path_template)
        with store.run_lock(out):
            store.write_json(out / "plan.json", result.to_json())
            write_all(result, out, path_template)
    if as_json:
        _print_json(result.to_json())
        return
    console.print(plan_table(result, out))


def plan_table(result, out: Path | None = None) -> Table:
    table = Table(title=f"plan at size {result.size:g}: KL(plan || natural) = {result.kl:.4g} "
                  f"nats", box=box.SIMPLE_HEAD)
    for c in ("task", "natural", "planned", "change", "needs", "cap", "learned", "target"):
        table.add_column(c, justify="left" if c == "task" else "right")
    for t in result.tasks:
        learned = f"{'yes' if t.learned_natural else 'no'} -> " \
                  f"{'[green]yes[/]' if t.learned_planned else '[red]no[/]'}"
        table.add_row(
            t.task + (" (F)" if t.frequent else ""), _pct(t.natural), _pct(t.weight),
            f"{100 * t.relative_change:+.1f}%", _pct(t.lower) if t.target else "-",
            _pct(t.cap) if t.cap < 1 else "-", learned, "yes" if t.target else "")
    taken = -sum(t.change for t in result.tasks if t.frequent and t.change < 0)
    notes = [f"{result.threshold}; margin {result.margin:g}",
             f"taken from the frequent tasks (F): {_pct(taken)} of the data"]
    if result.natural_size_needed is not None:
        ratio = result.natural_size_needed / result.size
        notes.append(f"the natural mix would need size {result.natural_size_needed:.4g} "
                     f"({ratio:.2f}x) for every target with the same margin (at least "
                     f"{result.natural_size_minimum:.4g} without)")
    if out is not None:
        notes.append(f"wrote {out}/plan.json and exports")
    table.caption = "; ".join(notes)
    return table


# -- fix ---------------------------------------------------------------------------------------


def fix(
    config: Annotated[Path, typer.Argument(help="configs/fix_toy.yaml (kind: fix_toy) or "
                                           "configs/fix_lm.yaml (kind: lm).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a field: key=value (YAML value).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Prove a plan by training: natural mix vs plan vs the bigger model, even vs bursts."""
    from raretask.config import load_yaml

    data = load_yaml(config)
    if isinstance(data, dict) and data.get("kind") == "lm":
        from raretask.mixing.fix_lm import run_fix_lm

        console.print(run_fix_lm(config, out, overrides or [], quiet))
        return
    from raretask.mixing.fix import fix_table, load_fix_config, run_fix_toy, write_fix
    from raretask.runs import store

    cfg = load_fix_config(config, overrides or [])
    with store.run_lock(out):  # held while training: a second `fix` on this directory refuses
        plan_, results = run_fix_toy(cfg, progress=None if quiet else _step_progress())
        write_fix(out, cfg, plan_, results)
    console.print(fix_table(results, cfg, plan_))
    console.print(f"wrote {out}/results.json, {out}/plan.json")


def _step_progress():
    from rich.progress import Progress

    prog = Progress(console=Console(stderr=True), transient=True)
    state: dict = {}

    def update(step: int, total: int) -> None:
        if "task" not in state:
            prog.start()
            state["task"] = prog.add_task("training the arms", total=total)
        prog.update(state["task"], completed=step)
        if step >= total:
            prog.stop()

    return update


def register(app: typer.Typer) -> None:
    """Add the fix's commands to the main app."""
    for fn in (analyze, calibrate, plan, fix):
        app.command()(fn)
