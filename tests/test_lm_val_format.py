"""benchmarks/lm_val_format.py: its validation loss is the trainer's, and it reads a cell's saved
weights (or says in one line why it cannot)."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from raretask.config import load_experiment
from raretask.runs.grid import GridRun

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lm_val_format",
                                               ROOT / "benchmarks" / "lm_val_format.py")
script = importlib.util.module_from_spec(_spec)
sys.modules["lm_val_format"] = script
_spec.loader.exec_module(script)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("valformat") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RARETASK_CACHE", str(tmp_path_factory.mktemp("cache")))
        try:  # every row opens with an instance (1/16 per token in rows of 16)
            GridRun(load_experiment(None, [
                "kind=lm", "size=tiny", "vocab_size=512", "seq_len=16", "batch_size=16",
                "steps=8", "task=add", "rate=0.0625", "source=ngram", "eval_points=2",
                "probes=false", "save_model=true"]), out).run()
            yield out
        finally:
            torch.set_num_threads(before)


def test_validation_loss_is_the_trainers_and_the_framed_rows_are_scored(saved_run, capsys):
    row = json.loads((saved_run / "summary.json").read_text())[0]
    # the trainer scores 4 batches of 16 rows: the same 64 windows, in one batch of 64 here
    script.main([str(saved_run), "0", "--rows", "64"])
    out = capsys.readouterr().out
    val = float(re.search(r"validation text, as trained: +loss ([\d.]+)", out)[1])
    assert val == pytest.approx(row["val_loss"], abs=2e-3)  # printed to 3 decimals
    plain, framed = map(float, re.search(
        r"text after token 4: plain rows ([\d.]+), rows with an instance first ([\d.]+)", out
    ).groups())
    assert plain > 0 and framed > 0
    assert "weights final.safetensors" in out


def test_a_run_without_weights_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        script.main([str(tmp_path), "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path}: no cells.json")
