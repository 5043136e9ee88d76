"""Trained models leave raretask: a cell's weights as a Hugging Face OLMo-2 checkpoint.

raretask's decoder (lm/model.py) is OLMo 2's architecture: normalised sublayer outputs, QK-norm
over the whole projection before RoPE (rotate-half layout), SwiGLU, no biases, untied head. So
``transformers``' ``Olmo2ForCausalLM`` computes the same function from the same tensors under
other names (:data:`HF_NAMES`); no tensor is permuted or reshaped. The export writes
``config.json`` and ``model.safetensors`` with ``save_pretrained`` (as one output set: a kill
leaves the previous export or the new one; ``--out`` must be new, empty or an earlier export), and
``Olmo2ForCausalLM.from_pretrained(DIR)`` gives raretask's logits (tests/test_lm_export_hf.py:
within 1e-4 in float32 on CPU).

From a run directory (``raretask export-hf RUN_DIR --cell N --out DIR``, registered by
:mod:`raretask.export_cli`, which keeps torch out of the CLI's start): the cell's fields come
from ``cells.json``; its weights from ``groups/gNNNN/final.safetensors`` (a cell run with
``save_model: true`` keeps its final weights there) or, for a cell still running or cut short,
from its last checkpoint ``ckpt/model.safetensors`` (the step is said). The vocabulary size is
read off the weights. The tokenizer (a BPE trained locally, lm/tokenizer.py) is not exported:
token ids are raretask's.

Example::

    >>> from raretask.lm.model import ModelConfig
    >>> cfg = ModelConfig.preset("tiny")
    >>> out = export_weights(cfg.build().state_dict(), cfg, "/tmp/tiny_hf")  # doctest: +SKIP
    >>> Olmo2ForCausalLM.from_pretrained(out)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from raretask.errors import UserError
from raretask.runs import store
from raretask.runs.outset import output_set

if TYPE_CHECKING:  # torch is imported by the functions that need it: `raretask --help` stays fast
    from torch import Tensor

    from raretask.lm.model import ModelConfig

FINAL_WEIGHTS = "final.safetensors"
"""A finished cell's final weights in its group directory (kept with ``save_model: true``)."""
CHECKPOINT_WEIGHTS = "ckpt/model.safetensors"
"""A running cell's last checkpoint weights (removed once the cell is done)."""

HF_FILES = ["config.json", "generation_config.json", "model.safetensors"]
"""What ``save_pretrained`` writes (the export's ``--out`` holds these and its set manifest)."""

HF_NAMES = [  # raretask parameter name -> Olmo2ForCausalLM name (transformers modeling_olmo2.py)
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"blocks\.(\d+)\.attn\.(q|k|v|o)_proj\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"blocks\.(\d+)\.attn\.(q|k)_norm\.weight", r"model.layers.\1.self_attn.\2_norm.weight"),
    (r"blocks\.(\d+)\.attn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
    (r"blocks\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_feedforward_layernorm.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]


def olmo2_config(cfg: ModelConfig, **extra):
    """An ``Olmo2Config`` with ``cfg``'s dimensions: full multi-head attention, untied unless
    ``cfg`` ties, no biases, no padding/bos/eos ids (raretask's EOD is a token like any other);
    ``extra``: further ``Olmo2Config`` fields (e.g. ``attn_implementation``)."""
    import transformers
    from transformers import Olmo2Config

    if int(transformers.__version__.split(".")[0]) >= 5:  # RoPE settings moved in v5
        rope = {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    else:
        rope = {"rope_theta": cfg.rope_theta}
    return Olmo2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, **rope,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, attention_dropout=0.0,
        initializer_range=cfg.init_std, use_cache=False,
        # the default pad id 1 would make embedding row 1 a padding_idx row
        pad_token_id=None, bos_token_id=None, eos_token_id=None, **extra,
    )


def hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """raretask's ``Transformer.state_dict()`` under ``Olmo2ForCausalLM``'s names (same tensors);
    an unknown name is a UserError."""
    out = {}
    for name, tensor in state.items():
        for pattern, target in HF_NAMES:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, target, name)] = tensor
                break
        else:
            raise UserError(f"no Olmo2ForCausalLM name for raretask parameter {name!r}")
    return out


def export_weights(state: dict[str, Tensor], cfg: ModelConfig, out: str | Path) -> Path:
    """Write ``state`` (raretask names, float32) as an OLMo-2 checkpoint in ``out``; returns it.

    The loading is strict: every HF parameter is given and nothing is left over (a tied model's
    one matrix fills both the embedding and the head).
    """
    from transformers import Olmo2ForCausalLM

    out = Path(out)
    model = Olmo2ForCausalLM(olmo2_config(cfg))
    mapped = {k: v.detach().float().contiguous() for k, v in hf_state_dict(state).items()}
    if cfg.tie_embeddings:
        mapped["lm_head.weight"] = mapped["model.embed_tokens.weight"]
    model.load_state_dict(mapped, strict=True)
    # built beside ``out`` and swapped in whole (runs/outset.py): a kill leaves the old export
    # or the new one, never save_pretrained's half-written files among the user's
    with output_set(out, "export-hf", HF_FILES) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for path in tmp.iterdir():  # save_pretrained does not fsync
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    return out


def cell_weights(run_dir: str | Path, cell: int) -> tuple[dict, dict[str, Tensor], str]:
    """(the cell's fields from ``cells.json``, its weights, which file they came from)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / "cells.json").exists():
        raise UserError(f"{run_dir}: no cells.json (not a run directory)")
    cells = store.read_cells(run_dir)
    if cell not in cells:
        raise UserError(f"--cell: {cell} is not a cell of {run_dir} (cells 0..{len(cells) - 1})")
    from raretask.lm.model import PRESETS

    fields = cells[cell]
    if fields.get("size") not in PRESETS:
        raise UserError(f"--cell: cell {cell} of {run_dir} is not a language model")
    gdir = run_dir / "groups" / fields["group"]
    for name in (FINAL_WEIGHTS, CHECKPOINT_WEIGHTS):
        if (gdir / name).exists():
            return fields, load_file(str(gdir / name)), name
    raise UserError(f"{gdir}: no {FINAL_WEIGHTS} (run the cell with save_model: true to keep its "
                    f"final weights) and no checkpoint {CHECKPOINT_WEIGHTS}")


def export_cell(run_dir: str | Path, cell: int, out: str | Path) -> tuple[Path, str]:
    """Export cell ``cell`` of ``run_dir`` to ``out``; returns (out, the weights file used)."""
    from raretask.lm.model import ModelConfig

    fields, state, source = cell_weights(run_dir, cell)
    if "embed.weight" not in state:
        raise UserError(f"{run_dir}: cell {cell}'s weights have no embed.weight")
    vocab = state["embed.weight"].shape[0]
    cfg = ModelConfig.preset(fields["size"], vocab_size=vocab,
                             max_seq_len=max(int(fields.get("seq_len", 8)), 8))
    return export_weights(state, cfg, out), source


__all__ = ["CHECKPOINT_WEIGHTS", "FINAL_WEIGHTS", "HF_NAMES", "cell_weights", "export_cell",
           "export_weights", "hf_state_dict", "olmo2_config"]
