"""The fix's language-model half: ``raretask fix configs/fix_lm.yaml --out DIR``.

``fix_lm.yaml`` is an ordinary LM grid (``kind: lm``, :class:`raretask.lm.config.LMCell`) whose
axes hold the arms: ``size`` (the small model and the bigger one), ``rate`` (the natural
rate and the planned one) and ``every`` (1: spread evenly; > 1: the same rate in bursts). The grid
runs and resumes like any other (:mod:`raretask.studies.lm`); this module labels its cells as
arms and gives ``raretask fix`` one table and ``fix.json`` for the report
(:mod:`raretask.report.fix`).

Labels: the smallest size at the lowest frequency, spread, is "natural"; the smallest size at a
higher frequency, spread, is "plan"; a larger size at the lowest frequency, spread, is "big";
any cell with ``every`` > 1 is "burst". Other cells are shown with their settings. Compute is
``6 N T`` (non-embedding parameters x training tokens).
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table


def label_rows(rows: list[dict]) -> list[str]:
    params = sorted({r["params"] for r in rows})
    freqs = sorted({r["requested_frequency"] or r["frequency"] for r in rows})
    out = []
    for r in rows:
        f = r["requested_frequency"] or r["frequency"]
        spread = r["schedule"] == "spread"
        small = r["params"] == params[0]
        if not spread:
            out.append(f"burst ({r['schedule']})")
        elif small and f == freqs[0]:
            out.append("natural")
        elif small:
            out.append("plan")
        elif f == freqs[0]:
            out.append("big")
        else:
            out.append("big + plan")
    return out


def fix_lm_table(rows: list[dict], title: str) -> Table:
    labels = label_rows(rows)
    base = next((r for r, lab in zip(rows, labels, strict=True) if lab == "natural"), rows[0])
    base_flops = 6 * base["params"] * base["tokens"]
    table = Table(title=f"{title}: fix on the language model", box=box.SIMPLE_HEAD)
    for c in ("arm", "size", "params", "freq/tok", "schedule", "test acc", "task L", "val L",
              "compute"):
        table.add_column(c, justify="left" if c == "arm" else "right")
    for r, lab in zip(rows, labels, strict=True):
        acc = r.get("test_accuracy")
        flops = 6 * r["params"] * r["tokens"]
        table.add_row(lab, r["size"], f"{r['params'] / 1e6:.2f}M", f"{r['frequency']:.2e}",
                      r["schedule"], "-" if acc is None else f"{acc:.3f}",
                      "-" if r.get("task_loss") is None else f"{r['task_loss']:.3f}",
                      "-" if r.get("val_loss") is None else f"{r['val_loss']:.3f}",
                      f"{flops:.3g} ({flops / base_flops:.2f}x)")
    table.caption = ("test acc: held-out accuracy on the rare task; task L: its loss at the "
                     "label; val L: background validation loss (the frequent data); compute: "
                     "6 x non-embedding params x tokens")
    return table


def fix_lm_json(rows: list[dict]) -> dict:
    labels = label_rows(rows)
    return {"task": rows[0]["task"],
            "note": "language model: natural vs planned frequency vs a bigger model; bursts at "
                    "equal frequency",
            "rows": [{"label": lab, "size": r["size"], "params": float(r["params"]),
                      "frequency": float(r["frequency"]), "steps": int(r["steps"]),
                      "tokens": float(r["tokens"]), "test_accuracy": r.get("test_accuracy"),
                      "task_loss": r.get("task_loss"), "learned": None,
                      "run": "."} for r, lab in zip(rows, labels, strict=True)]}


def lm_fix_outputs(out: Path):
    """(the fix table, {"fix.json": ...}) of a finished LM fix grid."""
    from raretask.runs.grid import load_summary

    rows = load_summary(out)
    return fix_lm_table(rows, str(out)), {"fix.json": fix_lm_json(rows)}
