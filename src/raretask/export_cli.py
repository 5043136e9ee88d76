"""The `export-hf` command, registered on the main app (raretask/cli.py calls :func:`register`).

Light on purpose: importing :mod:`raretask.lm` loads torch (2-3 s), so the command imports
:mod:`raretask.lm.export_hf` only when it runs: `raretask predict` & co. start as fast as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export_hf(
    run_dir: Annotated[Path, typer.Argument(help="A language-model run directory.")],
    cell: Annotated[int, typer.Option("--cell", help="The cell to export.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for config.json and "
                                      "model.safetensors.")],
) -> None:
    """Write a cell's model as a transformers OLMo-2 checkpoint
    (Olmo2ForCausalLM.from_pretrained(OUT) gives raretask's logits)."""
    from raretask.lm.export_hf import FINAL_WEIGHTS, export_cell

    path, source = export_cell(run_dir, cell, out)
    note = "" if source == FINAL_WEIGHTS else " (its last checkpoint: the cell had not finished)"
    typer.echo(f"{path}: Olmo2ForCausalLM from {source}{note}")


def register(app: typer.Typer) -> None:
    """Add ``export-hf`` to the main app."""
    app.command("export-hf")(export_hf)
