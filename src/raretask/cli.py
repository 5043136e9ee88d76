"""The `raretask` command: one Typer app, each subcommand a thin call into the library.

Errors a user can cause (bad flag, bad file, infeasible request) end with one line on stderr,
``error: ...`` naming the field or line, and exit code 2; nothing is printed before the whole
result is ready, so a failure never leaves partial output.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from raretask.errors import UserError

if TYPE_CHECKING:
    from raretask.studies.base import ShowTable

try:  # typer >= 0.20 vendors click; older typer (e.g. on the GPU image) depends on it
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _click_errors

app = typer.Typer(
    name="raretask",
    help="Predict, reproduce and fix the rare tasks small models fail to learn.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console()


def _print_json(obj: object) -> None:
    # plain stdout, no rich wrapping: machine-readable output must be exactly one JSON document
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


# -- predict -----------------------------------------------------------------------------------


@app.command()
def predict(
    width: Annotated[int | None, typer.Option(
        "--width", "-N", help="Model width N (shared neurons); theory mode.")] = None,
    tasks: Annotated[int | None, typer.Option("--tasks", "-K", help="Number of tasks K.")] = None,
    features: Annotated[int | None, typer.Option(help="Features per task M.")] = None,
    alpha: Annotated[float | None, typer.Option(
        help="Spectrum decay: lambda_j = j^-alpha (default 2).")] = None,
    beta: Annotated[float | None, typer.Option(
        help="Frequency decay: pi_k ∝ k^-beta (default 1.5).")] = None,
    task_file: Annotated[
        Path | None,
        typer.Option("--task-file", "-f",
                     help="YAML/CSV with name, frequency|count, alpha+features|eigenvalues."),
    ] = None,
    frequent_mass: Annotated[
        float | None, typer.Option(help="Prior mass of the frequent set F (default 0.8).")
    ] = None,
    calibration: Annotated[Path | None, typer.Option(
        help="A `raretask calibrate` file: predict from its fitted law instead of the theory.")]
    = None,
    task: Annotated[str | None, typer.Option(
        help="Calibrated mode: the task (default: the calibration's fitted one).")] = None,
    size: Annotated[str | None, typer.Option(
        help="Calibrated mode: a preset name (LM) or a size (parameters; toy: width).")] = None,
    tokens: Annotated[float | None, typer.Option(
        help="Calibrated mode: training budget (LM tokens; toy samples = steps x batch).")]
    = None,
    frequency: Annotated[float | None, typer.Option(
        "--frequency", help="Calibrated mode: the task's rate (LM: instances per token; toy: "
        "share of samples). Omitted: only the required frequency.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Which tasks a width-N model learns (Theorem 3) and the frequency each one needs; with
    --calibration, P(learned) of one task at a size, budget and frequency from a fitted law."""
    from raretask.config import load_task_file
    from raretask.predict import predict as run_predict
    from raretask.theory import DEFAULT_FREQUENT_MASS, TaskSet

    calibrated = {"--task": task, "--size": size, "--tokens": tokens, "--frequency": frequency}
    if calibration is not None:
        theory = {"--width": width, "--tasks": tasks, "--features": features, "--alpha": alpha,
                  "--beta": beta, "--task-file": task_file, "--frequent-mass": frequent_mass}
        for name, v in theory.items():
            if v is not None:
                raise UserError(f"{name}: a theory option; not used with --calibration")
        _predict_calibrated(calibration, task, size, tokens, frequency, as_json)
        return
    for name, v in calibrated.items():
        if v is not None:
            raise UserError(f"{name}: needs --calibration (the theory takes --width)")
    if width is None:
        raise UserError("--width: required (the model width N), or give --calibration")
    alpha = 2.0 if alpha is None else alpha
    beta = 1.5 if beta is None else beta
    if task_file is not None:
        if tasks is not None or features is not None:
            raise UserError("--task-file: give either a task file or --tasks/--features, not both")
        spec = load_task_file(task_file)
        task_set, index_names = spec.task_set(), False
        mass = spec.frequent_mass if frequent_mass is None else frequent_mass
    else:
        task_set = TaskSet.power_law(
            tasks=32 if tasks is None else tasks,
            features=32 if features is None else features, alpha=alpha, beta=beta,
        )
        index_names = True
        mass = DEFAULT_FREQUENT_MASS if frequent_mass is None else frequent_mass
    report = run_predict(task_set, width, frequent_mass=mass, index_names=index_names)
    if as_json:
        _print_json(report.to_json())
        return
    learned = sum(r.learned for r in report.rows)
    table = Table(
        title=f"width N = {report.width}: {learned} of {len(report.rows)} tasks learned, "
        f"{report.frequent_tasks} frequent (mass {mass:g})",
        caption="kept: features at the optimum; loss: normalised optimal loss; first N: width at "
        "which the first feature enters (Thm 3); crit N: Prop. 6 against F; needs: the share "
        "that makes the task learned at this width (x: as a multiple of today's)",
    )
    for col in ("task", "share", "kept", "loss", "first N", "crit N", "needs", "x", "learned"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in report.rows:
        factor = r.required_frequency / r.frequency if r.frequency > 0 else float("inf")
        table.add_row(
            str(r.task), _pct(r.frequency), str(r.features_kept), f"{r.normalized_loss:.3f}",
            str(r.first_feature_width), str(r.critical_width), _pct(r.required_frequency),
            f"{factor:.2f}", "[green]yes[/]" if r.learned else "[red]no[/]",
        )
    console.print(table)


def _resolve_size(size: str | None, kind: str) -> float:
    """--size as the calibrated study's size (its plug-in reads preset names, e.g. LM's)."""
    import math

    from raretask.studies import study

    if size is None:
        raise UserError("--size: required with --calibration (a preset name or a size)")
    n = study(kind, "--calibration").resolve_size(size)
    if not (math.isfinite(n) and n > 0):
        raise UserError(f"--size: expected a number > 0 or a preset name, got {size!r}")
    return n


def _predict_calibrated(path: Path, task: str | None, size: str | None, tokens: float | None,
                        frequency: float | None, as_json: bool) -> None:
    """`predict --calibration`: one task at one (size, budget, frequency), from the law."""
    import math

    from raretask.mixing.calibrate import load_calibration

    cal = load_calibration(path)
    law = cal.law(task)
    params = _resolve_size(size, cal.kind)
    tokens = law.budget(tokens, "--tokens", cal.units.budget)
    if not (math.isfinite(tokens) and tokens > 0):
        raise UserError(f"--tokens: expected a number > 0, got {tokens:g}")
    if frequency is not None and not (math.isfinite(frequency) and 0 < frequency <= 1):
        raise UserError(f"--frequency: expected a rate in (0, 1] ({cal.units.frequency}), got "
                        f"{frequency:g}")
    outside = law.extrapolation(params, tokens, frequency)
    prob = learned = req = None
    interval: list[float | None] = [None, None]
    if law.kind == "logistic":
        req, lo, hi = law.required_frequency(params, tokens)
        interval = [None if math.isinf(x) else x for x in (lo, hi)]
        req = None if math.isinf(req) else req
        if frequency is not None:
            prob = float(law.probability(params, tokens, frequency)[0])
            learned = prob >= 0.5
        elif req is not None:
            outside += [f"required {x}" for x in law.extrapolation(params, tokens, req)
                        if x.startswith("frequency")]
    else:  # a bound: only what the grids showed, by monotonicity
        r = law.ranges
        within = params <= r.params[1] and tokens <= r.tokens[1]
        never = law.learned_cells == 0
        if never and within:
            interval = [r.frequency[1], None]  # needs more than the most it saw
            learned = None if frequency is None else (False if frequency <= r.frequency[1]
                                                      else None)
        elif not never and params >= r.params[0] and tokens >= r.tokens[0]:
            interval = [None, r.frequency[0]]
            learned = None if frequency is None else (True if frequency >= r.frequency[0]
                                                      else None)
    obj = {"task": law.task, "size": size, "params": params, "tokens": tokens,
           "frequency": frequency, "learned_probability": prob, "learned": learned,
           "required_frequency": req, "required_frequency_interval": interval,
           "extrapolated": bool(outside)}
    if as_json:
        _print_json(obj)
        return
    unit = cal.units.frequency
    shape = law.threshold_law() if law.kind == "logistic" else "none"
    lines = [f"{law.task} at size {size} ({params:.4g} {cal.units.size}), budget {tokens:.4g} "
             f"({cal.units.budget}); law: {shape}"]
    if law.kind == "bound":
        lines.append(f"no threshold: {law.learned_cells} of {law.cells} cells learned "
                     f"(scores {law.worst_score:.3g}..{law.best_score:.3g}); "
                     + (f"needs more than {interval[0]:.3g} {unit}" if interval[0] is not None
                        else f"learned from {interval[1]:.3g} {unit}" if interval[1] is not None
                        else "nothing can be said here"))
    else:
        fmt = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
        lines.append(f"required frequency {fmt(req)} {unit} (90% interval {fmt(interval[0])} .. "
                     f"{fmt(interval[1])})")
    if frequency is not None:
        p = "-" if prob is None else f"{prob:.3f}"
        verdict = {True: "[green]learned[/]", False: "[red]not learned[/]", None: "unknown"}
        lines.append(f"at {frequency:.3g} {unit}: P(learned) {p}: {verdict[learned]}")
    if outside:
        lines.append(f"[yellow]warning: extrapolated: {'; '.join(outside)}[/]")
    for line in lines:
        console.print(line, highlight=False)


# -- scaling -----------------------------------------------------------------------------------


@app.command()
def scaling(
    data: Annotated[Path, typer.Argument(help="CSV with columns params,tokens,loss.")],
    sizes: Annotated[
        str | None,
        typer.Option(help="Model sizes to classify, comma-separated (e.g. 20e6,1e9)."),
    ] = None,
    eps: Annotated[float, typer.Option(help="Loss margin of Definition 2.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Fit L(N, D) = L0 + A/N^a + B/D^b and classify model sizes (Definitions 1 and 2)."""
    from dataclasses import asdict

    from raretask.scaling import classify, load_scaling_csv, max_data_scalable_ratio

    table = load_scaling_csv(data)
    fit = table.fit()
    if sizes is None:
        size_list = sorted(set(float(p) for p in table.params))
    else:
        size_list = []
        for item in sizes.split(","):
            try:
                size_list.append(float(item))
            except ValueError:
                raise UserError(f"--sizes: {item.strip()!r} is not a number") from None
    pairs = classify(fit, size_list, eps)
    result = {
        "fit": {"L0": fit.L0, "A": fit.A, "B": fit.B, "a": fit.a, "b": fit.b,
                "rmse": fit.rmse, "n_points": fit.n_points},
        "exponents": {"compute": fit.compute_exponent, "params": fit.params_exponent,
                      "tokens": fit.tokens_exponent},
        "max_data_scalable_ratio": max_data_scalable_ratio(fit),
        "eps": eps,
        "pairs": [asdict(p) for p in pairs],
    }
    if as_json:
        _print_json(result)
        return
    console.print(
        f"[bold]L(N, D) = {fit.L0:.4g} + {fit.A:.4g}/N^{fit.a:.3f} + {fit.B:.4g}/D^{fit.b:.3f}"
        f"[/]  (rmse {fit.rmse:.3g}, {fit.n_points} points)\n"
        f"compute-optimal under C = 6ND: L - L0 ∝ C^-{fit.compute_exponent:.3f}, "
        f"N_opt ∝ C^{fit.params_exponent:.3f}, D_opt ∝ C^{fit.tokens_exponent:.3f}\n"
        f"a smaller model reaches a larger one's compute-optimal loss with unlimited data "
        f"(Def. 1) when N_l / N_s < {result['max_data_scalable_ratio']:.3g}"
    )
    tab = Table(title=f"Definitions 1 and 2 (eps = {eps:g})")
    for col in ("small N_s", "large N_l", "L_C(N_s) - L_C(N_l)", "L_inf(N_s) - L_C(N_l)",
                "learnable via", "N_s*(eps)"):
        tab.add_column(col, justify="right")
    for p in pairs:
        tab.add_row(f"{p.small:.3g}", f"{p.large:.3g}", f"{p.gap_compute_optimal:.4f}",
                    f"{p.gap_infinite_data:.4f}",
                    "[green]data scaling[/]" if p.verdict == "data" else "[red]model scaling[/]",
                    f"{p.critical_small_size:.3g}")
    console.print(tab)


# -- run / show --------------------------------------------------------------------------------


# rich progress for a grid: cells done/total, steps, rate, ETA (raretask.runs.progress)
from raretask.runs.progress import GridProgress as _GridProgress  # noqa: E402


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (see configs/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: key=value (YAML value, lists make axes)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    checkpoint_seconds: Annotated[
        float, typer.Option(help="Checkpoint the running group at most this often.")
    ] = 60.0,
    profile: Annotated[
        Path | None, typer.Option("--profile", help="Execution profile YAML (device, precision, "
                                  "graphs, compile...; docs: raretask.runs.profile); "
                                  "--set profile.FIELD=VALUE overrides one field.")
    ] = None,
    parallel: Annotated[
        str, typer.Option(help="Under torchrun: 'cells' (each process takes its share of the "
                          "cells), 'model' (all train each cell together: DDP, FSDP2 for 1b+ "
                          "on CUDA), 'ddp', 'fsdp', or 'auto': cells for toy grids and LM grids "
                          "with at least as many cells as processes and no 1b+ preset, model "
                          "otherwise.")
    ] = "auto",
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Train only the cells with KEY=VALUE (a list: any of its "
                     "values; repeat for several keys); the directory stays the whole grid, "
                     "finished by a later run without --only.")
    ] = None,
) -> None:
    """Run an experiment grid into a directory; re-running resumes where it stopped.

    Several processes: ``torchrun --nproc_per_node=P -m raretask run CONFIG --out DIR``.
    """
    import yaml

    from raretask.config import cell_selector, load_experiment
    from raretask.runs.distributed import PARALLEL_CHOICES, env_ranks
    from raretask.runs.grid import GridRun

    if parallel not in PARALLEL_CHOICES:
        raise UserError(f"--parallel: expected one of {', '.join(PARALLEL_CHOICES)}, "
                        f"got {parallel!r}")
    grid = load_experiment(config, overrides or [], profile_file=profile)
    selected = cell_selector(only, grid) if only else None
    if dry_run:
        sys.stdout.write(yaml.safe_dump(grid.resolved(), sort_keys=False))
        sys.stdout.write("# execution profile (unset fields: the device's defaults)\n")
        sys.stdout.write(yaml.safe_dump({"profile": grid.profile.model_dump(exclude_none=True)},
                                        sort_keys=False))
        return
    quiet = quiet or env_ranks()[0] != 0  # one display per torchrun job: rank 0's
    runner = GridRun(grid, out, checkpoint_seconds=checkpoint_seconds)
    with _GridProgress(quiet) as progress:
        runner.run(progress=progress, parallel=parallel, only=selected)
    if not quiet:
        done = runner.cells_done()
        what = (f"{len(runner.cells)} cells" if done == len(runner.cells)
                else f"{done} of {len(runner.cells)} cells (--only)")
        console.print(f"[bold]done[/]: {what} in {out}  (raretask show {out})")


@app.command()
def show(
    out: Annotated[Path, typer.Argument(help="Run directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of rows.")] = False,
    all_tasks: Annotated[bool, typer.Option("--all", help="Table: every task, not a digest.")]
    = False,
) -> None:
    """Final per-cell, per-task metrics of a run, compared with Theorem 3; on an unfinished
    run, how many cells are still missing (the table covers the finished ones only)."""
    from raretask.runs import store
    from raretask.runs.grid import cell_count, load_summary
    from raretask.studies import study_of_rows

    rows = load_summary(out)
    cells = store.read_cells(out) if (Path(out) / "cells.json").exists() else None
    total, done = cell_count(out), len({r["cell"] for r in rows})
    missing = (f"unfinished: {total - done} of {total} cells have no results yet; the table "
               f"covers the {done} finished" if total is not None and done < total else "")
    if as_json:
        _print_json(rows)
        if missing:  # stdout stays one JSON document
            sys.stderr.write(f"{out}: {missing}\n")
        return
    if not rows:
        console.print(f"{out}: no finished cells yet" + (f" (0 of {total})" if total else ""))
        return
    try:  # rows edited outside raretask may lack a field or hold the wrong type
        table = study_of_rows(rows, str(out)).table(rows, str(out), all_tasks, cells)
    except (KeyError, TypeError, ValueError, StopIteration, ZeroDivisionError) as err:
        raise UserError(f"{out}: malformed summary rows ({type(err).__name__}: {err})") from None
    if missing:
        table.title = f"{table.title} ({missing.split(';')[0]})"
        table.caption = f"{table.caption} ({missing})" if table.caption else missing
    drawn = rich_table(table)
    width = console.width
    if not console.is_terminal:  # piped to a file or a log: no gain in folding columns to 80
        console.width = max(width, console.measure(
            drawn, options=console.options.update_width(1000)).maximum)
    try:
        console.print(drawn)
    finally:
        console.width = width
    if table.caption:  # below the table: wrapped to a terminal, one line to a file
        console.print(table.caption, highlight=False, soft_wrap=not console.is_terminal)
    if missing:
        console.print(f"[yellow]{missing}[/]", highlight=False)


def rich_table(table: ShowTable) -> Table:
    """A study's :class:`~raretask.studies.base.ShowTable` as rich draws it."""
    out = Table(title=table.title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1))
    for c in table.columns:  # numbers stay whole; a table too wide narrows the word columns
        out.add_column(c, justify="right", no_wrap=c not in table.wrap, overflow="fold",
                       min_width=None if c in table.wrap else len(c))
    for row in table.rows:
        out.add_row(*row)
    return out


# -- report ------------------------------------------------------------------------------------


@app.command()
def report(
    dirs: Annotated[list[Path], typer.Argument(
        metavar="DIR", help="Finished run directories (toy or LM), or directories holding "
        "a fix.json.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path(
        "report.html"),
    scaling_csv: Annotated[
        Path | None, typer.Option("--scaling", help="CSV params,tokens,loss for Fig. 1 "
                                  "(default: the law the paper quotes).")
    ] = None,
    title: Annotated[str, typer.Option(help="Page title.")] = "raretask report",
    calibration: Annotated[list[Path] | None, typer.Option(
        "--calibration", help="A `raretask calibrate` file: its law, cross-validated and "
        "held-out accuracy (repeatable).")] = None,
    partial: Annotated[bool, typer.Option(
        "--partial", help="Also draw unfinished grids from their finished cells (a grid "
        "filled call by call); every figure and table they feed says so.")] = False,
) -> None:
    """One self-contained HTML page with the study's figures for the given runs."""
    import shlex

    from raretask.report.html import write_report

    command = shlex.join(["raretask", "report", *map(str, dirs), "--out", str(out)]
                         + (["--scaling", str(scaling_csv)] if scaling_csv else [])
                         + [x for c in calibration or [] for x in ("--calibration", str(c))]
                         + (["--partial"] if partial else []))
    path = write_report(dirs, out, scaling_csv, title, command, calibration or [], partial)
    console.print(f"wrote {path}")


# -- demo --------------------------------------------------------------------------------------


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("runs/demo"),
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field of both demo configs.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """The main job: theory, a phase grid vs Theorem 3, and narrow-vs-wide injection, on CPU."""
    from raretask.demo import run_demo

    run_demo(out, console, lambda: _GridProgress(quiet), overrides or [])


from raretask.export_cli import register as _register_export_hf  # noqa: E402
from raretask.mixing.cli import register as _register_fix  # noqa: E402

_register_fix(app)  # analyze, calibrate, plan, fix
_register_export_hf(app)  # export-hf

# -- entry point -------------------------------------------------------------------------------


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app and turns user errors into one line + exit code 2."""
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=argv, prog_name="raretask", standalone_mode=False)
    except UserError as err:
        _fail(str(err))
    except getattr(_click_errors, "NoArgsIsHelpError", ()) as err:
        sys.stdout.write(err.ctx.get_help() + "\n")
        sys.exit(0)
    except _click_errors.UsageError as err:
        _fail(err.format_message())
    except _click_errors.ClickException as err:
        _fail(err.format_message())
    except (typer.Exit, getattr(_click_errors, "Exit", typer.Exit)) as err:
        sys.exit(err.exit_code)
    except (typer.Abort, getattr(_click_errors, "Abort", typer.Abort)):
        _fail("aborted")
    except BrokenPipeError:  # e.g. `raretask show --json | head`
        sys.exit(0)
    except OSError as err:  # the environment, not a bug: disk full, no permission, read-only
        if err.errno not in _ENVIRONMENT_ERRNOS:
            raise
        _fail(f"{err.filename + ': ' if err.filename else ''}{err.strerror}")
    sys.exit(rc if isinstance(rc, int) else 0)


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                       errno.EMFILE, errno.ENAMETOOLONG}
