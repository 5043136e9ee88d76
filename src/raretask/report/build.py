"""The report's content: read finished run directories, draw every figure, make every table.

:func:`build_report` turns directories into a :class:`Report` (sections of figures and tables,
all numbers computed by :mod:`raretask.report.analysis` from the rows ``raretask show`` prints);
:mod:`raretask.report.html` writes it as one self-contained page. Inputs are checked first, so a
bad directory fails with one line naming it before anything is drawn or written.

Sections follow the paper's figures: Fig. 1 (scaling classification), Fig. 2 (phase diagram),
Fig. 3 (residual vs rare signal), Fig. 4 (injection), Figs. 5-9 (language models), the fix table.
A section with nothing to show says what input would fill it.

Example
-------
>>> report = build_report(["runs/demo/phase", "runs/demo/injection"])  # doctest: +SKIP
>>> [s.title for s in report.sections]  # doctest: +SKIP
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raretask.errors import UserError
from raretask.report import analysis, figures
from raretask.report.fix import FIX_FILE, FixResult, load_fix
from raretask.runs import manifest, store
from raretask.studies import DEFAULT_KIND, STUDIES, all_studies, study

PAPER_LAW = {"L0": 1.69, "A": 406.4, "B": 410.7, "a": 0.46, "b": 0.51}
"""The law drawn when no scaling measurements are given: the exponents the paper quotes
(a ~ 0.46, b ~ 0.51, PAPER.md Sec. 1) with Chinchilla's published coefficients (L0, A, B)."""

PAPER_SIZES = (4e6, 20e6, 300e6, 1e9, 4e9)
"""The OLMo sizes of the paper's language-model study, classified under :data:`PAPER_LAW`."""


# -- content ------------------------------------------------------------------------------------
@dataclass
class Figure:
    """A PNG with its caption: what it shows, the config and the command that made it."""

    title: str
    png: bytes
    caption: str
    source: list[str] = field(default_factory=list)  # lines "config ... / made by ..."


@dataclass
class Table:
    """Rows of already formatted cells (strings, as ``raretask show`` prints them)."""

    caption: str
    columns: list[str]
    rows: list[list[str]]
    name: str = ""  # a stable identifier (HTML id), e.g. "digest-0"


@dataclass
class Section:
    """One section of the page; ``empty`` says why there is nothing when there is nothing."""

    key: str
    title: str
    intro: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    empty: str = ""

    @property
    def has_data(self) -> bool:
        return bool(self.figures or self.tables)


@dataclass
class RunInput:
    """A finished run directory (or a directory holding only a ``fix.json``)."""

    path: Path
    kind: str | None  # the experiment's study ("toy", "lm"); None for a bare fix.json
    name: str
    config: dict[str, Any]
    config_text: str
    version: str
    rows: list[dict]
    cells: dict[int, dict]
    metrics: dict
    fix: FixResult | None = None
    cell_total: int | None = None  # set when the grid is unfinished (``--partial``): its size

    @property
    def partial(self) -> bool:
        return self.cell_total is not None

    @property
    def cells_done(self) -> int:
        return len({r["cell"] for r in self.rows})

    @property
    def label(self) -> str:
        """The name figures and tables carry: an unfinished grid says so on each of them."""
        if not self.partial:
            return self.name
        return f"{self.name} (PARTIAL: {self.cells_done} of {self.cell_total} cells)"

    @property
    def made_by(self) -> str:
        """The command that made this run (the resolved config reproduces it exactly)."""
        if self.name.startswith("demo_"):
            return f"raretask demo --out {shlex.quote(str(self.path.parent))}"
        if self.fix_only and not self.config:
            return "the fix flow (no config.yaml beside fix.json)"
        verb = "fix" if self.fix is not None else "run"
        return (f"raretask {verb} {shlex.quote(str(self.path / 'config.yaml'))} "
                f"--out {shlex.quote(str(self.path))}")

    @property
    def fix_only(self) -> bool:
        """A directory holding a fix result and no grid (made before the arms were a grid)."""
        return self.kind is None

    @property
    def axes(self) -> str:
        """The swept config fields and their values, e.g. ``width [8, 16], seed [0, 1]``."""
        parts = [f"{k} {v}" for k, v in self.config.items() if isinstance(v, list)]
        return ", ".join(parts) if parts else "a single cell"

    def source(self) -> list[str]:
        lines = [f"config: {self.name} ({self.path / 'config.yaml'}; axes: {self.axes})",
                 f"made by: {self.made_by}" + (f"  [{self.version}]" if self.version else "")]
        if self.partial:  # said on every figure and table the run feeds, not once on the page
            lines.append(f"PARTIAL: {self.cells_done} of {self.cell_total} cells finished; "
                         "missing cells are absent from every figure and table (raretask "
                         "report --partial)")
        return lines


@dataclass
class Report:
    title: str
    inputs: list[RunInput]
    sections: list[Section]
    command: str


# -- inputs -------------------------------------------------------------------------------------
def load_run(path: str | Path, partial: bool = False) -> RunInput:
    """Check and read one directory; every problem is a one-line UserError naming the path.

    ``partial`` reads a grid still being filled (call by call on a GPU) from the cells it has
    finished, and marks the run so that every source line says so; without it such a run is
    refused."""
    from raretask.runs.grid import load_summary

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (give a run directory)")
    fix = load_fix(path / FIX_FILE) if (path / FIX_FILE).exists() else None
    cfg_path = path / "config.yaml"
    if not cfg_path.exists() and fix is None:
        raise UserError(f"{path}: not a raretask run directory (no config.yaml)")
    text, config = "", {}
    manifest.check_copies(path)  # settings read from an edited copy would mislabel results
    if cfg_path.exists():
        try:
            text = cfg_path.read_text(encoding="utf-8")
            config = yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise UserError(f"{cfg_path}: unreadable config ({type(err).__name__})") from None
        if not isinstance(config, dict):
            raise UserError(f"{cfg_path}: expected a mapping of config fields")
    if fix is not None and not (path / "cells.json").exists():
        # an older fix flow's directory (config.yaml of kind fix_toy and fix.json, no grid)
        return RunInput(path, None, str(config.get("name", path.name)), config, text, "", [],
                        {}, {}, fix)
    kind = config.get("kind", DEFAULT_KIND)
    if not isinstance(kind, str) or kind not in STUDIES:
        raise UserError(f"{cfg_path}: kind: the report reads {', '.join(STUDIES)} runs, got "
                        f"{kind!r}")
    cells = store.read_cells(path)
    try:
        rows = load_summary(path)
    except UserError:  # already one line naming the file (a damaged result, say)
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}/groups: malformed summary.json ({type(err).__name__})") from None
    done = len({r["cell"] for r in rows})
    unfinished = done < len(cells) or not (path / "summary.json").exists()
    if unfinished and not (partial and rows):
        hint = "" if partial else " (or pass --partial to draw the cells finished so far)"
        raise UserError(f"{path}: run not finished ({done} of {len(cells)} cells); finish it with"
                        f" raretask run {path / 'config.yaml'} --out {path}{hint}")
    try:
        metrics = analysis.load_metrics(path, partial=unfinished)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path / 'metrics.parquet'}: unreadable ({type(err).__name__})") from None
    version = ""
    log = path / "log.txt"
    if log.exists():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if " start: " in line:
                version = line.split(" start: ", 1)[1].split(",", 1)[0]
    return RunInput(path, kind, str(config.get("name", path.name)), config, text, version, rows,
                    cells, metrics, fix, len(cells) if unfinished else None)


# -- sections -----------------------------------------------------------------------------------
_fmt = analysis.format_cell  # exactly ``raretask show``'s cell format


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None or v != v else format(v, spec)


def _scalar(v) -> float | None:
    """A config value that is one number (not a grid axis), else None."""
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _setting_key(r: dict) -> tuple:
    return (r["tasks"], r["features_per_task"], r["alpha"], r["beta"], r.get("frequent_mass"))


def _setting_title(r: dict) -> str:
    return (f"K = {r['tasks']} tasks x {r['features_per_task']} features, alpha {r['alpha']:g}, "
            f"beta {r['beta']:g}")


def scaling_section(csv: Path | None) -> Section:
    """Fig. 1: fitted law (``raretask scaling CSV``) or the paper's quoted law, Definition 1."""
    from raretask.scaling import ScalingFit, classify, load_scaling_csv, max_data_scalable_ratio

    sec = Section("scaling", "Fig. 1: scaling classification",
                  "Under L(N, D) = L0 + A/N^a + B/D^b a model of size N reaches L_C(N) with "
                  "compute-optimal data and L_inf(N) with unlimited data. A smaller model can "
                  "match a larger one's compute-optimal loss by data scaling only when "
                  "L_inf(N_s) < L_C(N_l) (Definition 1); otherwise only a bigger model helps.")
    if csv is not None:
        data = load_scaling_csv(csv)
        law = data.fit()
        sizes = sorted(set(float(p) for p in data.params))
        source = [f"data: {csv} ({law.n_points} rows)",
                  f"made by: raretask scaling {shlex.quote(str(csv))} --json"]
        what = f"fitted to {csv}"
    else:
        law = ScalingFit(**PAPER_LAW)
        sizes = list(PAPER_SIZES)
        source = ["data: none given (--scaling CSV); the law the paper quotes (a 0.46, b 0.51) "
                  "with Chinchilla's L0, A, B",
                  "made by: raretask report (theory only: no run, no data)"]
        what = "the paper's quoted law (no measurements given: pass --scaling CSV)"
    pairs = classify(law, sizes, 0.0)
    ratio = max_data_scalable_ratio(law)
    png = figures.png_bytes(figures.scaling_figure(law, sizes, pairs, f"Scaling law: {what}"))
    sec.figures.append(Figure(
        "Loss laws and Definition 1", png,
        f"Left: L_C(N) (solid) and L_inf(N) (dashed) for L = {law.L0:.4g} + {law.A:.4g}/N^"
        f"{law.a:.3f} + {law.B:.4g}/D^{law.b:.3f}; the shaded widths cannot reach the largest "
        f"size's compute-optimal loss with any amount of data. Right: each pair (N_s, N_l) "
        f"classified; a pair is data-scalable exactly when N_l / N_s < {ratio:.3g}.", source))
    sec.tables.append(Table(
        f"Definitions 1 and 2 (eps = 0), {what}: the numbers `raretask scaling --json` prints",
        ["small N_s", "large N_l", "L_C(N_s) - L_C(N_l)", "L_inf(N_s) - L_C(N_l)",
         "learnable via", "N_s*(0)"],
        [[f"{p.small:.3g}", f"{p.large:.3g}", f"{p.gap_compute_optimal:.4f}",
          f"{p.gap_infinite_data:.4f}", "data scaling" if p.verdict == "data" else
          "model scaling", f"{p.critical_small_size:.3g}"] for p in pairs], "scaling"))
    return sec


def phase_section(runs: list[RunInput]) -> Section:
    sec = Section("phase", "Fig. 2: phase diagram vs Theorem 3",
                  "Per width and task, the normalised signal s~ the trained encoder holds (1 = "
                  "the task's whole block, 0 = a random encoder); the red staircase is Theorem "
                  "3: each task is learned to the right of the width at which its first "
                  "feature enters the top-N utilities.",
                  empty="No toy run with i.i.d. sampling and two or more widths: run e.g. "
                  "`raretask run configs/fig2_phase.yaml --out runs/fig2` and pass the "
                  "directory.")
    for i, run in enumerate(runs):
        iid = [r for r in run.rows if r["schedule"] == "iid"]
        if not iid:
            continue
        fig = figures.phase_diagram_figure(iid, f"{run.label}: learned signal vs Theorem 3")
        if fig is not None:
            sec.figures.append(Figure(
                f"Phase diagram: {run.label}", figures.png_bytes(fig),
                "Colour: final s~ of task k (rows, 1 = most frequent) at width N (columns), "
                f"mean over seeds; learned means s~ >= {run.config.get('learned_threshold')}. "
                "Red: Theorem 3's prediction (learned to the right of the line).", run.source()))
        per_width = analysis.agreement_by_width(iid)
        sec.tables.append(Table(
            f"{run.label}: tasks learned vs Theorem 3 per width (seeds pooled)",
            ["width", "beta", "alpha", "seeds", "learned (mean)", "predicted", "agreement"],
            [[str(w.width), f"{w.beta:g}", f"{w.alpha:g}", str(w.seeds), f"{w.learned:.1f}",
              str(w.predicted), f"{100 * w.agreement:.0f}%"] for w in per_width],
            f"agreement-{i}"))
    return sec


def show_table(run: RunInput, name: str) -> Table:
    """The run's table exactly as ``raretask show DIR`` prints it (the study draws it once)."""
    t = study(run.kind).table(run.rows, str(run.path), cells=run.cells)
    return Table(f"{t.title}, as `raretask show {run.path}` prints it. {t.caption}".rstrip(),
                 t.columns, t.rows, name)


def residual_section(runs: list[RunInput]) -> Section:
    sec = Section("residual", "Fig. 3: frequent residual vs rare signal",
                  "Theorem 4 bounds the frequent tasks' gradient by their residual delta_F; "
                  "Prop. 6 says the rarest task survives only once the width passes its "
                  "critical width. Wide models drive delta_F down, and only then does the rare "
                  "signal rise.",
                  empty="No toy run with i.i.d. sampling: run e.g. `raretask run "
                  "configs/fig3_residual.yaml --out runs/fig3` and pass the directory.")
    for run in runs:
        iid = [r for r in run.rows if r["schedule"] == "iid"]
        settings: dict[tuple, list[dict]] = {}
        for r in iid:
            settings.setdefault(_setting_key(r), []).append(r)
        for rs in settings.values():
            fig = figures.residual_figure(rs, run.metrics, f"{run.label}: {_setting_title(rs[0])}",
                                          _scalar(run.config.get("learned_threshold")))
            if fig is None:
                continue
            sec.figures.append(Figure(
                f"Residual and rare signal: {run.label}, {_setting_title(rs[0])}",
                figures.png_bytes(fig),
                "(a) final frequent residual delta_F = Tr((I - P_U) M_F) per width (dots: seeds) "
                "against Theorem 3's optimum; (b) the rarest task's final s~ with its Prop. 6 "
                "critical width and Theorem 3 first-feature width; (c) each width's path "
                "through (delta_F, rare s~) at the logged steps, mean over seeds, final point "
                "marked.", run.source()))
    return sec


def injection_section(runs: list[RunInput]) -> Section:
    sec = Section("injection", "Fig. 4: matched-frequency injection",
                  "The rare task is withheld for G steps, then G x batch x pi_r samples arrive "
                  "in one batch: the same long-run frequency at every gap. Narrow models learn "
                  "at each injection and forget before the next (update-and-forget); wide ones "
                  "keep what they learned.",
                  empty="No toy run with an injection schedule: run e.g. `raretask run "
                  "configs/fig4_injection.yaml --out runs/fig4` and pass the directory.")
    for i, run in enumerate(runs):
        inj = [r for r in run.rows if r["schedule"] != "iid"]
        if not inj:
            continue
        fig = figures.injection_traces_figure(run.path, inj)
        if fig is not None:
            sec.figures.append(Figure(
                f"Injection traces: {run.label}", figures.png_bytes(fig),
                "The rarest task's normalised signal s~ at every traced step, one panel per "
                "(gap G, width N), seeds overlaid; grey lines mark injections, the dotted line "
                "is the floor of an encoder holding none of the rare block (panels scaled one "
                "by one).", run.source()))
        fig = figures.injection_sweep_figure(inj, run.metrics, f"{run.label}: gap x width")
        if fig is not None:
            sec.figures.append(Figure(
                f"Gap x width sweep: {run.label}", figures.png_bytes(fig),
                "Left: the rare task's final s~ against the gap G (dots: seeds; line: mean). "
                "Right: cosine between a rare-only and a frequent-only batch gradient on the "
                "encoder, mean over the logged steps.", run.source()))
        fig = figures.gradient_cosine_figure(inj, run.metrics,
                                             f"{run.label}: rare vs frequent gradient cosine")
        if fig is not None:
            sec.figures.append(Figure(
                f"Gradient cosines: {run.label}", figures.png_bytes(fig),
                "Cosine between the gradient on U of a rare-only batch and of a frequent-only "
                "batch at each logged step, one line per cell, coloured by width.",
                run.source()))
        contrast = analysis.injection_contrast(run.path, inj)
        if contrast:
            sec.tables.append(Table(
                f"{run.label}: rare task around injections (normalised signal). rise: mean jump "
                "from just before an injection to the peak after it; left before next: mean "
                "signal just before each injection; early -> late: the same over the first and "
                "last quarter of injections.",
                ["width", "seed", "gap G", "injections", "rise at injection", "left before next",
                 "early -> late", "final"],
                [[str(c.width), str(c.seed), str(c.gap), str(c.injections), f"{c.rise:+.3f}",
                  f"{c.trough:+.3f}", f"{c.first_trough:+.3f} -> {c.last_trough:+.3f}",
                  f"{c.final:+.3f}"] for c in contrast], f"contrast-{i}"))
    return sec


_NO_LM = ("No language-model run given: run e.g. `raretask run configs/fig5_lm_heatmap.yaml "
          "--out runs/fig5` (any config with kind: lm) and pass the directory.")


def lm_sections(runs: list[RunInput]) -> list[Section]:
    heat = Section("lm-heatmap", "Fig. 5: language models, size x frequency",
                   "Final test accuracy and task loss of the injected task for each model size "
                   "and frequency: only larger models learn the rare frequencies.", empty=_NO_LM)
    order = Section("lm-order", "Fig. 6: frequency order and gaps",
                    "Tasks are learned in frequency order; at one long-run frequency, longer "
                    "gaps between injections leave a higher task loss.", empty=_NO_LM)
    presence = Section("lm-presence", "Fig. 7: feature presence",
                       "T_CMP's hidden order is read off the first layer's residual stream "
                       "(leave-one-out R^2 on the top principal components); T_ADD's Fourier "
                       "modes are counted across layers. Presence tracks test accuracy.",
                       empty=_NO_LM)
    retention = Section("lm-retention", "Figs. 8-9: retention and gradient cosines",
                        "Task loss over training (retention), and the cosine of the batch "
                        "gradient g, its task-token part g_t and its other-token part g_nt with "
                        "the task's reference gradient g_r on the top-K first-layer MLP "
                        "neurons: in a big model the other tokens' updates stop colliding with "
                        "the task (cos(g_nt, g_r) near 0).", empty=_NO_LM)
    for i, run in enumerate(runs):
        rows, m, src = run.rows, run.metrics, run.source()
        heat.tables.append(show_table(run, f"lm-{i}"))
        # (section, figure, title, caption): a figure whose data the run lacks is left out
        panels = [
            (heat, figures.lm_heatmap_figure(
                rows, run.cells, f"{run.label}: final test accuracy and task loss"),
             "Size x frequency",
             "Rows: model sizes (by parameters); columns: the task's frequency per training "
             "token and its schedule ('k/n burst': k instances every n steps; 'spread': "
             "evenly); cells: mean over seeds of the final value, as in the table below."),
            (order, figures.lm_order_figure(rows, m, f"{run.label}: test accuracy over training",
                                            run.cells),
             "Learning order",
             "Test accuracy at each evaluation, a panel per task and size, a line per "
             "frequency (brighter = more frequent): the mean over seeds, the band +- sd."),
            (order, figures.lm_gap_figure(rows, run.cells,
                                          f"{run.label}: matched-frequency gaps"),
             "Gap sweep",
             "Final task loss against the gap N (N instances every N steps, same long-run "
             "frequency), a line per size and task."),
            (presence, figures.lm_grokking_figure(rows, m, run.cells,
                                                  f"{run.label}: T_ADD train vs test accuracy"),
             "Grokking",
             "Accuracy on the training pairs (dashed) and the held-out pairs (solid) at each "
             "evaluation, a panel per T_ADD setting, a colour per size, the mean over seeds "
             "(band: +- sd of the test curve): memorisation is the train curve rising alone, "
             "grokking the test curve following it later; dotted: 0.9."),
            (presence, figures.lm_presence_figure(rows, m, f"{run.label}: feature presence",
                                                  run.cells),
             "Feature presence",
             "order_r2 (T_CMP) and fourier_modes (T_ADD; and fourier_modes_embedding, the "
             "same count on the symbols' token embeddings, where recorded) at each evaluation "
             "next to test accuracy; the mean over seeds (band +- sd), a colour per size; with "
             "several frequencies a row per task and metric, a panel per frequency."),
            (retention, figures.lm_retention_figure(rows, m,
                                                    f"{run.label}: task loss over training",
                                                    run.cells),
             "Task loss over training",
             "Loss at LABEL on the training instances and on the held-out instances at each "
             "evaluation; the mean over seeds (band +- sd), a colour per size; with several "
             "frequencies a row per task and loss, a panel per frequency. The "
             "losses around each injection (Fig. 8) are the 'Retention around bursts' panel "
             "of a run with traced windows."),
            (retention, figures.lm_burst_retention_figure(
                rows, m, run.cells, f"{run.label}: task loss around injections"),
             "Retention around bursts",
             "Fig. 8: the task loss at every step of the last traced injection cycle (offset 0: "
             "just before the burst; the burst is trained between 0 and 1), the mean over seeds "
             "with a +- sd band, a colour per size and a line style per gap; right: per size "
             "the drop at an injection (before - after) and the rebound over the gap (end - "
             "after), as in the table below. Bursts within the learning-rate warm-up are left "
             "out of both (the task loss moves with the ramping rate there)."),
            (retention, figures.lm_cosine_figure(rows, m,
                                                 f"{run.label}: gradient cosines with g_r",
                                                 run.cells),
             "Gradient cosines",
             "cos(g, g_r), cos(g_t, g_r) and cos(g_nt, g_r) at each evaluation (the probe's "
             "batch at that step), and cos(g, g_r) on the next batch with no task instance "
             "(between injections): the mean over seeds with a +- sd band, a colour per size; "
             "with several settings a row per task and cosine, a panel per setting."),
        ]
        for section, fig, title, caption in panels:
            if fig is not None:
                section.figures.append(Figure(f"{title}: {run.label}", figures.png_bytes(fig),
                                              caption, src))
        from raretask.report.lm_seeds import seed_tables

        for j, t in enumerate(seed_tables(rows, run.cells, m)):
            where = retention if t.key == "retention" else heat
            where.tables.append(Table(f"{run.label}: {t.title}", t.columns, t.rows,
                                      f"lm-seeds-{i}-{j}"))
        by_cell = {r["cell"]: r for r in rows}
        stats = analysis.lm_cosine_stats(m, sorted(by_cell))
        if stats:
            retention.tables.append(Table(
                f"{run.label}: gradient cosines, mean +- sd over evaluations after step 0 (the "
                "paper quotes cos(g, g_r) 0.08 +- 0.02 at 1B and cos(g_nt, g_r) 0.10 +- 0.09 at "
                "20M)",
                ["cell", "size", "task", "freq/tok", "schedule", "evals", "cos(g, g_r)",
                 "cos(g_t, g_r)", "cos(g_nt, g_r)"],
                [[str(s.cell), by_cell[s.cell]["size"], by_cell[s.cell]["task"],
                  f"{by_cell[s.cell]['frequency']:.2e}", by_cell[s.cell]["schedule"],
                  str(s.evaluations), f"{_f(s.g_mean, '+.3f')} +- {_f(s.g_sd, '.3f')}",
                  f"{_f(s.gt_mean, '+.3f')} +- {_f(s.gt_sd, '.3f')}",
                  f"{_f(s.gnt_mean, '+.3f')} +- {_f(s.gnt_sd, '.3f')}"] for s in stats],
                f"cosines-{i}"))
        from raretask.report.lm_seeds import COSINES, lm_cosine_over_seeds

        over_seeds = lm_cosine_over_seeds(m, rows, run.cells)
        if over_seeds:
            retention.tables.append(Table(
                f"{run.label}: gradient cosines over seeds, mean and 95% interval (t, n - 1 "
                "degrees of freedom) of the seeds' means over their evaluations from a quarter "
                "of the run on (the paper quotes cos(g_nt, g_r) 0.10 +- 0.09 at 20M, ~0 at 1B; "
                "its sign convention may be the opposite of ours, docs/lm_study.md)",
                ["size", "task", "freq/tok", "schedule", "seeds", "from step"]
                + [label for _, label in COSINES],
                [[o.setting["size"], o.setting["task"], f"{o.setting['frequency']:.2e}",
                  ", ".join(filter(None, (o.setting["schedule"], o.setting["other"]))),
                  str(o.seeds), str(o.from_step)]
                 + [o.text(metric) for metric, _ in COSINES] for o in over_seeds],
                f"cosines-seeds-{i}"))
    if runs:
        if not order.figures:
            order.empty = ("The language-model runs logged no test accuracy over training.")
        if not presence.figures:
            presence.empty = ("No feature-presence metrics (order_r2, fourier_modes) in the "
                              "runs: they are recorded when `probes: true`.")
        if not retention.figures:
            retention.empty = "No task-loss or gradient-cosine metrics in the runs."
    return [heat, order, presence, retention]


def fix_section(runs: list[RunInput]) -> Section:
    sec = Section("fix", "The fix: natural mix vs plan vs bigger model",
                  "Raising the rare task's frequency (spread evenly) can teach the small model "
                  "what otherwise only a bigger model learns.",
                  empty=f"No fix result given: pass a directory holding a `{FIX_FILE}` (written "
                  "by the fix flow; format in raretask.report.fix).")
    for i, run in enumerate(r for r in runs if r.fix is not None):
        fix = run.fix
        every_task = any(r.tasks_learned is not None for r in fix.rows)  # issue 22: all tasks
        text = any(r.val_loss is not None for r in fix.rows)  # what the other data pay (LM)
        framed = any(r.val_loss_framed is not None for r in fix.rows)
        cost = fix.rows[0].flops is not None and any(r.flops is not None for r in fix.rows)
        sec.tables.append(Table(
            f"{run.path / FIX_FILE}: task {fix.task}" + (f". {fix.note}" if fix.note else "")
            + (". text L: held-out background text loss, and its change against the first row"
               if text else "")
            + (". framed change: the same text scored in each row's training format "
               "(val_loss_framed), against the first row" if framed else "")
            + (". compute: training FLOPs (6 N T) relative to the first row" if cost else "")
            + f". Made by `{run.made_by}`.",
            ["row", "size", "params", "frequency", "steps", "tokens", "acc", "task L",
             "learned"] + (["text L", "change"] if text else [])
            + (["framed change"] if framed else []) + (["compute"] if cost else [])
            + ["run"] + (["tasks learned", "gained", "lost"] if every_task else []),
            [[r.label, r.size, "-" if r.params is None else f"{r.params / 1e6:.2f}M",
              f"{r.frequency:.2e}", "-" if r.steps is None else str(r.steps),
              "-" if r.tokens is None else f"{r.tokens:.3g}", _fix_accuracy(r),
              "-" if r.task_loss is None else _fmt(r.task_loss), _fix_learned(r)]
             + (_fix_text_cells(r, fix.rows[0]) if text else [])
             + ([_fix_change(r, fix.rows[0], "val_loss_framed")] if framed else [])
             + ([f"{r.flops / fix.rows[0].flops:.3g}x" if r.flops is not None else "-"]
                if cost else [])
             + [r.run or "-"] + (_fix_task_cells(r) if every_task else []) for r in fix.rows],
            f"fix-{i}"))
    return sec


def _fix_accuracy(row) -> str:
    """Test accuracy, with ``± sd`` over seeds when the row has several."""
    acc = _f(row.test_accuracy, ".3f")
    if row.test_accuracy is not None and row.test_accuracy_sd is not None and (row.seeds or 1) > 1:
        acc += f" ± {row.test_accuracy_sd:.3f}"
    return acc


def _fix_learned(row) -> str:
    """The verdict, as 'k/n seeds' when the row says how many seeds learned."""
    if row.learned_seeds is not None and row.seeds is not None:
        return f"{row.learned_seeds}/{row.seeds} seeds"
    return "-" if row.learned is None else _fmt(row.learned)


def _fix_text_cells(row, first) -> list[str]:
    """Held-out text loss and its change against the first row (the natural mix)."""
    if row.val_loss is None:
        return ["-", "-"]
    return [f"{row.val_loss:.4f}", _fix_change(row, first, "val_loss")]


def _fix_change(row, first, field: str) -> str:
    """``field``'s change against the first row, '-' when either lacks it."""
    mine, theirs = getattr(row, field), getattr(first, field)
    return "-" if mine is None or theirs is None else f"{mine - theirs:+.4f}"


def _fix_task_cells(row) -> list[str]:
    """A fix row's every-task columns: how many it learns, and which it gains / loses."""
    def names(tasks):
        return "-" if not tasks else ", ".join(tasks)
    count = "-" if row.tasks_learned is None else str(len(row.tasks_learned))
    return [count, names(row.gained), names(row.lost)]


def build_report(dirs: list[str | Path], scaling_csv: str | Path | None = None,
                 title: str = "raretask report", command: str = "",
                 calibrations: list[str | Path] | tuple = (), partial: bool = False) -> Report:
    """Read every directory (all checked before anything is drawn) and make the sections;
    ``partial`` admits unfinished grids (:func:`load_run`)."""
    if not dirs:
        raise UserError("DIR: give at least one run directory")
    runs = [load_run(d, partial) for d in dirs]
    cal_section = calibration_section(calibrations)  # every file checked before drawing
    if scaling_csv is not None:
        from raretask.scaling import load_scaling_csv

        load_scaling_csv(scaling_csv)  # fail on a bad file before drawing anything
    sections = [scaling_section(None if scaling_csv is None else Path(scaling_csv))]
    for st in all_studies():  # each study's sections, from its own runs (a fix grid's arms are
        sections += st.report_sections(  # the fix section's, not a phase or frequency sweep)
            [r for r in runs if r.kind == st.kind and r.fix is None])
    sections.append(fix_section(runs))
    if calibrations:
        sections.append(cal_section)
    return Report(title, runs, sections, command)


def calibration_section(paths: list[str | Path] | tuple) -> Section:
    """The learnability law of each `raretask calibrate` file: its cross-validated and held-out
    accuracy, the fitted laws and every held-out cell (:mod:`raretask.report.calibration`)."""
    from raretask.mixing.calibrate import load_calibration
    from raretask.report.calibration import calibration_tables

    sec = Section("calibration", "Predict: the learnability law, validated on held-out runs",
                  "P(learned | size, budget, frequency) per task, fitted by `raretask "
                  "calibrate`; cells called right, leaving one cell or one size out and on "
                  "grids the fit never saw.")
    for path in paths:
        for d in calibration_tables(load_calibration(path)):
            sec.tables.append(Table(**{**d, "caption": f"{path}: {d['caption']}"}))
    return sec


def toy_sections(runs: list[RunInput]) -> list[Section]:
    """Fig. 2-4 from the toy runs; each run's `raretask show` digest closes the section it
    belongs to (phase grids: the phase diagram; injection grids: the traces)."""
    phase, residual, injection = (phase_section(runs), residual_section(runs),
                                  injection_section(runs))
    for i, run in enumerate(runs):
        target = phase if any(r["schedule"] == "iid" for r in run.rows) else injection
        target.tables.append(show_table(run, f"digest-{i}"))
    return [phase, residual, injection]
