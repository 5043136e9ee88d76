"""`raretask predict` end to end: JSON contract, task files, and one-line errors with exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raretask", *args], capture_output=True,
                          text=True, timeout=120)


def predict_json(*args: str) -> dict:
    res = run("predict", *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize(
    ("flags", "first", "critical", "frequent"),
    [
        (["--features", "32", "--beta", "1.5"], 70, 37, 6),
        (["--features", "32", "--beta", "2"], 119, 57, 3),
        (["--features", "16", "--beta", "1"], 46, 27, 14),
    ],
)
def test_check_values_from_the_issue(flags, first, critical, frequent):
    out = predict_json("--tasks", "32", "--alpha", "2", "--width", "64", *flags)
    assert set(out) == {"width", "frequent_tasks", "tasks"}
    assert out["width"] == 64 and out["frequent_tasks"] == frequent
    rare = out["tasks"][-1]
    assert rare["task"] == 32  # generated tasks are indexed from 1, in input order
    assert (rare["first_feature_width"], rare["critical_width"]) == (first, critical)
    assert [t["task"] for t in out["tasks"]] == list(range(1, 33))
    assert sum(t["features_kept"] for t in out["tasks"]) == 64
    assert all(t["learned"] == (t["features_kept"] >= 1) for t in out["tasks"])
    assert set(rare) == {"task", "frequency", "features_kept", "normalized_loss",
                         "first_feature_width", "critical_width", "required_frequency", "learned"}


def test_yaml_and_csv_task_files_agree():
    a = predict_json("--task-file", str(EXAMPLES / "tasks.yaml"), "--width", "16")
    b = predict_json("--task-file", str(EXAMPLES / "tasks.csv"), "--width", "16")
    assert a == b
    names = [t["task"] for t in a["tasks"]]
    assert names == ["web_text", "code", "math", "arithmetic", "rare_skill"]
    assert sum(t["frequency"] for t in a["tasks"]) == pytest.approx(1.0)
    assert a["tasks"][0]["frequency"] == pytest.approx(0.8)  # counts are normalised


def test_human_table_shows_every_task():
    res = run("predict", "--tasks", "8", "--features", "4", "--width", "6")
    assert res.returncode == 0
    assert "width N = 6" in res.stdout
    for k in range(1, 9):
        assert f"\n│ {k} " in res.stdout


def _bad(tmp_path, name: str, text: str | bytes, *extra: str):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    res = run("predict", "--task-file", str(path), "--width", "2", *extra)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stdout == ""  # no partial output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_negative_frequency(tmp_path):
    msg = _bad(tmp_path, "t.yaml", "tasks:\n - {name: a, frequency: -1, alpha: 2, features: 2}\n")
    assert "tasks.0.frequency" in msg


def test_all_zero_frequencies(tmp_path):
    msg = _bad(tmp_path, "t.yaml", "tasks:\n - {name: a, frequency: 0, alpha: 2, features: 2}\n"
               " - {name: b, frequency: 0, alpha: 2, features: 2}\n")
    assert "all task frequencies are zero" in msg


def test_width_beyond_total_features(tmp_path):
    res = run("predict", "--tasks", "4", "--features", "4", "--width", "17")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip() == ("error: width must be an integer in [1, 16] (the total feature "
                                  "count), got 17")


def test_malformed_csv_row_names_the_line(tmp_path):
    msg = _bad(tmp_path, "t.csv", "name,frequency,alpha,features\na,0.5,2,4\nb,abc,2,4\n")
    assert "t.csv line 3" in msg and "frequency" in msg


def test_csv_row_with_wrong_field_count(tmp_path):
    msg = _bad(tmp_path, "t.csv", "name,frequency,alpha,features\na,0.5,2\n")
    assert "line 2: expected 4 fields, got 3" in msg


def test_unknown_key_in_task_file(tmp_path):
    msg = _bad(tmp_path, "t.yaml", "tasks:\n - {name: a, frequency: 1, alpha: 2, featurs: 2}\n")
    assert "tasks.0.featurs: unknown key" in msg


def test_unknown_top_level_key(tmp_path):
    msg = _bad(tmp_path, "t.yaml", "task:\n - {name: a, frequency: 1, alpha: 2, features: 2}\n")
    assert "task: unknown key" in msg


def test_unknown_csv_column(tmp_path):
    msg = _bad(tmp_path, "t.csv", "name,freq,alpha,features\na,1,2,2\n")
    assert "unknown column 'freq'" in msg


def test_frequency_and_count_together(tmp_path):
    msg = _bad(tmp_path, "t.yaml",
               "tasks:\n - {name: a, frequency: 1, count: 3, alpha: 2, features: 2}\n")
    assert "exactly one of 'frequency' or 'count'" in msg


def test_broken_yaml_and_non_utf8(tmp_path):
    assert "line" in _bad(tmp_path, "t.yaml", "tasks: [\n  {name: a\n")
    assert "not UTF-8" in _bad(tmp_path, "u.yaml", b"tasks:\n - name: \xff\xfe\n")


def test_missing_file_and_bad_flag(tmp_path):
    assert "no such file" in _bad(tmp_path, "x.txt", "", "--task-file",
                                  str(tmp_path / "missing.yaml"))
    res = run("predict", "--width", "abc")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "--width" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
