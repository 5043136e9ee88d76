"""Token counts from a real tokenizer (issue 22, item 1): a tokenizers JSON built here, a
save_pretrained directory, an offline pretrained name; and the plan's shares in both units."""

import json
from pathlib import Path

import pytest
from cli_calls import run_cli as run
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from raretask.mixing.analyze import analyze
from raretask.mixing.token_counts import BATCH, load_token_counter

BPE_CORPUS = ["the cat sat on the mat", "def f(x): return x + 1", "2 + 3 = 5", "the dog sat"]
# (task, text, whitespace words, BPE tokens): the BPE counts are pinned from the trained tokenizer
ROWS = [("prose", "the cat sat on the mat", 6, 6),
        ("code", "def f(x): return x + 1", 6, 10),
        ("math", "12 + 34 = 46", 5, 8)]




@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    # WordLevel over a pre-tokenizer that splits punctuation, with [CLS] ... [SEP] added by the
    # post-processor and truncation to 2 saved in the file: neither may change the counts
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "the": 3, "cat": 4, "sat": 5, ",": 6, ".": 7}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    wl.enable_truncation(2)
    wl.save(str(d / "wordlevel.json"))
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(BPE_CORPUS * 5, trainers.BpeTrainer(
        vocab_size=40, special_tokens=["[UNK]"], show_progress=False))
    bpe.save(str(d / "bpe.json"))
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [(t, x) for t, x, _, _ in ROWS for _ in range({"prose": 5, "code": 3, "math": 2}[t])]
    (d / "d.jsonl").write_text("".join(json.dumps({"task": t, "text": x}) + "\n"
                                       for t, x in rows))
    return d / "d.jsonl"


def test_wordlevel_counts_pieces_without_specials_or_truncation(tok_dir, tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_text('{"task": "a", "text": "the cat, sat."}\n{"task": "a", "text": "the cat, sat."}\n'
                 '{"task": "b", "text": "the dog"}\n')
    words = analyze([p], task_field="task")
    toks = analyze([p], task_field="task", tokenizer=tok_dir / "wordlevel.json")
    assert {t.task: t.tokens for t in words.tasks} == {"a": 6, "b": 2}
    # the, cat, ",", sat, "." = 5 per row; "dog" is [UNK]: 2
    assert {t.task: t.tokens for t in toks.tasks} == {"a": 10, "b": 2}
    assert toks.tokens == 12 and toks.token_unit == "tokenizer wordlevel.json (WordLevel) of 'text'"
    assert [t.token_share for t in toks.tasks] == [10 / 12, 2 / 12]


def test_bpe_counts_are_pinned_and_differ_from_words(tok_dir, data):
    a = analyze([data], task_field="task", tokenizer=tok_dir / "bpe.json")
    n = {"prose": 5, "code": 3, "math": 2}
    assert {t.task: t.tokens for t in a.tasks} == {t: n[t] * bpe for t, _, _, bpe in ROWS}
    assert {t.task: t.tokens for t in a.tasks} == {"prose": 30, "code": 30, "math": 16}
    w = analyze([data], task_field="task")
    assert {t.task: t.tokens for t in w.tasks} == {"prose": 30, "code": 18, "math": 10}


def test_counts_are_the_same_across_batches(tok_dir, tmp_path):
    p = tmp_path / "big.jsonl"
    n = 2 * BATCH + 7
    p.write_text("".join(json.dumps({"task": "ab"[i % 2], "text": ROWS[i % 3][1]}) + "\n"
                         for i in range(n)))
    a = analyze([p], task_field="task", tokenizer=tok_dir / "bpe.json")
    want = {"a": 0, "b": 0}
    for i in range(n):
        want["ab"[i % 2]] += ROWS[i % 3][3]
    assert {t.task: t.tokens for t in a.tasks} == want


def test_save_pretrained_directory_counts_as_its_json(tok_dir, data, tmp_path):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "bpe.json"), unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "saved")
    a = analyze([data], task_field="task", tokenizer=str(tmp_path / "saved"))
    assert {t.task: t.tokens for t in a.tasks} == {"prose": 30, "code": 30, "math": 16}
    assert a.token_unit.startswith("tokenizer ") and "(BPE)" in a.token_unit


def test_cli_tokenizer_errors_are_one_line(tok_dir, data, tmp_path, capsys):
    args = ("analyze", data, "--task-field", "task", "--out", tmp_path / "o", "--tokenizer")
    code, out, err = run(capsys, *args, "no-such-org/no-such-tokenizer-xyz")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: --tokenizer 'no-such-org/no-such-tokenizer-xyz': not a "
                          "tokenizers JSON file, and no pretrained tokenizer of that name is "
                          "available offline")
    code, _, err = run(capsys, *args, tmp_path / "missing.json")
    assert code == 2 and err == f"error: --tokenizer {tmp_path / 'missing.json'}: no such file\n"
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    code, _, err = run(capsys, *args, bad)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --tokenizer {bad}: not a Hugging Face tokenizers JSON file (")
    code, _, err = run(capsys, "analyze", data, "--task-field", "task", "--tokens-field", "n",
                       "--tokenizer", tok_dir / "bpe.json")
    assert code == 2 and err.startswith("error: --tokens-field: the data's own token counts")
    assert not (tmp_path / "o").exists()


def test_words_are_the_default(data):
    assert load_token_counter(None).count(["a  b\tc", ""]) == [3, 0]
    assert analyze([data], task_field="task").token_unit == "whitespace words of 'text'"


def test_plan_shows_and_records_both_units(tok_dir, data, tmp_path, capsys):
    a = tmp_path / "a"
    assert run(capsys, "analyze", data, "--task-field", "task", "--tokenizer",
               tok_dir / "bpe.json", "--out", a)[0] == 0
    # tokens per example: prose 6, code 10, math 8; natural example shares 0.5, 0.3, 0.2
    code, out, _ = run(capsys, "plan", a, "--size", "16", "--alpha", "2", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["tokens_per_example"] == {"prose": 6.0, "code": 10.0, "math": 8.0}
    assert plan["token_unit"] == "tokenizer bpe.json (BPE) of 'text'"
    w = {t["task"]: t["weight"] for t in plan["tasks"]}
    mass = {k: w[k] * plan["tokens_per_example"][k] for k in w}
    assert plan["shares"]["examples"]["planned"] == pytest.approx(w, abs=1e-15)
    assert plan["shares"]["tokens"]["planned"] == pytest.approx(
        {k: v / sum(mass.values()) for k, v in mass.items()}, abs=1e-12)
    assert plan["shares"]["tokens"]["natural"] == pytest.approx(
        {"prose": 30 / 76, "code": 30 / 76, "math": 16 / 76}, abs=1e-12)
    code, out, _ = run(capsys, "plan", a, "--size", "16", "--alpha", "2")
    assert code == 0
    assert "examples" in out and "tokens" in out and "39.5%" in out  # prose: 30/76 of tokens
    assert "tokenizer bpe.json (BPE)" in out
    # the same plan in tokens: the shares agree across units
    code, out, _ = run(capsys, "plan", a, "--size", "16", "--alpha", "2", "--unit", "tokens",
                       "--json")
    tok_plan = json.loads(out)
    assert tok_plan["unit"] == "tokens"
    assert tok_plan["shares"]["examples"]["natural"] == pytest.approx(
        {"prose": 0.5, "code": 0.3, "math": 0.2}, abs=1e-12)


def test_token_unit_survives_the_round_trip(tok_dir, data, tmp_path, capsys):
    a = tmp_path / "a"
    assert run(capsys, "analyze", data, "--task-field", "task", "--tokenizer",
               tok_dir / "wordlevel.json", "--out", a)[0] == 0
    saved = json.loads(Path(a / "analysis.json").read_text())
    assert saved["token_unit"] == "tokenizer wordlevel.json (WordLevel) of 'text'"
    assert saved["rows_without_text"] == 0
