"""`raretask report`: sections per input, numbers equal to `show`, embedded PNGs, user errors,
the progress display, and the page opened in headless Chromium (console clean, images loaded)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import struct
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

from raretask.cli import main
from raretask.config import load_experiment
from raretask.runs.grid import GridRun

# a phase grid (iid, 2 widths, 2 seeds) and an injection sweep (2 gaps x 2 widths): a few seconds
PHASE = ["name=rep_phase", "tasks=4", "features=4", "width=[2,8]", "seed=[0,1]", "beta=1.5",
         "steps=400", "batch_size=64", "lr=0.01", "eval_points=8"]
INJECT = ["name=rep_inject", "tasks=4", "features=4", "width=[2,8]", "seed=0", "beta=2",
          "delivery=burst", "every=[10,40]", "steps=400", "batch_size=64", "lr=0.01",
          "trace_every=1", "eval_points=8"]
LM = ["kind=lm", "name=rep_lm", "size=tiny", "vocab_size=512", "seq_len=32", "batch_size=16",
      "steps=12", "task=[cmp,add]", "rate=0.03125", "source=ngram", "eval_points=3"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,1800"]


def _run(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    out = tmp_path_factory.mktemp(name) / "run"
    GridRun(load_experiment(None, overrides), out).run()
    return out


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _run(tmp_path_factory, "phase", PHASE), _run(tmp_path_factory, "inject", INJECT)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RARETASK_CACHE", str(tmp_path_factory.mktemp("lmcache")))
        try:
            yield _run(tmp_path_factory, "lm", LM)
        finally:
            torch.set_num_threads(before)


def cli(capsys, *args) -> tuple[int, str, str]:
    """The real entry point in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


class Page(HTMLParser):
    """Sections (id -> has data), tables (id -> rows of cell text) and images of a report."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: dict[str, bool] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.external: list[str] = []
        self._table = self._row = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a and not (a[key].startswith(("data:", "#"))):
                self.external.append(a[key])
        if tag == "section":
            self.sections[a["id"]] = a["data-has-data"] == "true"
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def report(capsys, tmp_path, *dirs, extra=()) -> tuple[Path, Page]:
    out = tmp_path / "report.html"
    code, stdout, stderr = cli(capsys, "report", *dirs, "--out", out, *extra)
    assert code == 0, stderr
    assert str(out) in stdout
    return out, Page(out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def toy_report(toy_runs, tmp_path_factory) -> tuple[Path, Page]:
    """One report of both toy runs, read by several tests."""
    out = tmp_path_factory.mktemp("toyreport") / "report.html"
    with pytest.raises(SystemExit) as exc:
        main(["report", *map(str, toy_runs), "--out", str(out)])
    assert exc.value.code == 0
    return out, Page(out.read_text(encoding="utf-8"))


def show_lines(capsys, run: Path) -> list[list[str]]:
    """Data lines of `raretask show RUN` (the text table, 200 columns wide), split into words."""
    from raretask import cli as cli_module

    saved = cli_module.console._width
    cli_module.console.width = 200  # nothing truncated
    try:
        code, stdout, stderr = cli(capsys, "show", run)
    finally:
        cli_module.console._width = saved
    assert code == 0, stderr
    return [line.split() for line in stdout.splitlines() if re.match(r"^\s*\d+\s", line)]


def show_json(capsys, run: Path) -> list[dict]:
    code, stdout, stderr = cli(capsys, "show", run, "--json")
    assert code == 0, stderr
    return json.loads(stdout)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# -- sections per input -------------------------------------------------------------------------
LM_SECTIONS = ("lm-heatmap", "lm-order", "lm-presence", "lm-retention")


def test_toy_report_has_toy_sections_and_says_the_others_are_empty(toy_report):
    out, page = toy_report
    assert page.sections == {"scaling": True, "phase": True, "residual": True, "injection": True,
                             **{k: False for k in LM_SECTIONS}, "fix": False}
    text = out.read_text(encoding="utf-8")
    assert "No language-model run given" in text and "No fix result given" in text
    # phase diagram + residual (one setting) + traces, gap sweep, cosines + scaling figure
    assert len(page.images) == 6
    assert not page.external  # self-contained: nothing fetched from anywhere


def test_injection_only_report_has_no_phase_diagram(toy_runs, capsys, tmp_path):
    _, page = report(capsys, tmp_path, toy_runs[1])
    assert page.sections["injection"] and not page.sections["phase"]
    assert not page.sections["residual"]
    assert "digest-0" in page.tables  # the show digest lands in the injection section


def test_embedded_images_are_pngs(toy_report):
    _, page = toy_report
    for src in page.images:
        head, _, data = src.partition(",")
        assert head == "data:image/png;base64"
        w, h = png_size(base64.b64decode(data, validate=True))
        assert w > 100 and h > 100


# -- numbers equal `raretask show` --------------------------------------------------------------
def test_toy_tables_equal_show(toy_runs, toy_report, capsys):
    out, page = toy_report
    for i, run in enumerate(toy_runs):
        table = [" ".join(r).split() for r in page.tables[f"digest-{i}"]]
        assert table == show_lines(capsys, run)
        rows = show_json(capsys, run)
        rare = {r["cell"]: r for r in rows if r["rare"]}
        assert [r[8] for r in page.tables[f"digest-{i}"]] == [
            f"{rare[c]['signal']:+.3f}" for c in sorted(rare)]
        agreement = sum(r["agree"] for r in rows) / len(rows)
        assert f"Agreement over all (cell, task) pairs: {100 * agreement:.1f}%" in \
            out.read_text(encoding="utf-8")
    # per-width agreement, from the same rows
    rows = show_json(capsys, toy_runs[0])
    got = {r[0]: r for r in page.tables["agreement-0"]}
    for w in {r["width"] for r in rows}:
        mine = [r for r in rows if r["width"] == w]
        assert got[str(w)][6] == f"{100 * sum(r['agree'] for r in mine) / len(mine):.0f}%"
        assert got[str(w)][5] == str(sum(r["predicted_learned"] for r in mine) // 2)


def test_lm_report_tables_equal_show(lm_run, capsys, tmp_path):
    _, page = report(capsys, tmp_path, lm_run)
    assert {k: page.sections[k] for k in ("phase", "residual", "injection", "fix")} == {
        "phase": False, "residual": False, "injection": False, "fix": False}
    assert all(page.sections[k] for k in LM_SECTIONS)
    assert [" ".join(r).split() for r in page.tables["lm-0"]] == show_lines(capsys, lm_run)
    rows = show_json(capsys, lm_run)
    assert [r[6] for r in page.tables["lm-0"]] == [f"{r['test_accuracy']:.3f}" for r in rows]
    assert [r[4] for r in page.tables["lm-0"]] == [f"{r['frequency']:.2e}" for r in rows]
    cos = page.tables["cosines-0"]
    assert [r[0] for r in cos] == [str(r["cell"]) for r in rows]
    # the settings over seeds and the lowest learned frequency per size (issue 19, item 2),
    # the numbers of `python -m raretask.report.lm_seeds`
    from raretask.report.lm_seeds import seed_cells

    cells = {c["cell"]: c for c in json.loads((lm_run / "cells.json").read_text())}
    settings = seed_cells(rows, cells)
    assert [r[4] for r in page.tables["lm-seeds-0-0"]] == [
        c.text("test_accuracy").replace(" +- ", "\u00b1") for c in settings]
    assert {r[0] for r in page.tables["lm-seeds-0-1"]} == {c.task for c in settings}


def test_partial_lm_grid_is_refused_unless_asked_and_then_labelled(lm_run, capsys, tmp_path):
    """A grid filled call by call (issue 19) is drawn from its finished cells with --partial,
    and every figure and table it feeds says how many of its cells are missing."""
    run = tmp_path / "partial"
    shutil.copytree(lm_run, run)
    for merged in ("summary.json", "metrics.parquet"):
        (run / merged).unlink()
    (run / "manifest.json").unlink()  # a run still going has no manifest of its results yet
    shutil.rmtree(run / "groups" / "g0001")  # cell 1 (T_ADD) not trained yet
    out = tmp_path / "r.html"
    code, stdout, stderr = cli(capsys, "report", run, "--out", out)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1
    assert "run not finished (1 of 2 cells)" in stderr and "--partial" in stderr
    assert not out.exists()

    written, page = report(capsys, tmp_path, run, extra=("--partial",))
    rows = show_json(capsys, run)
    assert [r["cell"] for r in rows] == [0]
    assert [r[6] for r in page.tables["lm-0"]] == [f"{rows[0]['test_accuracy']:.3f}"]
    text = written.read_text()
    label = "rep_lm (PARTIAL: 1 of 2 cells)"
    assert text.count("PARTIAL: 1 of 2 cells finished") == len(page.images) - 1  # not Fig. 1
    assert label in text and "rep_lm:" not in text  # no table or figure title without it


def test_lm_cost_counts_a_cut_cell_up_to_the_checkpoint_a_later_visit_resumed(lm_run, tmp_path):
    """A cell cut at step 6 and resumed there next visit: its 6 steps count to the cut visit
    (work kept); a cell cut and restarted from step 0 counts nothing to its cut visit."""
    from raretask.report import lm_cost

    run = tmp_path / "cut"
    shutil.copytree(lm_run, run)
    first, second = (c["group"] for c in json.loads((run / "cells.json").read_text()))
    start = ("start: raretask x, python 3.12, device cuda, 2 cells in 2 groups, 2 groups to "
             "run, 2 processes (cells)\n")
    with open(run / "log.txt", "a", encoding="utf-8") as fh:
        fh.write(f"2099-01-01 00:00:00 {start}"
                 f"2099-01-01 00:00:10 {first}: checkpoint at step 4 of 12 (9 s since step 0, "
                 "written in 1.0 s)\n"
                 f"2099-01-01 00:00:20 {first}: checkpoint at step 6 of 12 (19 s since step 0, "
                 "written in 1.0 s)\n"
                 f"2099-01-01 00:00:20 {second}: checkpoint at step 3 of 12 (19 s since step 0, "
                 "written in 1.0 s)\n"
                 f"2099-01-02 00:00:00 {start}"
                 f"2099-01-02 00:00:01 {first}: resumed from step 6\n"
                 f"2099-01-02 00:00:09 {first}: tiny cmp steps 6->12 in 8.0s (384 tokens/s)\n"
                 f"2099-01-02 00:00:19 {second}: tiny cmp steps 0->12 in 18.0s (341 tokens/s)\n")
    visits, _ = lm_cost.grid_cost(run)
    row = 16 * 32  # the fixture's rows x tokens a row
    assert [(v.cells, v.cut, v.tokens) for v in visits[1:]] == [
        (0, 1, 6 * row), (2, 0, (6 + 12) * row)]


def test_lm_cost_counts_each_visit_from_the_log(lm_run, capsys, tmp_path):
    """Item 8's cost record: tokens are steps x rows x tokens a row of the finished cells (exact),
    FLOPs the model's per token, a visit's time ends before the next visit's lines."""
    from raretask.lm.model import ModelConfig
    from raretask.report import lm_cost

    run = tmp_path / "cost"
    shutil.copytree(lm_run, run)
    visits, speeds = lm_cost.grid_cost(run)
    assert [(v.device, v.processes, v.cells) for v in visits] == [("cpu", 1, 2)]
    tokens = 2 * 12 * 16 * 32  # LM: 2 cells of 12 steps x 16 rows x 32 tokens
    assert visits[0].tokens == tokens
    fpt = ModelConfig.preset("tiny", vocab_size=512).flops_per_token(32)
    assert visits[0].flops == tokens * fpt and visits[0].mfu(989.0) is None  # a CPU: no peak
    assert sorted((s.task, len(s.seconds), s.shape) for s in speeds) == [
        ("add", 1, "12 x 16 x 32"), ("cmp", 1, "12 x 16 x 32")]
    for s in speeds:  # the split of a cell's seconds, from its own log line
        assert len(s.warmup_s) == len(s.eval_s) == 1 and s.checkpoint_s == [0.0]
        assert s.warmup_s[0] > 0 and s.eval_s[0] > 0 and s.warmup_s[0] + s.eval_s[0] <= \
            s.seconds[0] + 0.05  # the log rounds each to 0.1 s
    wall = visits[0].wall_s
    group = json.loads((run / "cells.json").read_text())[0]["group"]
    with open(run / "log.txt", "a", encoding="utf-8") as fh:  # a later visit, e.g. on a GPU
        fh.write("2099-01-01 00:00:00 warning: resumes on cuda:0\n"
                 "2099-01-01 00:00:00 [rank 0] start: raretask x, python 3.12, device cuda, 2 "
                 "cells in 2 groups, 0 groups to run, 6 processes (cells)\n"
                 f"2099-01-01 00:00:10 [rank 0] {group}: checkpoint at step 6 of 12 (9 s since "
                 "step 0, written in 1.5 s)\n"
                 f"2099-01-01 00:00:20 [rank 0] {group}: checkpoint at step 9 of 12 (19 s since "
                 "step 0, written in 2.0 s)\n"
                 f"2099-01-01 00:00:25 [rank 0] {group}: tiny cmp steps 0->12 in 25.0s (245 "
                 "tokens/s); first 3 steps 8.0s, 2 evaluations 4.5s\n"
                 "2099-01-01 00:00:30 [rank 0] done\n")
    visits, speeds = lm_cost.grid_cost(run)
    assert [(v.device, v.processes, v.cells, v.wall_s) for v in visits] == [
        ("cpu", 1, 2, wall), ("cuda", 6, 1, 30.0)]
    again = [s for s in speeds if len(s.seconds) == 2]
    assert len(again) == 1 and (again[0].seconds[1], again[0].warmup_s[1], again[0].eval_s[1],
                                again[0].checkpoint_s[1]) == (25.0, 8.0, 4.5, 3.5)
    # a visit with profile.stack_seeds: two cells share one stack's seconds and writes
    first, second = (c["group"] for c in json.loads((run / "cells.json").read_text()))
    with open(run / "log.txt", "a", encoding="utf-8") as fh:
        fh.write("2099-01-02 00:00:00 start: raretask x, python 3.12, device cuda, 2 cells in 2 "
                 "groups, 2 groups to run\n"
                 f"2099-01-02 00:00:10 {first}+{second}: checkpoint at step 6 of 12 (9 s since "
                 "step 0, written in 3.0 s)\n")
        for g in (first, second):
            fh.write(f"2099-01-02 00:00:20 {g}: tiny cmp steps 0->12 in 20.0s (512 tokens/s); "
                     "first 3 steps 6.0s, 4 evaluations 4.0s; 2 seeds stacked\n")
    visits, speeds = lm_cost.grid_cost(run)
    assert [(v.processes, v.cells, v.tokens) for v in visits[2:]] == [(1, 2, tokens)]
    for s in speeds:  # each cell: 1/2 of the stack's seconds, its process 2 x its speed
        assert (s.seconds[-1], s.warmup_s[-1], s.eval_s[-1], s.checkpoint_s[-1],
                s.tokens_per_s[-1]) == (10.0, 3.0, 2.0, 1.5, 1024.0)
    lm_cost.main([str(run), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert [v["tokens"] for v in printed["visits"]] == [tokens, tokens // 2, tokens]
    assert printed["left"] == []  # every cell finished
    # a cell without its summary is left, costed at what its size and task took so far
    cell = json.loads((run / "cells.json").read_text())[1]
    (run / "groups" / cell["group"] / "summary.json").unlink()
    _, speeds = lm_cost.grid_cost(run)
    took = next(s for s in speeds if s.task == cell["task"]).seconds
    left = lm_cost.cells_left(run, speeds)
    assert left == [lm_cost.CellsLeft(cell["task"], "tiny", cell["rate"], cell["delivery"],
                                      "12 x 16 x 32", 1, sum(took) / len(took))]
    assert left[0].seconds() == left[0].seconds_a_cell
    # a size no cell has measured: scaled from the measured size of its task and step shape
    # nearest in FLOPs per token (here the only one), by the ratio of FLOPs per token
    cells = json.loads((run / "cells.json").read_text())
    cells[1]["size"] = "4m"
    (run / "cells.json").write_text(json.dumps(cells))
    tiny = [lm_cost.CellSpeed("tiny", cell["task"], "12 x 16 x 32", seconds=[10.0]),
            lm_cost.CellSpeed("20m", cell["task"], "99 x 16 x 32", seconds=[1.0]),  # other shape
            lm_cost.CellSpeed("20m", "other", "12 x 16 x 32", seconds=[1.0])]  # other task
    fpt = {s: ModelConfig.preset(s, vocab_size=cell["vocab_size"]).flops_per_token(
        cell["seq_len"]) for s in ("tiny", "4m")}
    [guess] = lm_cost.cells_left(run, tiny)
    assert (guess.size, guess.estimated_from) == ("4m", "tiny")
    assert guess.seconds_a_cell == pytest.approx(10.0 * fpt["4m"] / fpt["tiny"])
    assert guess.seconds_a_cell > 10 * 20  # 4m does > 20x tiny's FLOPs a token
    assert lm_cost.cells_left(run, tiny[1:])[0].seconds_a_cell is None  # no peer: unknown
    with pytest.raises(SystemExit) as stop:  # not a run: one line, exit 2
        lm_cost.main([str(tmp_path / "nope")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no log.txt (not a run " \
                                      "directory, or never started)\n"


def test_mixed_report_fills_toy_and_lm_sections(toy_runs, lm_run, capsys, tmp_path):
    _, page = report(capsys, tmp_path, toy_runs[0], lm_run)
    assert page.sections["phase"] and page.sections["lm-heatmap"]
    assert not page.sections["injection"]


def test_scaling_table_equals_scaling_json(toy_runs, capsys, tmp_path):
    csv = Path(__file__).parents[1] / "examples" / "scaling_synthetic.csv"
    _, page = report(capsys, tmp_path, toy_runs[0], extra=("--scaling", csv))
    code, stdout, stderr = cli(capsys, "scaling", csv, "--json")
    assert code == 0, stderr
    pairs = json.loads(stdout)["pairs"]
    assert page.tables["scaling"] == [
        [f"{p['small']:.3g}", f"{p['large']:.3g}", f"{p['gap_compute_optimal']:.4f}",
         f"{p['gap_infinite_data']:.4f}",
         "data scaling" if p["verdict"] == "data" else "model scaling",
         f"{p['critical_small_size']:.3g}"] for p in pairs]


def test_default_scaling_section_classifies_the_paper_sizes(toy_runs, capsys, tmp_path):
    from raretask.report.build import PAPER_LAW
    from raretask.scaling import ScalingFit, max_data_scalable_ratio

    _, page = report(capsys, tmp_path, toy_runs[0])
    ratio = max_data_scalable_ratio(ScalingFit(**PAPER_LAW))
    verdicts = {(r[0], r[1]): r[4] for r in page.tables["scaling"]}
    assert len(verdicts) == 10  # 5 sizes, every pair
    for (s, l_), v in verdicts.items():
        assert v == ("data scaling" if float(l_) / float(s) < ratio else "model scaling")


# -- the fix table ------------------------------------------------------------------------------
FIX = {"task": "cmp", "note": "planned by the fix flow",
       "rows": [{"label": "natural mix", "size": "tiny", "frequency": 2.4e-5,
                 "test_accuracy": 0.02, "task_loss": 4.25, "learned": False},
                {"label": "planned mix", "size": "tiny", "frequency": 9.8e-4, "steps": 2000,
                 "test_accuracy": 0.91, "task_loss": 0.31, "learned": True, "run": "planned"},
                {"label": "bigger model", "size": "20m", "params": 18.9e6,
                 "frequency": 2.4e-5, "test_accuracy": None, "task_loss": None}]}


def test_fix_json_fills_the_fix_table(toy_runs, capsys, tmp_path):
    fix_dir = tmp_path / "fix"
    fix_dir.mkdir()
    (fix_dir / "fix.json").write_text(json.dumps(FIX))
    _, page = report(capsys, tmp_path, toy_runs[0], fix_dir)
    assert page.sections["fix"]
    assert page.tables["fix-0"] == [
        ["natural mix", "tiny", "-", "2.40e-05", "-", "-", "0.020", "4.25", "no", "-"],
        ["planned mix", "tiny", "-", "9.80e-04", "2000", "-", "0.910", "0.31", "yes",
         "planned"],
        ["bigger model", "20m", "18.90M", "2.40e-05", "-", "-", "-", "-", "-", "-"]]


@pytest.mark.parametrize("content, field", [
    ({**FIX, "colour": "red"}, "colour: unknown key"),
    ({**FIX, "rows": [{**FIX["rows"][0], "test_accuracy": 1.5}]}, "rows.0.test_accuracy"),
    ({"task": "cmp"}, "rows"),
    ("{not json", "invalid JSON"),
])
def test_bad_fix_json_is_one_line_naming_the_file_and_field(toy_runs, capsys, tmp_path,
                                                             content, field):
    fix_dir = tmp_path / "fix"
    fix_dir.mkdir()
    (fix_dir / "fix.json").write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "r.html"
    code, stdout, stderr = cli(capsys, "report", toy_runs[0], fix_dir, "--out", out)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith(f"error: {fix_dir / 'fix.json'}")
    assert field in stderr
    assert not out.exists()


# -- user errors --------------------------------------------------------------------------------
def _unfinished(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "unfinished"
    shutil.copytree(run, copy)
    (copy / "summary.json").unlink()
    shutil.rmtree(next((copy / "groups").iterdir()))
    return copy


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("file", "not a directory"),
    ("not_a_run", "not a raretask run directory (no config.yaml)"),
    ("unfinished", "run not finished"),
    ("bad_kind", "kind: the report reads toy, lm runs, got 'weird'"),
    ("bad_yaml", "unreadable config"),
])
def test_bad_input_dirs_exit_2_with_one_line_naming_the_path(toy_runs, capsys, tmp_path, case,
                                                             message):
    good = toy_runs[0]
    bad = {"missing": tmp_path / "nope", "file": tmp_path / "a.txt",
           "not_a_run": tmp_path / "empty"}.get(case)
    if case == "file":
        bad.write_text("x")
    elif case == "not_a_run":
        bad.mkdir()
    elif case == "unfinished":
        bad = _unfinished(good, tmp_path)
    elif case in ("bad_kind", "bad_yaml"):
        bad = tmp_path / case
        shutil.copytree(good, bad)
        cfg = bad / "config.yaml"
        cfg.write_text("kind: weird\n" if case == "bad_kind" else "kind: [toy\n")
        # a run made before manifests: with one, the edit is named as a changed copy first
        # (tests/test_run_identity.py)
        (bad / "manifest.json").unlink()
    out = tmp_path / "r.html"
    code, stdout, stderr = cli(capsys, "report", good, bad, "--out", out)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith(f"error: {bad}")
    assert message in stderr
    assert not out.exists()  # no partial output


def test_out_must_be_a_file_and_scaling_csv_is_checked(toy_runs, capsys, tmp_path):
    code, _, stderr = cli(capsys, "report", toy_runs[0], "--out", tmp_path)
    assert code == 2 and stderr.startswith("error: --out:") and stderr.count("\n") == 1
    bad = tmp_path / "s.csv"
    bad.write_text("params,tokens,loss\n1,2,x\n")
    code, _, stderr = cli(capsys, "report", toy_runs[0], "--out", tmp_path / "r.html",
                          "--scaling", bad)
    assert code == 2 and stderr.startswith(f"error: {bad} line 2: field 'loss'")
    assert not (tmp_path / "r.html").exists()


# -- progress display ---------------------------------------------------------------------------
def _events(progress, live=None):
    progress({"event": "start", "cells_total": 6, "cells_done": 2, "groups_todo": 2,
              "steps_todo": 800})
    progress({"event": "step", "group": "g0001", "step": 0, "steps": 400, "cells": 2,
              **({"live": live} if live else {})})
    progress({"event": "step", "group": "g0001", "step": 100, "steps": 400, "cells": 2})
    progress({"event": "group_done", "group": "g0001", "cells_done": 4, "cells_total": 6})
    progress({"event": "step", "group": "g0002", "step": 200, "steps": 400, "cells": 2})


def test_progress_shows_cells_steps_rate_and_eta():
    from raretask.runs.progress import GridProgress

    buf = io.StringIO()
    with GridProgress(False, Console(file=buf, width=160, force_terminal=False)) as p:
        _events(p)
        grid = p.progress.tasks[0]
        assert (grid.completed, grid.total) == (600, 800)  # 400 of g0001 + 200 of g0002
    text = buf.getvalue()
    assert "4/6 cells" in text and "600/800 steps" in text and "200/400 steps" in text
    assert "ETA" in text


def test_progress_polls_live_steps_between_evaluations():
    from raretask.runs.progress import GridProgress

    now = {"step": 0}
    buf = io.StringIO()
    with GridProgress(False, Console(file=buf, width=160, force_terminal=False)) as p:
        p({"event": "start", "cells_total": 1, "cells_done": 0, "groups_todo": 1,
           "steps_todo": 400})
        p({"event": "step", "group": "g0000", "step": 0, "steps": 400, "cells": 1,
           "live": lambda: now["step"]})
        now["step"] = 250
        list(p.progress.get_renderables())  # what each refresh does
        assert p.progress.tasks[1].completed == 250 and p.progress.tasks[0].completed == 250


def test_quiet_progress_prints_nothing():
    from raretask.runs.progress import GridProgress

    buf = io.StringIO()
    with GridProgress(True, Console(file=buf, width=160)) as p:
        _events(p)
    assert buf.getvalue() == ""


# -- the page in a real browser -----------------------------------------------------------------
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_report_opens_in_headless_chromium(toy_runs, lm_run, capsys, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    fix_dir = tmp_path / "fix"
    fix_dir.mkdir()
    (fix_dir / "fix.json").write_text(json.dumps(FIX))
    out, page = report(capsys, tmp_path, *toy_runs, lm_run, fix_dir)
    assert all(page.sections.values())
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(out.resolve().as_uri())
        # a loaded machine can hand control back before a large page has finished loading
        WebDriverWait(driver, 120).until(lambda d: d.execute_script(
            "return document.readyState === 'complete' && "
            "Array.from(document.images).every(i => i.complete)"))
        state = driver.execute_script(
            "return {title: document.title, ready: document.readyState,"
            " images: Array.from(document.images).map(i => [i.complete, i.naturalWidth]),"
            " sections: document.querySelectorAll('section').length,"
            " captions: document.querySelectorAll('figure figcaption').length}")
        logs = driver.get_log("browser")
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert state["ready"] == "complete" and state["title"] == "raretask report"
    assert len(state["images"]) == len(page.images) >= 10
    assert all(done and width > 0 for done, width in state["images"]), state["images"]
    assert state["captions"] == len(page.images)
    assert state["sections"] == len(page.sections)
    assert [e for e in logs if e["level"] in ("SEVERE", "WARNING")] == []
    assert png_size(shot.read_bytes())[0] > 0
    keep = os.environ.get("RARETASK_SCREENSHOT_DIR")
    if keep:  # CI keeps the screenshot
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report.png")


def test_chromium_flags_reject_network_requests(tmp_path):
    """Sanity of the check above: a page with an external image is caught (not loaded)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                    '<img src="missing.png"></body></html>')
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(page.as_uri())
        widths = driver.execute_script("return Array.from(document.images).map(i => "
                                       "i.naturalWidth)")
        logs = driver.get_log("browser")
    finally:
        driver.quit()
    assert widths == [0]
    assert any(e["level"] == "SEVERE" for e in logs)


def test_demo_report_takes_both_runs_and_any_fix_dir(toy_runs, tmp_path):
    from raretask.demo import write_demo_report

    out = tmp_path / "demo"
    shutil.copytree(toy_runs[0], out / "phase")
    shutil.copytree(toy_runs[1], out / "injection")
    (out / "fix").mkdir()
    (out / "fix" / "fix.json").write_text(json.dumps(FIX))
    (out / "other").mkdir()  # neither a run nor a fix: not an input
    buf = io.StringIO()
    path = write_demo_report(out, Console(file=buf, width=200))
    assert path == out / "report.html"
    assert f"report: {path}" in buf.getvalue()
    page = Page(path.read_text(encoding="utf-8"))
    assert page.sections["phase"] and page.sections["injection"] and page.sections["fix"]
    assert not page.sections["lm-heatmap"]


def test_the_fix_flows_directory_is_a_fix_input(toy_runs, capsys, tmp_path):
    """Contract with raretask.mixing.fix: its fix.json validates and its directory (config.yaml
    of kind fix_toy, no grid files) is read as a fix result, not as a run."""
    from raretask.mixing.fix import ArmResult, FixSetting, fix_json

    cfg = FixSetting(tasks=16, features=16, beta=1.5, rare=15, width=16, margin=1.5, steps=4000,
                     batch_size=256, gap=400, learned_threshold=0.3, seeds=1)
    arms = [ArmResult(arm=a, width=w, schedule="even", rare_share=s, rare_signal=sig,
                      rare_signal_final=sig, rare_learned="", rare_per_seed=[sig],
                      rare_loss=1 - sig, frequent_loss=0.2, tasks_learned=8.0, samples=1e6,
                      flops=1e12)
            for a, w, s, sig in (("natural", 16, 0.0074, 0.01), ("plan", 16, 0.03, 0.62),
                                 ("big", 64, 0.0074, 0.55))]
    fix_dir = tmp_path / "fixflow"
    fix_dir.mkdir()
    (fix_dir / "config.yaml").write_text("kind: fix_toy\nname: my_fix\n")
    (fix_dir / "fix.json").write_text(json.dumps(fix_json(cfg, arms)))
    out, page = report(capsys, tmp_path, toy_runs[0], fix_dir)
    assert page.sections["fix"]
    rows = page.tables["fix-0"]
    assert [r[0] for r in rows] == ["natural (even)", "plan (even)", "big (even)"]
    assert [r[8] for r in rows] == ["no", "yes", "yes"]  # learned: s~ >= 0.3
    assert f"raretask fix {fix_dir / 'config.yaml'} --out {fix_dir}" in out.read_text()


def test_report_shows_the_calibrated_law_and_its_held_out_cells(tmp_path):
    """`raretask report --calibration FILE`: the law's accuracy, laws and held-out cells, read
    off the committed held-out calibration (fit on the 1k-step grids, scored on fig9 and the
    packed grid)."""
    from raretask.report.build import calibration_section

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    sec = calibration_section([results / "lm_calibration_heldout_1k.json"])
    names = [t.name for t in sec.tables]
    assert names == ["calibration-accuracy", "calibration-laws", "calibration-holdout"]
    held = next(t for t in sec.tables if t.name == "calibration-accuracy")
    assert any(r[0] == "cmp" and r[2] == "16/17" for r in held.rows), held.rows
    from raretask.errors import UserError

    with pytest.raises(UserError):
        calibration_section([tmp_path / "missing.json"])
