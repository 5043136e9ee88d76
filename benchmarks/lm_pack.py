"""Small language-model runs packed onto one GPU: the grid's wall time, and that packing changes
no run's numbers (issue 8, item 3).

One invocation does both, on the same machine:

* **packed**: ``torchrun --standalone --nproc_per_node=P -m raretask run CONFIG --parallel cells``:
  P processes claim the grid's cells one at a time; with fewer GPUs than processes they share
  them round-robin (:func:`raretask.runs.distributed.rank_device`), so one GPU trains P runs at
  once and each run's kernel-launch gaps are filled by the others'. Timed as the whole command.
* **alone**: chosen cells (``--alone``, default the first and the last, i.e. the smallest and
  the largest model of the default grid) re-run one at a time in a single process, from a
  one-cell config holding exactly that cell's fields (read back from the packed run's
  ``cells.json``). Their metrics tables (every evaluation's every metric) must equal the packed
  run's rows of that cell: bit-equal with ``deterministic: true`` (the default profile sets it);
  the largest absolute difference is reported either way.

Writes ``OUT/lm_pack.json`` (figures, commands, device) and ``OUT/lm_pack.log`` beside the run
directories ``OUT/packed`` and ``OUT/alone_<cell>``.

    python benchmarks/lm_pack.py --out /tmp/pack     # benchmarks/lm_pack_grid.yaml, 6 processes
    python benchmarks/lm_pack.py --out /tmp/pack --procs 2 --set size=tiny \\
        --set steps=4 --set batch_size=16 --set eval_points=2 --set profile.device=cpu  # CPU check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "benchmarks" / "lm_pack_grid.yaml"
DEFAULT_PROFILE = ROOT / "benchmarks" / "lm_pack_profile.yaml"
GRID_KEYS = ("kind",)


class BenchError(Exception):
    """A bad argument or a failed step: one line, exit 2."""


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]


def _run(cmd: list[str], log, timeout: float) -> float:
    """Run ``cmd``, its output into the log; the wall seconds. A failure is a BenchError."""
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{cmd[cmd.index('run') + 1] if 'run' in cmd else cmd[0]}: "
                         f"timed out after {timeout:.0f} s") from None
    seconds = time.perf_counter() - start
    log.write(res.stdout + res.stderr)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"command failed (exit {res.returncode}): {last}")
    return seconds


def _cell_rows(run_dir: Path, cell: int) -> dict[tuple[int, int, str], float]:
    """One cell's metrics rows: (step, task, metric) -> value."""
    table = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    return {(r["step"], r["task"], r["metric"]): r["value"] for r in table if r["cell"] == cell}


def _max_abs_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over shared keys (NaN equal to NaN); inf when the keys differ."""
    if a.keys() != b.keys():
        return math.inf
    worst = 0.0
    for key, x in a.items():
        y = b[key]
        if x == y or (math.isnan(x) and math.isnan(y)):
            continue
        worst = max(worst, abs(x - y))
    return worst


def _one_cell_config(packed: Path, cell: int, path: Path) -> dict:
    """A config holding exactly cell ``cell`` of the packed run (its resolved fields)."""
    resolved = yaml.safe_load((packed / "config.yaml").read_text())
    cells = json.loads((packed / "cells.json").read_text())
    fields = {k: v for k, v in cells[cell].items() if k not in ("cell", "group")}
    body = {**{k: resolved[k] for k in GRID_KEYS if k in resolved}, **fields}
    body["name"] = f"{resolved.get('name', 'lm')}_cell{cell}"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return fields


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--profile", type=Path, default=DEFAULT_PROFILE,
                    help="execution profile of every run (raretask run --profile)")
    ap.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    ap.add_argument("--procs", type=int, default=6, help="processes sharing the GPU(s)")
    ap.add_argument("--alone", default="first,last",
                    help="cells re-run alone: comma-separated ids, 'first', 'last' or 'none'")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a config field (as raretask run --set)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    args = ap.parse_args(argv)
    try:
        return _bench(args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _bench(args) -> int:
    if args.procs < 1:
        raise BenchError(f"--procs: expected >= 1, got {args.procs}")
    if not args.config.is_file():
        raise BenchError(f"--config: {args.config}: no such file")
    from raretask.config import load_experiment
    from raretask.errors import UserError

    try:  # the grid as `raretask run` will read it: bad fields fail here, before any output
        n_cells = len(list(load_experiment(args.config, args.overrides,
                                           profile_file=args.profile).cells()))
    except UserError as err:
        raise BenchError(str(err)) from None
    picks = _pick(args.alone, n_cells)
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise BenchError(f"--out: {out} is not empty (the benchmark times a fresh run)")
    out.mkdir(parents=True, exist_ok=True)
    sets = [x for kv in args.overrides for x in ("--set", kv)]
    sets += ["--profile", str(args.profile)]
    packed = out / "packed"
    with open(out / "lm_pack.log", "w") as log:
        cmd = [*_torchrun(), "--standalone", f"--nproc_per_node={args.procs}", "-m", "raretask",
               "run", str(args.config), "--out", str(packed), "--parallel", "cells", "--quiet",
               *sets]
        packed_s = _run(cmd, log, args.timeout)
        cells = json.loads((packed / "cells.json").read_text())
        alone = []
        for cell in picks:
            cfg = out / f"alone_{cell}.yaml"
            fields = _one_cell_config(packed, cell, cfg)
            run_dir = out / f"alone_{cell}"
            seconds = _run([sys.executable, "-m", "raretask", "run", str(cfg), "--out",
                            str(run_dir), "--quiet", "--profile", str(args.profile),
                            *[x for kv in args.overrides if kv.startswith("profile.")
                              for x in ("--set", kv)]],
                           log, args.timeout)
            mine, theirs = _cell_rows(run_dir, 0), _cell_rows(packed, cell)
            diff = _max_abs_diff(mine, theirs)
            alone.append({"cell": cell, "size": fields.get("size"),
                          "rate": fields.get("rate"), "seconds": round(seconds, 2),
                          "rows": len(mine), "identical": mine == theirs or diff == 0.0,
                          "max_abs_diff": diff if math.isfinite(diff) else None})
        tokens = sum(c["steps"] * c["batch_size"] * c["seq_len"] for c in cells)
        result = {
            "benchmark": "lm_pack", "date": date.today().isoformat(),
            "command": " ".join(cmd), "config": str(args.config), "overrides": args.overrides,
            "procs": args.procs, "cells": len(cells), "tokens": tokens,
            "packed_seconds": round(packed_s, 2),
            "packed_tokens_per_s": round(tokens / packed_s, 1),
            "alone": alone, "all_identical": all(a["identical"] for a in alone),
            "device": _device_name(), "python": platform.python_version(),
            "torch": torch.__version__,
        }
        summary = (f"packed: {len(cells)} cells, {tokens / 1e6:.1f}M tokens, {args.procs} "
                   f"processes: {packed_s:.1f} s ({tokens / packed_s / 1e6:.2f}M tokens/s) on "
                   f"{result['device']}")
        lines = [summary] + [
            f"cell {a['cell']} ({a['size']}, rate {a['rate']}) alone: {a['seconds']} s, "
            f"{a['rows']} metric rows, identical to packed: {a['identical']} "
            f"(max |diff| {a['max_abs_diff']})" for a in alone]
        log.write("\n".join(lines) + "\n")
    (out / "lm_pack.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))
    return 0


def _pick(spec: str, n: int) -> list[int]:
    picks: list[int] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "none":
            return []
        if part in ("first", "last"):
            picks.append(0 if part == "first" else n - 1)
            continue
        try:
            picks.append(int(part))
        except ValueError:
            raise BenchError(f"--alone: expected cell ids, 'first', 'last' or 'none', got "
                             f"{part!r}") from None
    bad = [c for c in picks if not 0 <= c < n]
    if bad:
        raise BenchError(f"--alone: cell {bad[0]} is not in the grid (0..{n - 1})")
    return sorted(set(picks))


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
