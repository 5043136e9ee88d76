"""The `raretask` command: one Typer app, each subcommand a thin call into the library.

Errors a user can cause (bad flag, bad file, infeasible request) end with one line on stderr,
``error: ...`` naming the field or line, and exit code 2; nothing is printed before the whole
result is ready, so a failure never leaves partial output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from raretask.errors import UserError

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
    width: Annotated[int, typer.Option("--width", "-N", help="Model width N (shared neurons).")],
    tasks: Annotated[int | None, typer.Option("--tasks", "-K", help="Number of tasks K.")] = None,
    features: Annotated[int | None, typer.Option(help="Features per task M.")] = None,
    alpha: Annotated[float, typer.Option(help="Spectrum decay: lambda_j = j^-alpha.")] = 2.0,
    beta: Annotated[float, typer.Option(help="Frequency decay: pi_k ∝ k^-beta.")] = 1.5,
    task_file: Annotated[
        Path | None,
        typer.Option("--task-file", "-f",
                     help="YAML/CSV with name, frequency|count, alpha+features|eigenvalues."),
    ] = None,
    frequent_mass: Annotated[
        float | None, typer.Option(help="Prior mass of the frequent set F (default 0.8).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Which tasks a width-N model learns (Theorem 3) and the frequency each one needs."""
    from raretask.config import load_task_file
    from raretask.predict import predict as run_predict
    from raretask.theory import DEFAULT_FREQUENT_MASS, TaskSet

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
    from raretask.scaling_report import scaling_report

    result = scaling_report(data, sizes, eps)
    if as_json:
        _print_json(result.to_json())
    else:
        result.render(console)


# -- demo --------------------------------------------------------------------------------------


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/demo"),
) -> None:
    """The main job: the theory on the paper's setting (K=32, M=32, alpha=2, beta=1.5)."""
    console.rule("raretask demo: the paper's setting, K = 32 tasks, 32 features, alpha 2, beta 1.5")
    for width in (32, 64, 128):
        predict(width=width, tasks=32, features=32, alpha=2.0, beta=1.5, task_file=None,
                frequent_mass=None, as_json=False)


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
    sys.exit(rc if isinstance(rc, int) else 0)
