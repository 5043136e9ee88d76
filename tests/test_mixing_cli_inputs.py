"""Bad inputs to analyze and plan (issue 22, item 7): one line naming the file, line or field,
exit 2, nothing written; BOM headers read; tables never cut numbers; at-risk only with a basis."""

import csv
import io
import json

import pytest
from cli_calls import run_cli as run
from rich.console import Console

from raretask.mixing import cli as mixing_cli
from raretask.mixing.analyze import analyze


@pytest.fixture(scope="module")
def analysis_text(tmp_path_factory):
    d = tmp_path_factory.mktemp("an") / "d.jsonl"
    d.write_text("".join(json.dumps({"task": t, "text": "w " * (1 + i % 4)}) + "\n"
                         for i, t in enumerate("a" * 50 + "b" * 30 + "c" * 20)))
    return json.dumps(analyze([d], task_field="task").to_json())  # what analyze --out writes


@pytest.fixture
def analysis(analysis_text):
    return json.loads(analysis_text)


def edited(tmp_path, obj, name="edited.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


@pytest.mark.parametrize(("edit", "message"), [
    (lambda a: a["tasks"][0].update(count=10**400), "tasks.0.count: expected an integer from 0 "
     "to 9,007,199,254,740,992, got 1000000000000000000000000000000000000..."),
    (lambda a: a["tasks"][1].update(tokens=None), "tasks.1.tokens: null, but the analysis counts "
     "tokens (tokens: 250); every task needs its token count"),
    (lambda a: a["tasks"][2].update(task="a"), "tasks.2.task: 'a' repeats tasks.0.task (task "
     "names must be unique)"),
    (lambda a: a["tasks"][1].update(count=-3), "tasks.1.count: expected an integer from 0 to "
     "9,007,199,254,740,992, got -3"),
    (lambda a: a["tasks"][1].update(count=True), "tasks.1.count: expected an integer"),
    (lambda a: a["tasks"][0].update(share=float("nan")), "tasks.0.share: expected a share from "
     "0 to 1, got nan"),
    (lambda a: a.update(tokens=None), "tokens: null, but tasks.0.tokens is"),
    (lambda a: a["tasks"][0].update(task=""), "tasks.0.task: expected a name, got ''"),
    # totals edited alone (issue 22 review): the plan would read counts that the file contradicts
    (lambda a: a.update(examples=99), "examples: 99, but the tasks' counts add up to 100"),
    (lambda a: a.update(tasks=a["tasks"][:1]), "examples: 100, but the tasks' counts add up to "
     "50"),
    (lambda a: a.update(tokens=251), "tokens: 251, but the tasks' tokens add up to 250"),
    (lambda a: a["tasks"][2].update(count=0), "tasks.2: 50 tokens in 0 examples"),
    (lambda a: a.update(tasks=[], examples=0, tokens=None), "tasks: expected at least one task"),
])
@pytest.mark.parametrize("unit", ["examples", "tokens"])
def test_edited_analysis_is_refused_in_one_line(tmp_path, capsys, analysis, edit, message, unit):
    edit(analysis)
    src = edited(tmp_path, analysis)
    out = tmp_path / "plan"
    code, stdout, err = run(capsys, "plan", src, "--size", "16", "--unit", unit, "--out", out)
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert err.startswith(f"error: {src}: {message}")
    assert not out.exists()


def test_bom_csv_and_jsonl_headers_are_read(tmp_path):
    rows = [{"task": t, "text": "x y"} for t in "aab"]
    plain = tmp_path / "plain.csv"
    with open(plain, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["task", "text"])
        w.writeheader()
        w.writerows(rows)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # as Excel's "CSV UTF-8" saves it
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    want = [("a", 2, 4), ("b", 1, 2)]
    for p in (plain, bom, jsonl):
        assert [(t.task, t.count, t.tokens) for t in analyze([p], task_field="task").tasks] == want


def test_a_wrong_text_field_is_refused_not_silently_tokenless(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text('{"task": "a", "body": "x y"}\n{"task": "b", "body": "z"}\n')
    code, out, err = run(capsys, "analyze", p, "--task-field", "task", "--text-field", "text",
                         "--out", tmp_path / "o")
    assert code == 2 and out == ""
    assert err == f"error: --text-field 'text': no row of {p} has this field (its fields: task, " \
                  "body)\n"
    assert not (tmp_path / "o").exists()
    # without naming one, data with no text field is analysed, and the table says why no tokens
    code, out, _ = run(capsys, "analyze", p, "--task-field", "task")
    assert code == 0 and "no token counts (no row has a 'text' field" in " ".join(out.split())
    assert [t.tokens for t in analyze([p], task_field="task", text_field="body").tasks] == [2, 1]


def test_rows_without_the_text_are_counted_and_said(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text('{"task": "a", "text": "x y"}\n{"task": "a"}\n{"task": "b", "text": "z"}\n')
    a = analyze([p], task_field="task")
    assert a.rows_without_text == 1 and [t.tokens for t in a.tasks] == [2, 1]
    code, out, _ = run(capsys, "analyze", p, "--task-field", "task")
    assert code == 0 and "1 rows have no text field and add no tokens" in " ".join(out.split())


@pytest.fixture
def wide(monkeypatch):
    """The CLI's console at 80 columns, as a terminal would give it."""
    buf = io.StringIO()
    monkeypatch.setattr(mixing_cli, "console", Console(file=buf, width=80, no_color=True))
    return buf


def test_analyze_table_at_80_columns_keeps_every_number_whole(tmp_path, capsys, wide):
    p = tmp_path / "d.jsonl"
    big = [123_456_789_012, 98_765_432_101, 1_234_567]
    names = ["a_rather_long_task_name_from_a_real_corpus", "another_long_source_name", "rare"]
    p.write_text("".join(json.dumps({"task": n, "ntok": big[k]}) + "\n"
                         for k, n in enumerate(names) for _ in range(3 - k)))
    code, _, _ = run(capsys, "analyze", p, "--task-field", "task", "--tokens-field", "ntok",
                     "--size", "4", "--features", "8")
    text = wide.getvalue()
    assert code == 0
    for n in ("370,370,367,036", "197,530,864,202", "1,234,567", "50%", "33.3%", "16.7%"):
        assert n in text, n
    assert "…" not in text
    assert "a_rather" in text  # long names fold onto further lines rather than hide numbers


def test_plan_table_at_80_columns_keeps_every_number_whole(tmp_path, capsys, analysis, wide):
    src = edited(tmp_path, analysis)
    code, _, _ = run(capsys, "plan", src, "--size", "16", "--target", "c", "--margin", "3")
    assert code == 0
    text = wide.getvalue()
    plan = json.loads(run(capsys, "plan", src, "--size", "16", "--target", "c", "--margin", "3",
                          "--json")[1])
    for t in plan["tasks"]:
        assert mixing_cli._pct(t["weight"]) in text
        assert mixing_cli._pct(plan["shares"]["tokens"]["planned"][t["task"]]) in text
    assert "…" not in text


def test_at_risk_only_with_a_basis_for_it(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"task": t, "text": "x"}) + "\n" for t in "a" * 90 + "b"))
    code, out, _ = run(capsys, "analyze", p, "--task-field", "task", "--size", "4")
    flat = " ".join(out.split())
    assert code == 0 and "at risk unknown: the share a task needs depends on the model" in flat
    assert "needs" not in out.split("──")[0]  # no needs / at risk columns
    code, out, _ = run(capsys, "analyze", p, "--task-field", "task", "--size", "4", "--json")
    res = json.loads(out)
    assert res["size"] == 4 and res["extra"]["at_risk"].startswith("unknown")
    assert [t["at_risk"] for t in res["tasks"]] == [None, None]
    # the toy theory asked for on purpose: marked
    code, out, _ = run(capsys, "analyze", p, "--task-field", "task", "--size", "4",
                       "--features", "8", "--json")
    res = json.loads(out)
    assert [t["at_risk"] for t in res["tasks"]] == [False, True]
    assert res["threshold"].startswith("theory") and "at_risk" not in res["extra"]
    code, _, err = run(capsys, "analyze", p, "--task-field", "task", "--size", "nan")
    assert code == 2 and err == "error: --size must be a finite number > 0, got nan\n"


def test_at_risk_says_it_judges_example_shares_when_tokens_differ(tmp_path, capsys):
    """issue 22 review: 'b' is 10% of the examples but 1/91 of the tokens; analyze's at-risk
    marks judge example shares (b is not at risk there) and now say so, naming plan --unit
    tokens, which judges the token shares (b not learned under the natural mix)."""
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"task": t, "text": "w " * (10 if t == "a" else 1)}) + "\n"
                         for t in "a" * 9 + "b"))
    code, out, _ = run(capsys, "analyze", p, "--task-field", "task", "--size", "4", "--alpha",
                       "2", "--features", "8", "--out", tmp_path / "an")
    flat = " ".join(out.split())
    assert code == 0 and "needs and at risk judge the example shares; for training that mixes " \
        "tokens, `raretask plan --unit tokens` judges the token shares" in flat
    res = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert [t["at_risk"] for t in res["tasks"]] == [False, False]
    plan = json.loads(run(capsys, "plan", tmp_path / "an", "--size", "4", "--unit", "tokens",
                          "--alpha", "2", "--features", "8", "--json")[1])
    assert [t["learned_natural"] for t in plan["tasks"]] == [True, False]
