"""How much of an LM cell's background validation loss is the row format, not the text.

Every training row that carries an instance starts with it (TOK1 TOK2 LABEL EOD over its first
4 tokens, as the paper does); validation rows are plain held-out text. When every row carries
one (T_ADD at 1/32 per token in rows of 32), a model may learn to read text only after that
prefix. This prints, for a cell's weights (``final.safetensors``, or its last checkpoint):

* the validation loss as the trainer measures it, and per target position;
* the loss on fresh rows of the training background (a seed never trained on), plain;
* the same rows with a training instance written over their first 4 tokens, scored on the
  text after it (targets 4..), against the plain rows' targets 4..

Usage (CPU is fine for the small presets)::

    python benchmarks/lm_val_format.py RUN_DIR CELL [--rows 1024]
"""

from __future__ import annotations

import argparse
import sys

import torch

from raretask.errors import UserError
from raretask.lm.config import LMCell
from raretask.lm.export_hf import cell_weights
from raretask.lm.model import Transformer
from raretask.lm.tasks import INSTANCE_LEN, N_TRAIN, inject
from raretask.runs.profile import Profile
from raretask.studies.lm import build_trainer


def token_losses(model: Transformer, rows: torch.Tensor) -> torch.Tensor:
    """Loss of every next-token target of ``rows`` [B, T + 1]: [B, T]."""
    return model.token_losses(rows[:, :-1], rows[:, 1:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("cell", type=int)
    ap.add_argument("--rows", type=int, default=1024, help="rows of each kind (default 1024)")
    args = ap.parse_args(argv)

    try:
        fields, state, source = cell_weights(args.run_dir, args.cell)
    except UserError as err:  # one line, exit 2, as the CLI's user errors
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # the cell's own background, task and model, built as its run built them
    cell = LMCell(**{k: v for k, v in fields.items() if k in LMCell.model_fields})
    trainer = build_trainer(cell, Profile().resolve("cpu"))
    bg, task, model, seq_len = trainer.background, trainer.task, trainer.model, cell.seq_len
    model.load_state_dict(state)
    model.eval()
    batch = 64
    with torch.no_grad():
        val = torch.cat([token_losses(model, b) for b in bg.validation_batches(
            seq_len, batch, max_tokens=args.rows * seq_len)])
        stream = bg.stream(batch, seq_len, seed=10_000 + cell.seed)
        steps = max(args.rows // batch, 1)
        plain = torch.cat([token_losses(model, stream.batch(s)) for s in range(steps)])
        pick = torch.Generator().manual_seed(0)
        framed = []
        for s in range(steps, 2 * steps):
            rows = stream.batch(s)
            chosen = torch.randint(0, N_TRAIN, (rows.shape[0],), generator=pick)
            framed.append(token_losses(model, inject(rows, task.instances("train")[chosen])[0]))
        framed = torch.cat(framed)

    def per_position(losses: torch.Tensor) -> str:
        p = losses.mean(0).tolist()
        return " ".join(f"{v:.2f}" for v in p[:6]) + " ... " + f"{p[-1]:.2f}"

    k = INSTANCE_LEN
    print(f"{args.run_dir} cell {args.cell} ({cell.size}, {cell.task}, weights "
          f"{source}); rows of {seq_len} tokens")
    print(f"validation text, as trained:  loss {val.mean():.3f}   by position {per_position(val)}")
    print(f"fresh background rows, plain: loss {plain.mean():.3f}   by position "
          f"{per_position(plain)}")
    print(f"text after token {k}: plain rows {plain[:, k:].mean():.3f}, rows with an instance "
          f"first {framed[:, k:].mean():.3f}")


if __name__ == "__main__":
    main()
