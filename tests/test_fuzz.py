"""Bad input, fuzzed: every entry point ends with exit 2 and one ``error:`` line, or a correct
result; never a traceback, never partial output.

Inputs are valid files mutated by hypothesis (truncated, bytes inserted, one field replaced by
junk: wrong types, huge numbers, NaN, YAML tags, non-UTF-8 bytes) or random bytes. The CLI runs
in-process (``raretask.cli.main``): an unexpected exception fails the test with its traceback.
Examples are derandomised (the same inputs every run) and bounded so the module stays fast.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raretask.cli import main
from raretask.config import load_experiment
from raretask.errors import UserError
from raretask.runs.grid import GridRun

ROOT = Path(__file__).resolve().parents[1]
SCALE = int(os.environ.get("RARETASK_FUZZ_SCALE", "1"))
"""A longer, random campaign: RARETASK_FUZZ_SCALE=20 runs 20x the examples, not derandomised."""


def fuzz(n: int = 40) -> settings:
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1,
                    database=None, suppress_health_check=[
                        HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                        HealthCheck.data_too_large])


FUZZ = fuzz(100)
JUNK = [b"", b"-1", b"0", b"1e999", b"-1e999", b"nan", b"inf", b"1e308", b"1e-320",
        b"99999999999999999999999999", b"[]", b"{}", b"null", b"true", b"'x'", b"\xff\xfe",
        b"\x00", b"a: b", b"- 1", b"!!python/object/apply:os.system ['echo PWNED']",
        b"&a [*a]", b"{a: 1", b"\"unterminated", b"\xe2\x82", b"1,2", b"\n\n", b"#"]


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """``valid`` damaged one way: emptied, truncated, bytes inserted, a field replaced by junk,
    or replaced by random bytes."""
    kind = draw(st.sampled_from(["field", "field", "field", "truncate", "insert", "random",
                                 "empty"]))
    if kind == "empty":
        return b""
    if kind == "random":
        return draw(st.binary(max_size=120))
    if kind == "truncate":
        return valid[:draw(st.integers(0, max(len(valid) - 1, 0)))]
    junk = draw(st.sampled_from(JUNK) | st.binary(min_size=1, max_size=6)
                | st.integers(-10**30, 10**30).map(lambda i: str(i).encode())
                | st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).encode()))
    if kind == "insert":
        i = draw(st.integers(0, len(valid)))
        return valid[:i] + junk + valid[i:]
    # replace one token between separators (a value, a key, a header name)
    parts = re.split(rb"([:,\n\[\]{}]\s*)", valid)
    tokens = [i for i, p in enumerate(parts) if p and not re.fullmatch(rb"[:,\n\[\]{}]\s*", p)]
    if not tokens:
        return junk
    parts[draw(st.sampled_from(tokens))] = junk
    return b"".join(parts)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run the CLI; check the contract for exit 2; return (code, stdout)."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    cap = capsys.readouterr()
    assert code in (0, 2), (code, cap.err)
    if code == 2:
        assert cap.out == "", "partial output before an error"
        lines = cap.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    return code, cap.out


def _json(out: str):
    """Strict JSON: NaN or Infinity in machine-readable output is a bug."""
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant} in output")
    return json.loads(out, parse_constant=refuse)


@pytest.fixture
def scratch():
    d = Path(tempfile.mkdtemp(prefix="fuzz"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _example(scratch: Path, name: str, data: bytes) -> Path:
    path = scratch / name
    if path.exists():
        path.unlink()
    path.write_bytes(data)
    return path


# -- configs and task files ------------------------------------------------------------------

@FUZZ
@given(data=mutated((ROOT / "configs" / "fig2_phase.yaml").read_bytes()))
def test_run_config(data, scratch, capsys):
    cfg = _example(scratch, "c.yaml", data)
    code, out = _cli(["run", str(cfg), "--out", str(scratch / "o"), "--dry-run"], capsys)
    if code == 0:
        import yaml

        resolved = yaml.safe_load(out)
        assert resolved["kind"] in ("toy", "lm")
    assert not (scratch / "o").exists()  # a dry run writes nothing
    assert not (scratch / "PWNED").exists()


def _check_predict(out: str, width: int) -> None:
    rep = _json(out)
    assert rep["width"] == width and rep["tasks"]
    for t in rep["tasks"]:
        assert t["learned"] == (t["features_kept"] >= 1)
        assert 0 <= t["frequency"] <= 1 and math.isfinite(t["normalized_loss"])


@FUZZ
@given(data=mutated((ROOT / "examples" / "tasks.yaml").read_bytes()))
def test_predict_task_yaml(data, scratch, capsys):
    path = _example(scratch, "t.yaml", data)
    code, out = _cli(["predict", "--task-file", str(path), "--width", "16", "--json"], capsys)
    if code == 0:
        _check_predict(out, 16)


@FUZZ
@given(data=mutated((ROOT / "examples" / "tasks.csv").read_bytes()))
def test_predict_task_csv(data, scratch, capsys):
    path = _example(scratch, "t.csv", data)
    code, out = _cli(["predict", "--task-file", str(path), "--width", "16", "--json"], capsys)
    if code == 0:
        _check_predict(out, 16)


@FUZZ
@given(args=st.lists(st.sampled_from(["--tasks", "--features", "--width", "--alpha", "--beta",
                                      "--frequent-mass"]) | st.sampled_from(
    ["0", "-3", "1e999", "nan", "inf", "2", "64", "x", "99999999999", "1e-300"]),
    min_size=0, max_size=6))
def test_predict_flags(args, capsys):
    code, out = _cli(["predict", "--json", *args], capsys)
    if code == 0:
        rep = _json(out)
        assert len(rep["tasks"]) >= 1


@fuzz(30)
@given(data=mutated((ROOT / "examples" / "scaling_synthetic.csv").read_bytes()[:700]))
def test_scaling_csv(data, scratch, capsys):
    path = _example(scratch, "s.csv", data)
    code, out = _cli(["scaling", str(path), "--json"], capsys)
    if code == 0:
        res = _json(out)
        assert res["fit"]["n_points"] >= 1 and math.isfinite(res["fit"]["a"])


# -- datasets, analysis files, plans ---------------------------------------------------------

JSONL = b"".join(json.dumps({"task": t, "text": "a b c" * (i % 3 + 1)}).encode() + b"\n"
                 for i, t in enumerate(["web"] * 6 + ["code"] * 3 + ["math"] * 2 + ["rare"]))
CSV = b"task,text\n" + b"".join(f"{t},w{i} x\n".encode() for i, t in enumerate(
    ["web"] * 6 + ["code"] * 3 + ["math"] * 2 + ["rare"]))


def _check_analysis(out: str) -> dict:
    res = _json(out)
    counts = [t["count"] for t in res["tasks"]]
    assert sum(counts) == res["examples"] and all(c >= 1 for c in counts)
    assert math.isclose(sum(t["share"] for t in res["tasks"]), 1.0)
    return res


@FUZZ
@given(data=mutated(JSONL), skip=st.booleans())
def test_analyze_jsonl(data, skip, scratch, capsys):
    path = _example(scratch, "d.jsonl", data)
    argv = ["analyze", str(path), "--task-field", "task", "--json", "--size", "8"]
    code, out = _cli(argv + (["--skip-bad"] if skip else []), capsys)
    if code == 0:
        _check_analysis(out)


@FUZZ
@given(data=mutated(CSV))
def test_analyze_csv(data, scratch, capsys):
    path = _example(scratch, "d.csv", data)
    code, out = _cli(["analyze", str(path), "--task-field", "task", "--json"], capsys)
    if code == 0:
        _check_analysis(out)


@FUZZ
@given(data=mutated(b"rules:\n  - {task: code, regex: 'def |import '}\n"
                    b"  - {task: math, keywords: [sum, integral]}\ndefault: other\n"))
def test_analyze_rules(data, scratch, capsys):
    text = _example(scratch, "d.jsonl", b'{"text": "def f(): import x"}\n{"text": "the sum"}\n'
                    b'{"text": "hello"}\n')
    rules = _example(scratch, "r.yaml", data)
    code, out = _cli(["analyze", str(text), "--rules", str(rules), "--json"], capsys)
    if code == 0:
        assert _check_analysis(out)["examples"] == 3


@pytest.fixture(scope="module")
def analysis_json(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("an")
    (d / "d.jsonl").write_bytes(JSONL)
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(d / "d.jsonl"), "--task-field", "task", "--out", str(d / "o")])
    assert exc.value.code == 0
    return (d / "o" / "analysis.json").read_bytes()


def _check_plan(out: str) -> None:
    res = _json(out)
    weights = [t["weight"] for t in res["tasks"]]
    assert math.isclose(sum(weights), 1.0, abs_tol=1e-9) and min(weights) >= 0


@FUZZ
@given(mutation=st.data())
def test_plan_from_analysis(mutation, analysis_json, scratch, capsys):
    data = mutation.draw(mutated(analysis_json))
    path = _example(scratch, "analysis.json", data)
    code, out = _cli(["plan", str(path), "--size", "8", "--json"], capsys)
    if code == 0:
        _check_plan(out)


@FUZZ
@given(data=mutated((ROOT / "examples" / "tasks.yaml").read_bytes()),
       flags=st.lists(st.sampled_from(["--margin", "--budget", "--max-epochs", "--size"])
                      | st.sampled_from(["0", "-1", "1e999", "nan", "2", "1e12", "x"]),
                      max_size=4))
def test_plan_from_task_file(data, flags, scratch, capsys):
    path = _example(scratch, "t.yaml", data)
    out_dir = scratch / "plan_out"
    shutil.rmtree(out_dir, ignore_errors=True)
    code, out = _cli(["plan", str(path), "--size", "16", "--json", *flags, "--out",
                      str(out_dir)], capsys)
    if code == 0:
        _check_plan(out)
        assert (out_dir / "plan.json").exists()
    else:
        assert not out_dir.exists()  # nothing written before the error


def test_load_fix_config_fuzz(scratch):
    """`fix` trains when its config is valid, so its config (a toy grid with an arm axis) is
    fuzzed through the loader directly."""
    valid = (ROOT / "configs" / "fix_toy.yaml").read_bytes()

    @FUZZ
    @given(data=mutated(valid))
    def check(data):
        path = _example(scratch, "f.yaml", data)
        try:
            list(load_experiment(path).cells())
        except UserError as err:
            assert "\n" not in str(err)

    check()


# -- run directories: show, report, calibrate --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "run"
    GridRun(load_experiment(None, ["name=fz", "tasks=3", "features=2", "width=[1,2]", "seed=0",
                                   "steps=30", "batch_size=16", "eval_points=3"]), out).run()
    torch.set_num_threads(before)
    return out


RUN_FILES = ["config.yaml", "cells.json", "summary.json", "groups/g0000/summary.json",
             "metrics.parquet", "groups/g0000/metrics.parquet"]


def _damaged_copy(tiny_run: Path, scratch: Path, name: str, data: bytes) -> Path:
    d = scratch / "run"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(tiny_run, d)
    (d / name).write_bytes(data)
    return d


@fuzz(50)
@given(mutation=st.data(), name=st.sampled_from(RUN_FILES), all_tasks=st.booleans())
def test_show_damaged_run(mutation, name, all_tasks, tiny_run, scratch, capsys):
    d = _damaged_copy(tiny_run, scratch, name,
                      mutation.draw(mutated((tiny_run / name).read_bytes())))
    code, out = _cli(["show", str(d), "--json"], capsys)
    if code == 0:
        assert isinstance(_json(out), list)
    _cli(["show", str(d)] + (["--all"] if all_tasks else []), capsys)
    _cli(["calibrate", str(d), "--json", "--out", str(scratch / "cal.json")], capsys)


@fuzz(25)
@given(mutation=st.data(), name=st.sampled_from(RUN_FILES))
def test_report_damaged_run(mutation, name, tiny_run, scratch, capsys):
    d = _damaged_copy(tiny_run, scratch, name,
                      mutation.draw(mutated((tiny_run / name).read_bytes())))
    page = scratch / "page.html"
    page.unlink(missing_ok=True)
    code, _ = _cli(["report", str(d), "--out", str(page)], capsys)
    assert page.exists() == (code == 0)  # no page, or a whole one
    if code == 0:
        assert page.read_text().rstrip().endswith("</html>")


@fuzz(20)
@given(data=mutated((ROOT / "examples" / "scaling_synthetic.csv").read_bytes()[:700]))
def test_report_scaling_csv(data, tiny_run, scratch, capsys):
    csv = _example(scratch, "s.csv", data)
    page = scratch / "page.html"
    page.unlink(missing_ok=True)
    code, _ = _cli(["report", str(tiny_run), "--scaling", str(csv), "--out", str(page)], capsys)
    assert page.exists() == (code == 0)
