"""`make demo`: the study in a few minutes on a laptop CPU.

1. Theory on the paper's setting (K = 32, 32 features, alpha = 2, beta = 1.5).
2. A phase grid (widths x seeds) trained with the batched toy trainer, compared with Theorem 3.
3. Matched-frequency injection, narrow vs wide: the narrow model forgets between injections, the
   wide one accumulates.
4. Figures: the phase diagram against the Theorem 3 staircase and the injection traces.

The two experiments are ordinary run directories (``raretask show DIR`` works on them) made from
the built-in configs in ``raretask/configs/``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from raretask.config import load_experiment
from raretask.predict import predict
from raretask.report.analysis import agreement_by_width, injection_contrast
from raretask.report.figures import injection_traces, phase_diagram
from raretask.runs.grid import GridRun, load_summary
from raretask.theory import TaskSet

DEMO_CONFIGS = ("demo_phase.yaml", "demo_injection.yaml")


def builtin_config(name: str) -> Path:
    """Path of a packaged config (``demo_phase.yaml``, ``demo_injection.yaml``)."""
    return Path(str(resources.files("raretask") / "configs" / name))


def run_demo(out: Path, console: Console, progress_factory, overrides: list[str] = ()) -> dict:
    """Run the demo into ``out``; returns the numbers it printed (for tests)."""
    out = Path(out)
    console.rule("[bold]1. Theory[/]: the paper's setting, K = 32, 32 features, alpha 2, beta 1.5")
    ts = TaskSet.power_law(32, 32, alpha=2.0, beta=1.5)
    theory = Table(show_header=True)
    for col in ("width", "tasks learned", "rarest task: first width", "critical width",
                "share it needs", "x today's"):
        theory.add_column(col, justify="right")
    for width in (32, 64, 128):
        rep = predict(ts, width, index_names=True)
        rare = rep.rows[-1]
        theory.add_row(str(width), f"{sum(r.learned for r in rep.rows)}/32",
                       str(rare.first_feature_width), str(rare.critical_width),
                       f"{100 * rare.required_frequency:.3f}%",
                       f"{rare.required_frequency / rare.frequency:.2f}")
    console.print(theory)

    results: dict = {}
    phase_dir, inj_dir = out / "phase", out / "injection"
    for label, name, run_dir in (("2. Phase diagram", DEMO_CONFIGS[0], phase_dir),
                                 ("3. Matched-frequency injection", DEMO_CONFIGS[1], inj_dir)):
        grid = load_experiment(builtin_config(name), list(overrides))
        console.rule(f"[bold]{label}[/]: {name} -> {run_dir}")
        runner = GridRun(grid, run_dir)
        with progress_factory() as progress:
            runner.run(progress=progress)

    rows = load_summary(phase_dir)
    table = Table(title="Tasks learned (normalised signal >= 0.3) vs Theorem 3, per width")
    for col in ("width", "seeds", "learned (mean)", "predicted", "agreement"):
        table.add_column(col, justify="right")
    per_width = agreement_by_width(rows)
    for w in per_width:
        table.add_row(str(w.width), str(w.seeds), f"{w.learned:.1f}", str(w.predicted),
                      f"{100 * w.agreement:.0f}%")
    overall = sum(r["agree"] for r in rows) / len(rows)
    table.caption = f"overall agreement over (cell, task) pairs: {100 * overall:.1f}%"
    console.print(table)
    results["agreement"] = overall
    results["per_width"] = per_width

    inj_rows = load_summary(inj_dir)
    contrast = injection_contrast(inj_dir, inj_rows)
    table = Table(title="Rare task around injections (normalised signal)")
    for col in ("width", "seed", "gap G", "injections", "rise at injection",
                "left before next", "early -> late", "final"):
        table.add_column(col, justify="right")
    for c in contrast:
        table.add_row(str(c.width), str(c.seed), str(c.gap), str(c.injections), f"{c.rise:+.3f}",
                      f"{c.trough:+.3f}", f"{c.first_trough:+.3f} -> {c.last_trough:+.3f}",
                      f"{c.final:+.3f}")
    table.caption = ("narrow: rises at each injection, falls back before the next (update and "
                     "forget); wide: what is left accumulates")
    console.print(table)
    results["injection"] = contrast

    console.rule("[bold]4. Figures[/]")
    figs = [
        phase_diagram(rows, phase_dir / "figures" / "phase_diagram.png",
                      title="Demo: learned signal vs Theorem 3"),
        injection_traces(inj_dir, inj_rows, inj_dir / "figures" / "injection_traces.png"),
    ]
    for f in figs:
        if f is not None:
            console.print(f"wrote {f}")
    results["figures"] = [f for f in figs if f is not None]
    results["fix"] = run_fix_section(out / "fix", console, progress_factory, list(overrides))
    results["report"] = write_demo_report(out, console)
    return results


def run_fix_section(out: Path, console: Console, progress_factory,
                    overrides: list[str] = ()) -> list[dict]:
    """5. Fix: plan the mixture for the width-16 model and prove it by training (built-in
    ``demo_fix.yaml``, an ordinary toy grid with an ``arm`` axis; ``--set`` overrides apply to
    it as to the other demo grids)."""
    from raretask.mixing.prove import prove

    grid = load_experiment(builtin_config("demo_fix.yaml"), list(overrides))
    console.rule(f"[bold]5. Fix[/]: plan the mixture, then train it -> {out}")
    with progress_factory() as progress:
        table, files = prove(grid, out, progress)
    console.print(table)
    return files["results.json"]  # one dict per arm (raretask.mixing.fix.ArmResult)


def write_demo_report(out: Path, console: Console) -> Path:
    """The demo's HTML report, ``out/report.html``: the phase and injection runs, and every
    other directory under ``out`` holding a ``fix.json`` (the fix flow's result)."""
    from raretask.report.fix import FIX_FILE
    from raretask.report.html import write_report

    out = Path(out)
    dirs = [out / "phase", out / "injection"]
    dirs += [d for d in sorted(out.iterdir()) if d.is_dir() and d not in dirs
             and (d / FIX_FILE).exists()]
    path = write_report(dirs, out / "report.html", title="raretask demo report",
                        command=f"raretask demo --out {out}")
    console.rule("[bold]Report[/]")
    console.print(f"report: {path}  (one self-contained page; open it in a browser)")
    return path
