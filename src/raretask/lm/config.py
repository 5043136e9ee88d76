"""Language-model experiment configs: one :class:`LMCell` per training run, grids of them.

Like the toy, any field may be a list in the YAML (a grid axis); unknown keys are errors.
Defaults are ours (the paper trains on Dolma for ~210B tokens; a laptop cannot) and stated where
each field is declared.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from raretask.config import FixArm, Grid, StrictModel
from raretask.lm.model import PRESETS


class LMCell(StrictModel):
    """One language-model run: a model size, a rare task at a rate, background text."""

    size: str = Field("tiny", description="Model preset: " + ", ".join(PRESETS) + ".")
    task: Literal["cmp", "add", "none"] = Field(
        "cmp", description="Injected task: T_CMP, T_ADD (PAPER.md Sec. 3) or none.")
    rate: float | None = Field(
        None, gt=0, le=0.25, allow_inf_nan=False,
        description="Instances of the task per training token (the paper's unit); required "
        "with a task.")
    delivery: Literal["even", "burst", "iid"] = Field(
        "even", description="How the rate arrives: 'even', the same count in every step (as "
        "evenly as whole instances allow); 'burst', rate x batch_size x seq_len x `every` "
        "instances at once every `every` steps (the paper's 'N instances every N batches'; "
        "every 1 is even); 'iid', each row carries an instance with probability rate x "
        "seq_len, drawn afresh every step.")
    every: int = Field(1, ge=1, description="Steps between bursts (delivery 'burst').")
    start: int = Field(0, ge=0, description="Inject only from this step on (0-based).")
    stop: int | None = Field(None, ge=1, description="Inject no more from this step on (None: "
                             "to the end): what is kept afterwards is retention.")
    steps: int = Field(2000, ge=1, le=10**8, description="Optimizer steps (ours: 2000).")
    batch_size: int = Field(32, ge=1, le=1 << 16, description="Global batch in sequences.")
    seq_len: int = Field(128, ge=8, le=1 << 16, description="Tokens per sequence.")
    lr: float = Field(3e-3, gt=0, le=1, allow_inf_nan=False, description="Peak AdamW rate.")
    warmup: int = Field(100, ge=0, description="Linear warm-up steps, then cosine to 10%.")
    weight_decay: float = Field(
        0.1, ge=0, le=10, allow_inf_nan=False,
        description="AdamW decoupled weight decay on the weight matrices (embedding, "
        "projections, LM head; norms are never decayed). Ours: 0.1 (OLMo 2's); a larger value "
        "is the usual lever for grokking T_ADD.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Init and data order.")
    task_seed: int = Field(0, ge=0, le=2**31 - 1,
                           description="Which 100 symbols, the hidden order/map and the split.")
    vocab_size: int = Field(8192, ge=512, le=65536,
                            description="BPE vocabulary trained locally on the corpus.")
    corpus: str = Field("kjv", min_length=1, description="'kjv' (built-in, public domain) or a "
                        "path: .txt, .jsonl, .parquet or a directory of .bin shards.")
    text_field: str = Field("text", min_length=1, description="JSONL/Parquet text field.")
    eod_id: int | None = Field(None, ge=0, description=".bin shards only: the end-of-document "
                               "id of their tokenizer (e.g. 50256 for GPT-2).")
    source: Literal["corpus", "ngram"] = Field(
        "corpus", description="Background stream: windows of the real corpus (recycled when "
        "exhausted; the summary reports epochs), or text sampled from an n-gram model of it "
        "(never repeats).")
    eval_points: int = Field(12, ge=2, le=1000, description="Log-spaced evaluations.")
    trace_windows: int = Field(
        0, ge=0, le=1000, description="Injection windows traced densely (Fig. 8): besides the "
        "log-spaced evaluations, evaluate just before an injection, just after it and every "
        "`trace_stride` steps until just before the next, for this many injections spread "
        "evenly over the run (lm/schedule.py). 0: log-spaced only.")
    trace_stride: int = Field(
        1, ge=1, description="Steps between evaluations inside a traced window.")
    save_model: bool = Field(
        False, description="Keep the cell's final weights as groups/gNNNN/final.safetensors "
        "(for `raretask export-hf`); off by default: a 150m cell's weights are 0.6 GB.")
    probes: bool = Field(
        True, description="At every evaluation also record the gradient cosines on the top "
        "`probe_k` first-layer MLP neurons and the task's feature presence (docs/lm_study.md); "
        "costs about three training steps per evaluation.")
    probe_k: int = Field(64, ge=1, description="Neurons kept by the gradient probe (at most the "
                         "MLP's hidden width).")
    arm: FixArm | None = Field(
        None, description="An arm of the fix (raretask fix; None: an ordinary cell), "
        "mixing/fix_lm.py: 'natural' the task at `rate` (its natural rate), i.i.d.; 'plan' at "
        "the rate `raretask plan` gives for `size` from `calibration`, i.i.d.; 'even' the "
        "planned rate in every step; 'burst' the planned rate every `every` steps at once; "
        "'big' the natural rate on `big_size`.")
    big_size: str | None = Field(None, description="Fix arm 'big': the bigger preset "
                                 "(default: the smallest the natural mix needs, from the plan).")
    margin: float = Field(1.5, ge=1, le=100, allow_inf_nan=False,
                          description="Fix arms: the plan's safety factor on the rate.")
    calibration: str | None = Field(
        None, min_length=1, description="Fix arms: the `raretask calibrate` file whose law "
        "the plan uses (a path; relative to the working directory).")

    @field_validator("size")
    @classmethod
    def _known_size(cls, size: str) -> str:
        if size not in PRESETS:
            raise ValueError(f"unknown preset (known: {', '.join(PRESETS)})")
        return size

    @model_validator(mode="after")
    def _consistent(self) -> LMCell:
        hidden = PRESETS[self.size]["mlp_hidden"]
        if self.probes and self.probe_k > hidden:
            raise ValueError(f"probe_k: {self.probe_k} exceeds the {hidden} MLP neurons of size "
                             f"{self.size!r}")
        if self.stop is not None and not self.start < self.stop <= self.steps:
            raise ValueError(f"stop: {self.stop} must lie after start {self.start} and at most "
                             f"at steps {self.steps}")
        if self.big_size is not None and self.big_size not in PRESETS:
            raise ValueError(f"big_size: unknown preset {self.big_size!r} (known: "
                             f"{', '.join(PRESETS)})")
        if self.arm is not None:
            self._check_arm()
        if self.task == "none":
            return self
        if self.rate is None:
            raise ValueError("rate: required with a task (instances per training token)")
        if self.rate * self.seq_len > 1:
            raise ValueError(f"rate: {self.rate:g} per token needs more than one instance per "
                             f"sequence of {self.seq_len} tokens (one per row: at most "
                             f"1/seq_len = {1 / self.seq_len:g})")
        if self.delivery != "burst" and self.every > 1 and self.arm is None:
            raise ValueError(f"every: only a burst delivery has a period (delivery "
                             f"{self.delivery!r})")
        if self.every > 1 and self.arm is None:
            k = self.rate * self.batch_size * self.seq_len * self.every
            if k < 1 or abs(k - round(k)) > 1e-6 * k:
                raise ValueError(f"every: {self.rate:g} per token x {self.batch_size} x "
                                 f"{self.seq_len} tokens x every {self.every} steps = {k:g} "
                                 "instances per injection, not a whole number >= 1")
            if round(k) > self.batch_size:
                raise ValueError(f"every: a burst of {round(k)} instances (rate x tokens per "
                                 f"step x every) does not fit in a batch of {self.batch_size} "
                                 "sequences (one instance per row)")
        return self

    def _check_arm(self) -> None:
        if self.task == "none" or self.rate is None:
            raise ValueError("rate: a fix arm needs a task and its natural rate")
        if self.delivery != "even" or self.start or self.stop is not None:
            raise ValueError("delivery: a fix arm sets the task's delivery; leave delivery, "
                             "start and stop at their defaults")
        if self.every < 2:
            raise ValueError("every: a fix arm needs every >= 2 (the burst arm's period)")
        if self.calibration is None:
            raise ValueError("calibration: a fix arm needs the calibration file its plan uses")

    def memory_parts(self) -> dict[str, int]:
        """Bytes one run of this cell needs at least, by the field that sets each part
        (:func:`raretask.limits.check_group_memory`): float32 weights, gradients and AdamW's
        two moments; per token of the batch the logits and their gradient, and a few residual
        streams per layer. A lower bound: what it refuses cannot fit."""
        from raretask.lm.model import ModelConfig

        model = ModelConfig.preset(self.size, vocab_size=self.vocab_size)
        tokens = self.batch_size * self.seq_len
        return {"size": 16 * model.num_params(),
                "batch_size": tokens * (8 * self.vocab_size
                                        + 16 * model.d_model * model.n_layers)}

    @property
    def schedule_label(self) -> str:
        """How the rows name the delivery: 'spread' (even, or bursts every step), 'iid',
        'K/G burst' (K instances every G steps), 'none'."""
        if self.task == "none":
            return "none"
        if self.delivery == "iid":
            return "iid"
        if self.every == 1:
            return "spread"
        return f"{self.injection_size}/{self.every} burst"

    @property
    def requested_rate(self) -> float | None:
        """The rate asked for, in instances per token (None without a task)."""
        return self.rate

    def injection_schedule(self):
        """The trainer's schedule of injections (None without a task)."""
        from raretask.lm.tasks import Frequency, InjectionSchedule

        if self.task == "none":
            return None
        if self.delivery == "iid":
            schedule = InjectionSchedule(0, 1, "iid", row_chance=self.rate * self.seq_len,
                                         rows=self.batch_size, seed=self.seed)
        elif self.every == 1:
            schedule = Frequency(self.rate).schedule(self.batch_size, self.seq_len)
        else:  # the same rate in bursts every `every` steps
            schedule = InjectionSchedule(self.injection_size, self.every, "burst")
        return dataclasses.replace(schedule, start=self.start, stop=self.stop)

    @property
    def injection_size(self) -> int | None:
        """Instances per burst: rate * batch * seq_len * every (bursts every `every` > 1 steps);
        None otherwise."""
        if self.task == "none" or self.every == 1:
            return None
        return round(self.rate * self.batch_size * self.seq_len * self.every)


def requested_rate(cell: dict, row: dict | None = None) -> float:
    """The rate a cell asked for, in instances per token, from its ``cells.json`` entry:
    ``rate``, or the ``frequency`` / ``instances`` of runs made before the delivery vocabulary;
    else the row's requested rate, else its delivered one. Cells of one matched-frequency sweep
    share it exactly (their delivered rates differ by up to one burst)."""
    row = row or {}
    for key in ("rate", "frequency"):
        if cell.get(key) is not None:
            return float(cell[key])
    if cell.get("instances") is not None:
        return cell["instances"] / (cell.get("every", 1) * cell["batch_size"] * cell["seq_len"])
    if row.get("requested_frequency") is not None:
        return float(row["requested_frequency"])
    return float(row["frequency"])


def delivery_family(cell: dict) -> str:
    """'spread', 'iid' or 'every G burst' from a ``cells.json`` entry (any vocabulary): the
    delivery without the burst size, which grows with the rate."""
    delivery = cell.get("delivery") or {"spread": "even"}.get(cell.get("mode"), cell.get("mode"))
    if delivery == "iid":
        return "iid"
    every = cell.get("every", 1)
    if every == 1 and (cell.get("rate") is not None or cell.get("frequency") is not None):
        return "spread"
    return f"every {every} {delivery or 'burst'}".replace(" even", " spread")


class LMGrid(Grid):
    """A language-model experiment: :class:`LMCell` fields, any of them a list."""

    cell_model: ClassVar[type[StrictModel]] = LMCell
    moved_keys: ClassVar[dict[str, str]] = {
        "frequency": "renamed: use rate (instances per training token)",
        "instances": "give the rate instead: instances / (every x batch_size x seq_len) "
                     "instances per token, with delivery: burst",
        "mode": "renamed: use delivery (even, burst or iid; 'spread' is even)"}

    kind: Literal["lm"] = "lm"
    name: str = Field("lm", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Experiment name (letters, digits, '_', '.', '-').")
