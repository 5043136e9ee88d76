"""Export to Hugging Face (raretask.lm.export_hf, `raretask export-hf`): the checkpoint loads with
``Olmo2ForCausalLM.from_pretrained`` and gives raretask's logits; nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from raretask.cli import main
from raretask.lm.export_hf import export_cell, export_weights, hf_state_dict
from raretask.lm.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")


def trained_like(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose norms are not all 1 (as after training), so a misplaced norm would show."""
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def logits_both(model: Transformer, out, vocab: int):
    hf = transformers.Olmo2ForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, vocab, (3, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model.logits(idx), hf(input_ids=idx).logits


@pytest.mark.parametrize("tie", [False, True])
def test_exported_tiny_gives_the_same_logits(tmp_path, tie, one_thread):
    cfg = ModelConfig.preset("tiny", tie_embeddings=tie)
    model = trained_like(cfg)
    out = export_weights(model.state_dict(), cfg, tmp_path / "hf")
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    ours, theirs = logits_both(model, out, cfg.vocab_size)
    assert ours.shape == theirs.shape == (3, 19, 256)
    assert (ours - theirs).abs().max().item() < 1e-4
    hf_cfg = json.loads((out / "config.json").read_text())
    dims = (hf_cfg["hidden_size"], hf_cfg["num_hidden_layers"], hf_cfg["vocab_size"])
    assert dims == (64, 2, 256)
    assert hf_cfg["tie_word_embeddings"] is tie


def test_every_parameter_has_one_hf_name():
    state = Transformer(ModelConfig.preset("tiny")).state_dict()
    mapped = hf_state_dict(state)
    assert len(mapped) == len(state) == 2 + 2 * 11 + 1  # embed, head, 11 per block, final norm
    assert "model.layers.1.post_feedforward_layernorm.weight" in mapped


def run_dir(tmp_path, weights_name: str):
    """A run directory as a grid leaves it: cells.json and the cell's group with its weights."""
    cfg = ModelConfig.preset("tiny", vocab_size=512, max_seq_len=32)
    model = trained_like(cfg, seed=3)
    run = tmp_path / "run"
    (run / "groups" / "g0000").mkdir(parents=True)
    (run / "cells.json").write_text(json.dumps([
        {"cell": 0, "group": "g0000", "size": "tiny", "task": "cmp", "seq_len": 32}]))
    weights = run / "groups" / "g0000" / weights_name
    weights.parent.mkdir(exist_ok=True)  # a checkpoint's lie in ckpt/
    save_file(model.state_dict(), str(weights))
    return run, model


def test_export_hf_command_from_a_finished_cell(tmp_path, capsys, one_thread):
    run, model = run_dir(tmp_path, "final.safetensors")
    with pytest.raises(SystemExit) as exc:
        main(["export-hf", str(run), "--cell", "0", "--out", str(tmp_path / "hf")])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"{tmp_path / 'hf'}: Olmo2ForCausalLM from final.safetensors")
    ours, theirs = logits_both(model, tmp_path / "hf", 512)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_a_running_cell_exports_its_checkpoint_and_says_so(tmp_path):
    run, _ = run_dir(tmp_path, "ckpt/model.safetensors")
    assert export_cell(run, 0, tmp_path / "hf")[1] == "ckpt/model.safetensors"


@pytest.mark.parametrize(("args", "message"), [
    (["--cell", "3"], "--cell: 3 is not a cell of"),
    (["--cell", "0"], "no final.safetensors (run the cell with save_model: true"),
])
def test_bad_export_is_one_line_exit_2(tmp_path, capsys, args, message):
    run, _ = run_dir(tmp_path, "other.safetensors")
    with pytest.raises(SystemExit) as exc:
        main(["export-hf", str(run), *args, "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_export_is_one_set_that_replaces_only_its_own_files(tmp_path, capsys, one_thread):
    """A second export replaces the first whole and leaves no temporary beside it; a directory
    holding someone else's file is refused in one line and left as it was."""
    cfg = ModelConfig.preset("tiny")
    out = tmp_path / "hf"
    export_weights(trained_like(cfg, seed=0).state_dict(), cfg, out)
    second = trained_like(cfg, seed=5)
    export_weights(second.state_dict(), cfg, out)
    ours, theirs = logits_both(second, out, cfg.vocab_size)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no build directory left
    assert not {p.name for p in out.iterdir()} - {".raretask-set.json", "config.json",
                                                   "generation_config.json", "model.safetensors"}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tokenizer.json").write_text("{}")
    run, _ = run_dir(tmp_path, "final.safetensors")
    capsys.readouterr()  # the exports' progress bars
    with pytest.raises(SystemExit) as exc:
        main(["export-hf", str(run), "--cell", "0", "--out", str(mine)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "holds files raretask did not write ('tokenizer.json')" in err
    assert sorted(p.name for p in mine.iterdir()) == ["tokenizer.json"]
