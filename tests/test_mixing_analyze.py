"""`raretask analyze`: known shares in every format, rules, malformed rows, the fit, the risk."""

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_calls import run_cli as run

from raretask.errors import UserError
from raretask.mixing.analyze import analyze, fit_power_law, mark_risk
from raretask.mixing.rules import RuleSet, load_rules
from raretask.mixing.thresholds import TheoryThreshold
from raretask.theory import TaskSet, Theory

DATA = Path(__file__).parent / "data"
COUNTS = {"chat": 600, "code": 250, "math": 100, "poetry": 40, "arith": 10}
WORDS = {"chat": 3, "code": 5, "math": 2, "poetry": 4, "arith": 1}


def rows():
    out = []
    for i in range(max(COUNTS.values())):  # interleaved, as real data would be
        for t, n in COUNTS.items():
            if i < n:
                out.append({"task": t, "text": " ".join(["w"] * WORDS[t]), "id": len(out)})
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rs = rows()
    (d / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    with open(d / "d.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "task", "text"])
        w.writeheader()
        w.writerows(rs)
    pq.write_table(pa.Table.from_pylist(rs), d / "d.parquet", row_group_size=97)
    return d




@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.parquet"])
def test_known_shares_and_tokens_in_every_format(files, name):
    a = analyze([files / name], task_field="task")
    total = sum(COUNTS.values())
    assert a.examples == total and a.skipped == 0
    assert [t.task for t in a.tasks] == list(COUNTS)  # most frequent first
    for t in a.tasks:
        assert t.count == COUNTS[t.task]
        assert t.share == COUNTS[t.task] / total
        assert t.tokens == COUNTS[t.task] * WORDS[t.task]
    assert a.tokens == sum(COUNTS[t] * WORDS[t] for t in COUNTS)


def test_huggingface_save_to_disk_dataset_and_dict():
    a = analyze([DATA / "hf_dataset"], task_field="task")
    assert [(t.task, t.count, t.tokens) for t in a.tasks] == \
        [("alpha", 60, 180), ("beta", 30, 60), ("gamma", 10, 10)]
    d = analyze([DATA / "hf_dict"], task_field="task")  # both splits, summed
    assert [(t.task, t.count, t.tokens) for t in d.tasks] == [("x", 12, 20), ("y", 8, 10)]


def test_several_files_add_up(files):
    a = analyze([files / "d.jsonl", files / "d.parquet"], task_field="task")
    assert a.examples == 2 * sum(COUNTS.values())
    assert a.tasks[-1].count == 2 * COUNTS["arith"]


def test_power_law_fit_recovers_the_exponent():
    ranks = np.arange(1, 41)
    fit = fit_power_law(1e6 * ranks ** -1.5)
    assert fit.exponent == pytest.approx(1.5, abs=1e-9) and fit.r2 == pytest.approx(1.0)
    assert fit_power_law([0.5, 0.5]) is None


def test_rules_tag_text_first_match_wins(tmp_path):
    texts = ["12 + 30 = 42", "def f(x): return x", "import os", "a poem of the sea", "2*3="]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    rules = RuleSet.model_validate({
        "field": "body", "default": "other",
        "rules": [{"task": "arith", "regex": r"\d+\s*[-+*/]\s*\d+\s*="},
                  {"task": "code", "keywords": ["DEF ", "import "], "case_sensitive": False}]})
    a = analyze([p], rules=rules)
    assert {t.task: t.count for t in a.tasks} == {"arith": 2, "code": 2, "other": 1}
    rules.default = None
    with pytest.raises(UserError, match=r"t.jsonl line 4: no rule matches"):
        analyze([p], rules=rules)


def test_rules_file_unknown_key_and_bad_regex(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rules:\n  - task: a\n    regx: 'x'\n")
    with pytest.raises(UserError, match=r"r.yaml: rules.0.regx: unknown key"):
        load_rules(p)
    p.write_text("rules:\n  - task: a\n    regex: '(x'\n")
    with pytest.raises(UserError, match=r"rules.0: regex does not compile"):
        load_rules(p)


def test_malformed_jsonl_exits_2_naming_file_and_line_and_writes_nothing(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"task": "a"}\n{"task": "b"}\n{"task": \n{"task": "a"}\n')
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "analyze", str(p), "--task-field", "task", "--out", str(out))
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"{p} line 3: not valid JSON" in err
    assert not out.exists()
    code, stdout, err = run(capsys, "analyze", str(p), "--task-field", "task", "--skip-bad",
                            "--json")
    assert code == 0
    res = json.loads(stdout)
    assert res["skipped"] == 1 and {t["task"]: t["count"] for t in res["tasks"]} == \
        {"a": 2, "b": 1}


def test_malformed_csv_and_parquet_rows_are_named(tmp_path):
    c = tmp_path / "bad.csv"
    c.write_text("task,text\na,x y\nb,x,z\n")
    with pytest.raises(UserError, match=r"bad.csv line 3: expected 2 fields, got 3"):
        analyze([c], task_field="task")
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"task": ["a", None, "b"], "text": ["x", "y", "z"]}), p)
    with pytest.raises(UserError, match=r"bad.parquet row 2: field 'task' is missing"):
        analyze([p], task_field="task")
    a = analyze([p], task_field="task", skip_bad=True)
    assert a.skipped == 1 and a.examples == 2


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unknown data format '.txt'"):
        analyze([tmp_path / "x.txt"], task_field="task")
    with pytest.raises(UserError, match="no such file"):
        analyze([tmp_path / "nope.jsonl"], task_field="task")


def test_size_marks_exactly_the_tasks_theory_says_are_not_learned(files):
    a = analyze([files / "d.jsonl"], task_field="task")
    thr = TheoryThreshold(a.names(), alpha=2.0, features=8)
    width = 6
    marked = mark_risk(a, width, thr)
    th = Theory(TaskSet(tuple(a.names()), a.shares(), tuple(thr.spectra)))
    assert [t.at_risk for t in marked.tasks] == list(~th.learned(width))
    assert any(t.at_risk for t in marked.tasks) and not all(t.at_risk for t in marked.tasks)
    for k, t in enumerate(marked.tasks):
        assert t.required_share == th.required_frequency(k, width)


def test_cli_writes_analysis_and_plot(files, tmp_path, capsys):
    out = tmp_path / "a"
    code, stdout, _ = run(capsys, "analyze", str(files / "d.csv"), "--task-field", "task",
                          "--size", "6", "--features", "8", "--out", str(out))
    assert code == 0 and "at risk" in stdout
    assert (out / "rank_frequency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["examples"] == sum(COUNTS.values()) and saved["size"] == 6
