"""How a run executes, apart from what it computes: the execution profile.

An experiment config (``configs/*.yaml``) says what to train and measure; the profile says where
and how fast: the device, precision, CUDA graphs, torch.compile, the attention kernel, the toy's
retraction, fusion and padding choices, and how many toy models share one optimizer step. It is
never a grid axis and never compared on resume, so the same YAML runs on a laptop and on a GPU
and a run directory started under one profile resumes under another (``profile.yaml`` in the
run directory records the last one used; a change of device is logged with a warning, because
CPU and CUDA kernels round differently).

A field left unset takes its value from :data:`DEVICE_DEFAULTS` for the resolved device. Set
fields under ``profile:`` in the experiment YAML, with ``--profile FILE`` (a YAML mapping of
these fields) or ``--set profile.FIELD=VALUE``, each over the last.

Example
-------
>>> Profile().resolve("cpu").retraction
'qr'
>>> Profile(compile=True).resolve("cuda").compile_mode
'reduce-overhead'
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from raretask.schema import StrictModel

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile modes an LM profile takes (benchmarks/lm_throughput.py offers the same)."""

Retraction = Literal["qr", "polar_once"]


class Profile(StrictModel):
    """Execution settings; ``None`` means "the device's default" (:data:`DEVICE_DEFAULTS`)."""

    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu' or 'cuda[:i]'.")
    # -- the toy -----------------------------------------------------------------------------
    group_size: int = Field(64, ge=1, le=100_000, description="Toy: most models trained "
                            "together in one optimizer step (the instance axis).")
    retraction: Retraction | None = Field(
        None, description="Toy: re-orthonormalisation after each Adam step: 'qr' (Householder "
        "QR, the reference) or 'polar_once' (one third-order polar pass from GEMMs only, same "
        "span, the fast choice on GPUs); the variants the GPU benchmarks compare live in "
        "benchmarks/toy_retractions.py.")
    tf32: bool | None = Field(None, description="Toy, CUDA: TF32 tensor cores for the "
                              "training matmuls (metrics stay float64).")
    cuda_graph: bool | None = Field(None, description="Toy, CUDA: replay each step as a graph.")
    fuse: bool | None = Field(None, description="Toy, CUDA: the step's masked residual as one "
                              "compiled kernel.")
    share_inputs: bool | None = Field(None, description="Toy, CUDA: one GEMM per seed over its "
                                      "instances' encoders side by side.")
    group_streams: bool | None = Field(None, description="Toy, CUDA: each width group on its "
                                       "own stream inside the step.")
    pad_width: int | None = Field(None, ge=0, description="Toy, CUDA, GEMM retraction: widths "
                                  "up to this train as one padded group (0: one group each).")
    # -- language models ---------------------------------------------------------------------
    compile: bool | None = Field(None, description="LM: torch.compile the training step.")
    compile_mode: Literal[COMPILE_MODES] | None = (
        Field(None, description="LM: torch.compile mode; 'reduce-overhead' replays the step as "
              "CUDA graphs (small models are bound by kernel launches); 'max-autotune' also "
              "tunes GEMM kernels and fuses elementwise work into them (minutes to compile)."))
    attention: Literal["auto", "flash", "cudnn", "efficient", "math"] | None = Field(
        None, description="LM: the scaled_dot_product_attention backend (cudnn, efficient: "
        "CUDA only).")
    deterministic: bool | None = Field(None, description="LM: deterministic kernels only (the "
                                       "same numbers alone or packed on one GPU; slower).")
    stack_seeds: int | None = Field(
        None, ge=1, le=64, description="LM: train up to this many cells that differ only in "
        "the seed as one model with a seed axis (raretask.lm.stacked; the same numbers up to "
        "float rounding, each cell's files as alone); 1: every cell alone.")

    def resolve(self, device: str) -> Profile:
        """The profile a run uses and logs: every field set, the unset ones to ``device``'s
        defaults (``device`` already resolved: 'cpu' or 'cuda[:i]')."""
        kind = "cuda" if device.startswith("cuda") else "cpu"
        values = {**DEVICE_DEFAULTS[kind],
                  **{k: v for k, v in self.model_dump().items() if v is not None}}
        return Profile(**{**values, "device": device})

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    # CPU: exact per-instance arithmetic (the reference numbers); CUDA-only switches off
    "cpu": {"retraction": "qr", "tf32": False, "cuda_graph": False, "fuse": False,
            "share_inputs": False, "group_streams": False, "pad_width": 128,
            "compile": False, "compile_mode": "default", "attention": "auto",
            "deterministic": False, "stack_seeds": 1},
    # CUDA: the fastest settings measured on one H200 (benchmarks/RESULTS.md)
    "cuda": {"retraction": "polar_once", "tf32": True, "cuda_graph": True, "fuse": True,
             "share_inputs": True, "group_streams": True, "pad_width": 128,
             "compile": True, "compile_mode": "reduce-overhead", "attention": "auto",
             "deterministic": False, "stack_seeds": 1},
}
"""The default of every unset profile field, per device kind."""

PROFILE_FIELDS = frozenset(Profile.model_fields)
"""Keys that belong to the profile: an experiment config that sets one at the top level is
refused with a hint naming ``profile.KEY``."""
