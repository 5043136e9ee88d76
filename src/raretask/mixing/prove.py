"""`raretask fix`: run a grid that holds the fix's arms, then write what its study makes of it.

The arms are an ordinary grid of any study (the toy's ``arm`` axis, ``configs/fix_toy.yaml``; an
LM grid whose sizes and frequencies are the arms, ``configs/fix_lm.yaml``), so they run and
resume as ``raretask run`` would; the study plug-in then gives the table and the files
(``fix.json`` for the report, and the toy's ``plan.json`` and ``results.json``).
"""

from __future__ import annotations

from pathlib import Path


def prove(grid, out: Path, progress=None):
    """Run (or resume) ``grid`` in ``out`` and write the study's fix files beside it; returns
    (table, {file name: JSON object})."""
    from raretask.runs import store
    from raretask.runs.grid import GridRun
    from raretask.studies import study

    out = Path(out)
    GridRun(grid, out).run(progress=progress)
    table, files = study(grid.kind).fix_outputs(out)
    with store.run_lock(out):  # the grid's own lock is released by now
        for name, obj in files.items():
            store.write_json(out / name, obj)
    return table, files
