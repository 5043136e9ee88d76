"""The learnability law's tables for the report: cross-validated and held-out accuracy, and every
held-out cell, read off a `raretask calibrate` file.

Each table is a dict with the fields of :class:`raretask.report.build.Table` (``caption``,
``columns``, ``rows`` of formatted strings, ``name``), so the report builds it with
``Table(**d)``; this module does not import the report's builder.

Example
-------
>>> from raretask.mixing.calibrate import load_calibration
>>> tables = calibration_tables(load_calibration("benchmarks/results/lm_calibration.json"))
>>> [t["name"] for t in tables]
['calibration-accuracy', 'calibration-laws']
"""

from __future__ import annotations


def _f(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def calibration_tables(cal) -> list[dict]:
    """Tables of one :class:`~raretask.mixing.calibrate.CalibrationFile`."""
    acc_rows = []
    for s in [*cal.cross_validation, *cal.holdout_scores]:
        n = s.right + s.wrong
        scheme = s.scheme if s.scheme != "held out" else \
            f"held out: {', '.join(cal.holdout_sources)}"
        acc_rows.append([s.task, scheme, f"{s.right}/{n}" if n else "-",
                         f"{100 * s.accuracy:.0f}%" if n else "-", str(s.band), str(s.unfitted)])
    tables = [{
        "caption": f"Learnability law fitted on {', '.join(cal.sources)}: cells called right "
                   "when left out of the fit (P(learned) in 0.4-0.6: too close to call, counted "
                   "apart; 'not fitted': the task has no threshold)",
        "columns": ["task", "scheme", "right", "accuracy", "in band", "not fitted"],
        "rows": acc_rows, "name": "calibration-accuracy"}]
    law_rows = []
    for law in cal.laws:
        r = law.ranges
        law_rows.append([law.task, law.kind, f"{law.learned_cells}/{law.cells}",
                         law.threshold_law() if law.kind == "logistic" else "-",
                         f"{r.params[0]:.3g}..{r.params[1]:.3g}",
                         f"{r.tokens[0]:.3g}..{r.tokens[1]:.3g}",
                         f"{r.frequency[0]:.3g}..{r.frequency[1]:.3g}"])
    tables.append({
        "caption": f"The law per task (f in {cal.units.frequency}, N {cal.units.size}, D "
                   f"{cal.units.budget}); warnings: {'; '.join(cal.warnings) or 'none'}",
        "columns": ["task", "law", "learned", "threshold", "sizes", "budgets", "frequencies"],
        "rows": law_rows, "name": "calibration-laws"})
    if cal.holdout:
        tables.append({
            "caption": "Every held-out cell: measured vs predicted",
            "columns": ["source", "task", "size", "tokens", "frequency", "schedule", "seed",
                        "score", "learned", "P(learned)", "call"],
            "rows": [[h.source, h.task, h.size, f"{h.tokens:.3g}", f"{h.frequency:.3g}",
                      h.schedule, str(h.seed), f"{h.score:.3f}", "yes" if h.learned else "no",
                      _f(h.probability), h.verdict] for h in cal.holdout],
            "name": "calibration-holdout"})
    return tables
