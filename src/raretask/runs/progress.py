"""The progress display of a grid run (rich): two lines, the whole grid and the running group.

::

    grid              ━━━━━━╸━━━  4/12 cells 9,000/24,000 steps  118 steps/s 0:01:16 ETA 0:02:07
    g0001 (4 models)  ━━━━━━━━╸━             1,000/4,000 steps  120 steps/s 0:00:08 ETA 0:00:25

It listens to the events :meth:`raretask.runs.grid.GridRun.run` sends: ``start`` (cells done and
total, and the steps left in the unfinished groups: ``steps_todo``), ``step`` (the running
group's step, at every evaluation) and ``group_done``. Rates and ETAs are rich's, over the last
30 s. A ``step`` event may carry ``live``: a function returning the trainer's current step; the
display then polls it at every refresh, so the count moves between (log-spaced) evaluations too.

``quiet`` turns the display off (CI, scripts); on a non-terminal stderr rich prints only the
final state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _Steps(ProgressColumn):
    """``done/total steps`` and the rate, from the task's own counters."""

    def render(self, task) -> Text:
        if task.total is None:
            return Text("")
        rate = task.speed
        tail = f"  {rate:,.0f} steps/s" if rate else ""
        return Text(f"{int(task.completed):,}/{int(task.total):,} steps{tail}")


class _Polling(Progress):
    """A Progress that asks ``poll`` for fresh numbers before each refresh."""

    poll: Callable[[], None] | None = None

    def get_renderables(self):
        if self.poll is not None:
            try:
                self.poll()
            except Exception:  # a display must never stop a run
                self.poll = None
        yield from super().get_renderables()


class GridProgress:
    """Context manager and event sink for :meth:`GridRun.run` (``progress=`` argument).

    Parameters
    ----------
    quiet:
        No display at all.
    console:
        Where to draw (default: a console on stderr, so stdout stays clean).
    """

    def __init__(self, quiet: bool, console: Console | None = None):
        self.quiet = quiet
        self.progress = _Polling(
            TextColumn("{task.description:<18}"), BarColumn(bar_width=30),
            TextColumn("{task.fields[cells]}"), _Steps(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(),
            console=console or Console(stderr=True), disable=quiet, transient=False,
        )
        self.grid: TaskID | None = None
        self.group: TaskID | None = None
        self._base = 0  # grid steps finished in completed groups (this session)
        self._group_step = 0
        self._cells = (0, 0)

    def __enter__(self) -> GridProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def _cells_text(self) -> str:
        return f"{self._cells[0]}/{self._cells[1]} cells"

    def _set_group_step(self, step: int) -> None:
        if self.group is None:
            return
        step = max(step, self._group_step)
        self._group_step = step
        self.progress.update(self.group, completed=step)
        if self.grid is not None:
            self.progress.update(self.grid, completed=self._base + step)

    def __call__(self, ev: dict[str, Any]) -> None:
        p = self.progress
        kind = ev["event"]
        if kind == "start":
            # shown only once the run has started: an error before that stays one line
            p.start()
            self._cells = (ev["cells_done"], ev["cells_total"])
            self.grid = p.add_task("grid", total=ev.get("steps_todo") or None,
                                   cells=self._cells_text())
        elif kind == "step":
            if self.group is None:
                self._group_step = 0
                self.group = p.add_task(f"{ev['group']} ({ev['cells']} models)",
                                        total=ev["steps"], cells="")
                live = ev.get("live")
                p.poll = (lambda: self._set_group_step(int(live()))) if live else None
            self._set_group_step(ev["step"])
        elif kind == "group_done":
            self._cells = (ev["cells_done"], ev["cells_total"])
            if self.group is not None:
                total = p.tasks[[t.id for t in p.tasks].index(self.group)].total or 0
                self._base += int(total)
                p.poll = None
                p.remove_task(self.group)
                self.group = None
            if self.grid is not None:
                p.update(self.grid, completed=self._base, cells=self._cells_text())
