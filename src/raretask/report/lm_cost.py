"""What a language-model grid cost, read off its ``log.txt`` (issue 19, item 8).

A grid filled over several device calls logs a ``start:`` line per visit and, per cell it
finishes, ``gNNNN: SIZE TASK steps A->B in Xs (Y tokens/s)``. From those and ``cells.json``:

* **per visit**: the device, processes, wall time (the start line to the visit's last line),
  cells finished, their tokens (steps x rows x tokens a row, exact), tokens/s over all
  processes, and MFU (their training FLOPs, ``ModelConfig.flops_per_token``, over the wall time
  and a peak). A cell a visit cut short counts up to its last checkpoint when a later visit
  resumed from that checkpoint (its ``resumed from step N`` line; the visit's ``cut`` cells),
  and not at all when it restarted: that work was lost.
* **cells left** (a grid filled call by call): the unfinished cells per task, size and frequency,
  with the seconds a cell of that size and task took so far (packed as it ran) and their sum,
  for sizing the next calls. Where no cell of that size and task has finished yet, the seconds
  are estimated (``~``) from the measured size of the same task and step shape nearest in FLOPs
  per token, scaled by the ratio of FLOPs per token: the same MFU, so usually high for a larger
  model (which runs at a higher MFU); "-" where no cell of that task and shape finished.
* **per size and task**: the cells, seconds a cell and each process's tokens/s, as logged; for
  cells logged since the split was (2026-12-05), the seconds of a cell's first steps
  (compilation, CUDA-graph capture), its evaluations and its checkpoint writes. A cell trained
  in a stack of K seeds (``profile.stack_seeds``; its line ends ``K seeds stacked``) counts
  1/K of the stack's seconds, and its process's speed is K x its own tokens/s.

``python -m raretask.report.lm_cost RUN_DIR [--peak-tflops 989] [--json]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean

from raretask.errors import UserError

H100_BF16_TFLOPS = 989.0
"""Dense bf16 peak of an H100 SXM (the H200's is the same): the yardstick of benchmarks/."""

_STAMP = r"(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?: \[rank \d+\])? "
_START = re.compile(_STAMP + r"start: .*?device (?P<device>[^,]+),.*?"
                    r"(?:, (?P<procs>\d+) processes)?(?: \(\w+\))?$")
_DONE = re.compile(_STAMP + r"(?P<group>g\d+): (?P<size>\S+) (?P<task>\S+) steps "
                   r"(?P<a>\d+)->(?P<b>\d+) in (?P<sec>[\d.]+)s \((?P<tps>[\d,]+) tokens/s\)"
                   # since 2026-12-05 (fourth session): where the seconds went
                   r"(?:; first \d+ steps (?P<warm>[\d.]+)s, \d+ evaluations (?P<eval>[\d.]+)s)?"
                   # profile.stack_seeds: the seconds are the stack's, shared by its K cells
                   r"(?:; (?P<stack>\d+) seeds stacked)?")
_CKPT = re.compile(_STAMP + r"(?P<groups>g\d+(?:\+g\d+)*): checkpoint at step (?P<step>\d+) "
                   r".* written in (?P<sec>[\d.]+) s\)")
_RESUMED = re.compile(_STAMP + r"(?P<group>g\d+): resumed from step (?P<step>\d+)$")


@dataclass
class Visit:
    """One ``raretask run`` over the folder (a device call, say)."""

    started: str
    device: str
    processes: int
    wall_s: float = 0.0
    cells: int = 0
    cut: int = 0
    """Cells this visit left unfinished and a later one resumed from its last checkpoint."""
    tokens: int = 0
    flops: float = 0.0

    def add(self, cell: dict, steps: int) -> None:
        """Count ``steps`` of ``cell`` as trained in this visit."""
        tokens = steps * int(cell["batch_size"]) * int(cell["seq_len"])
        self.tokens += tokens
        self.flops += tokens * _flops_per_token(cell["size"], int(cell["vocab_size"]),
                                                int(cell["seq_len"]))

    def tokens_per_s(self) -> float | None:
        return self.tokens / self.wall_s if self.wall_s > 0 else None

    def mfu(self, peak_tflops: float) -> float | None:
        """None on a CPU (the peak is an accelerator's) or for a visit of no measurable time."""
        if self.wall_s <= 0 or self.device == "cpu":
            return None
        return self.flops / self.wall_s / (peak_tflops * 1e12)


@dataclass
class CellSpeed:
    """The finished cells of one size and task (and step shape)."""

    size: str
    task: str
    shape: str  # steps x rows x tokens a row
    seconds: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    # of those seconds, per whole cell where its log line says (cells run since 2026-12-05):
    warmup_s: list[float] = field(default_factory=list)  # the first steps: compile, capture
    eval_s: list[float] = field(default_factory=list)  # the evaluations
    checkpoint_s: list[float] = field(default_factory=list)  # writing its checkpoints


@dataclass
class CellsLeft:
    """Unfinished cells of one task, size, frequency, schedule and step shape."""

    task: str
    size: str
    frequency: float
    schedule: str  # "even", or "every N" steps for bursts
    shape: str
    cells: int
    seconds_a_cell: float | None  # the mean over finished cells of this size, task and shape
    estimated_from: str | None = None  # seconds_a_cell scaled from this size's (module doc)

    def seconds(self) -> float | None:
        return None if self.seconds_a_cell is None else self.cells * self.seconds_a_cell


def _shape(cell: dict) -> str:
    return f"{cell['steps']} x {cell['batch_size']} x {cell['seq_len']}"


@functools.cache
def _flops_per_token(size: str, vocab_size: int, seq_len: int) -> int:
    from raretask.lm.model import ModelConfig

    return ModelConfig.preset(size, vocab_size=vocab_size).flops_per_token(seq_len)


def _estimate(cell: dict, shape: str, measured: dict[tuple, float]) -> tuple[float, str] | None:
    """A cell of a size not yet measured: the seconds of the same task and step shape at the
    size nearest in FLOPs per token, times the ratio of FLOPs per token (with its size)."""
    vocab, seq = int(cell["vocab_size"]), int(cell["seq_len"])
    mine = _flops_per_token(cell["size"], vocab, seq)
    peers = [(abs(math.log(_flops_per_token(size, vocab, seq) / mine)), size, sec)
             for (size, task, sh), sec in measured.items() if task == cell["task"] and sh == shape]
    if not peers:
        return None
    _, size, sec = min(peers)
    return sec * mine / _flops_per_token(size, vocab, seq), size


def cells_left(run_dir: str | Path, speeds: list[CellSpeed]) -> list[CellsLeft]:
    """The cells of ``run_dir`` without a ``summary.json``, counted per setting, in grid order."""
    from raretask.runs import store

    run_dir = Path(run_dir)
    measured = {(s.size, s.task, s.shape): fmean(s.seconds) for s in speeds if s.seconds}
    left: dict[tuple, CellsLeft] = {}
    for cell in store.read_cells(run_dir).values():
        if (run_dir / "groups" / cell["group"] / "summary.json").exists():
            continue
        every = int(cell.get("every") or 1)
        schedule = f"every {every}" if every > 1 else str(cell.get("delivery", "even"))
        key = (cell["task"], cell["size"], float(cell["rate"]), schedule, _shape(cell))
        if key not in left:
            sec = measured.get((cell["size"], cell["task"], key[4]))
            guess = None if sec is not None else _estimate(cell, key[4], measured)
            left[key] = CellsLeft(*key, 0, *(guess or (sec, None)))
        left[key].cells += 1
    return list(left.values())


def _time(stamp: str) -> dt.datetime:
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")


def grid_cost(run_dir: str | Path) -> tuple[list[Visit], list[CellSpeed]]:
    """The visits and per-size speeds of ``run_dir`` (module docstring)."""
    from raretask.runs import store

    run_dir = Path(run_dir)
    log = run_dir / "log.txt"
    if not log.exists():
        raise UserError(f"{run_dir}: no log.txt (not a run directory, or never started)")
    by_group = {c["group"]: c for c in store.read_cells(run_dir).values()}
    visits: list[Visit] = []
    speeds: dict[tuple, CellSpeed] = {}
    start = last = None
    saving: dict[str, float] = {}  # group -> seconds writing checkpoints in this visit
    # a cut cell's kept work: (group, step) -> the visit that wrote that checkpoint, and the
    # step each group's segment in a visit began from (0 unless it was resumed there)
    wrote: dict[tuple[str, int], int] = {}
    began: dict[tuple[int, str], int] = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := _START.match(line):
            start = last = _time(m["stamp"])
            visits.append(Visit(m["stamp"], m["device"].strip(), int(m["procs"] or 1)))
            saving = {}
            continue
        if not visits or " warning: " in line:  # the next visit's warnings come before its
            continue                                  # start line: not this visit's time
        try:
            last = _time(line[:19])
        except ValueError:  # a line without a stamp (a traceback a process printed)
            continue
        visit = visits[-1]
        visit.wall_s = (last - start).total_seconds()
        if m := _CKPT.match(line):
            for group in m["groups"].split("+"):  # a stack's write, shared by its cells
                saving[group] = saving.get(group, 0.0) + float(m["sec"])
                wrote[(group, int(m["step"]))] = len(visits) - 1
            continue
        if (m := _RESUMED.match(line)) and m["group"] in by_group:
            group, step = m["group"], int(m["step"])
            began[(len(visits) - 1, group)] = step
            earlier = wrote.get((group, step))
            if earlier is not None and earlier < len(visits) - 1:  # kept from a cut visit
                visits[earlier].cut += 1
                visits[earlier].add(by_group[group], step - began.get((earlier, group), 0))
            continue
        m = _DONE.match(line)
        if m is None or m["group"] not in by_group:
            continue
        cell = by_group[m["group"]]
        visit.cells += 1
        visit.add(cell, int(m["b"]) - int(m["a"]))
        shape = _shape(cell)
        speed = speeds.setdefault((cell["size"], cell["task"], shape),
                                  CellSpeed(cell["size"], cell["task"], shape))
        k = int(m["stack"] or 1)  # a stacked cell's share of its stack's seconds
        if int(m["a"]) == 0:  # a whole cell in one visit: its seconds mean something
            speed.seconds.append(float(m["sec"]) / k)
            if m["warm"] is not None:
                speed.warmup_s.append(float(m["warm"]) / k)
                speed.eval_s.append(float(m["eval"]) / k)
                speed.checkpoint_s.append(saving.get(m["group"], 0.0) / k)
        speed.tokens_per_s.append(k * float(m["tps"].replace(",", "")))  # the process's
    return visits, list(speeds.values())


def main(argv: list[str] | None = None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(prog="python -m raretask.report.lm_cost",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                    help="the device's dense peak for MFU (default: H100/H200 bf16, 989)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = ap.parse_args(argv)
    try:
        visits, speeds = grid_cost(args.run_dir)
    except UserError as err:  # one line, exit 2, as the CLI's user errors
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    left = cells_left(args.run_dir, speeds)
    if args.json:
        print(json.dumps({"visits": [asdict(v) | {"tokens_per_s": v.tokens_per_s(),
                                                  "mfu": v.mfu(args.peak_tflops)}
                                     for v in visits],
                          "cells": [asdict(s) for s in speeds],
                          "left": [asdict(c) | {"seconds": c.seconds()} for c in left]},
                         indent=1))
        return
    console = Console()
    t = Table(title=f"{args.run_dir}: visits (MFU against {args.peak_tflops:g} TFLOP/s)",
              box=box.SIMPLE_HEAD)
    for c in ("started", "device", "procs", "wall s", "cells done", "cut", "tokens", "tokens/s",
              "MFU"):
        t.add_column(c, justify="right")
    for v in visits:
        tps, mfu = v.tokens_per_s(), v.mfu(args.peak_tflops)
        t.add_row(v.started, v.device, str(v.processes), f"{v.wall_s:.0f}", str(v.cells),
                  str(v.cut),
                  f"{v.tokens / 1e6:.1f}M", "-" if tps is None else f"{tps:,.0f}",
                  "-" if mfu is None else f"{mfu:.1%}")
    console.print(t)
    t = Table(title="finished cells by size and task (each process's own speed)",
              box=box.SIMPLE_HEAD)
    split = any(s.warmup_s for s in speeds)  # only logs written since the split was logged
    columns = ["size", "task", "steps x rows x tokens", "cells", "s a cell"]
    columns += ["first steps", "evals", "checkpoints"] * split + ["tokens/s"]
    for c in columns:
        t.add_column(c, justify="right")

    def mean(values: list[float], digits: int = 0) -> str:
        return f"{fmean(values):.{digits}f}" if values else "-"

    for s in speeds:
        tps = fmean(s.tokens_per_s)  # every CellSpeed has at least one finished cell
        parts = [mean(s.warmup_s, 1), mean(s.eval_s, 1), mean(s.checkpoint_s, 1)] * split
        t.add_row(s.size, s.task, s.shape, str(len(s.tokens_per_s)), mean(s.seconds), *parts,
                  f"{tps:,.0f}")
    console.print(t)
    if not left:
        return
    known = [c.seconds() for c in left if c.seconds() is not None]
    # cell-seconds: P processes sharing a device finish them in about cell-s / P of wall time
    t = Table(title=f"cells left: {sum(c.cells for c in left)} ({sum(known):,.0f} cell-seconds "
              "at the seconds a cell of that size took so far, ~ scaled by FLOPs per token from "
              "the size named; P processes take about cell-s / P)", box=box.SIMPLE_HEAD)
    for c in ("task", "size", "freq/tok", "schedule", "steps x rows x tokens", "cells",
              "s a cell", "cell-s"):
        t.add_column(c, justify="right")
    for c in left:
        sec, total = c.seconds_a_cell, c.seconds()
        guess = f"~{sec:.0f} ({c.estimated_from})" if c.estimated_from else None
        t.add_row(c.task, c.size, f"{c.frequency:.3g}", c.schedule, c.shape, str(c.cells),
                  guess or ("-" if sec is None else f"{sec:.0f}"),
                  "-" if total is None else ("~" * bool(guess)) + f"{total:.0f}")
    console.print(t)


if __name__ == "__main__":
    main()
