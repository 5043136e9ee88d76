"""The language-model study end to end on CPU: `raretask run` / `show` / resume, probes, and the
real effect (T_CMP learned at a high frequency, not at a low one)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from raretask.cli import main
from raretask.lm.config import LMCell
from raretask.lm.model import ModelConfig
from raretask.lm.probes import GradientProbe, feature_presence
from raretask.lm.tasks import RareTask, inject
from raretask.lm.trainer import chance_levels
from raretask.runs.profile import Profile
from raretask.studies.lm import PROBE_METRICS, build_trainer

# two cells, one per task; every row carries an instance (16 per step: 1/32 per token)
TINY = ["kind=lm", "name=tiny", "size=tiny", "vocab_size=512", "seq_len=32", "batch_size=16",
        "steps=40", "task=[cmp,add]", "rate=0.03125", "source=ngram", "eval_points=6"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private tokenizer cache for this module, in-process and for the subprocesses."""
    path = tmp_path_factory.mktemp("lmcache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RARETASK_CACHE", str(path))
        yield path


def cli(*args, timeout=300):
    # one thread: two threads on a busy 2-core box spin in OpenMP (conftest.one_thread)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "raretask", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("lmcfg") / "tiny.yaml"
    path.write_text("".join(s.replace("=", ": ", 1) + "\n" for s in TINY))
    return path


@pytest.fixture(scope="module")
def reference(tiny_config, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmref") / "run"
    res = cli("run", str(tiny_config), "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    return out


def in_process(capsys, *args) -> tuple[int, str, str]:
    """The real entry point (`raretask ...`) in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def show_json(capsys, out) -> list[dict]:
    code, stdout, stderr = in_process(capsys, "show", str(out), "--json")
    assert code == 0, stderr
    return json.loads(stdout)


# -- run / show ---------------------------------------------------------------------------------
def test_show_json_rows_carry_the_issue_fields(reference, capsys):
    rows = show_json(capsys, reference)
    assert [(r["cell"], r["task"]) for r in rows] == [(0, "cmp"), (1, "add")]
    params = ModelConfig.preset("tiny", vocab_size=512).num_params(include_embedding=False)
    for r in rows:
        assert r["size"] == "tiny" and r["params"] == params == 131_648
        assert r["params_total"] == params + 2 * 512 * 64  # untied embedding and LM head
        assert r["schedule"] == "spread" and r["steps"] == 40  # 16 a step: rate 1/32 even
        assert r["tokens"] == 40 * 16 * 32 and r["instances"] == 40 * 16
        assert r["frequency"] == r["instances"] / r["tokens"] == 1 / 32
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["train_accuracy"] <= 1.0
        # 40 steps: the LABEL loss has fallen from ln(512) = 6.24 but nothing is learned yet
        assert 0.5 < r["task_loss"] < math.log(512) and r["test_accuracy"] < 0.2
        assert 0 < r["val_loss"] < 8
        assert r["background_source"] == "ngram (order 3)" and r["repeats"] is False
        assert r["epochs"] == pytest.approx(r["tokens"] / r["corpus_tokens"])
        for name in ("cos_g_gr", "cos_gt_gr", "cos_gnt_gr"):
            assert -1.0 <= r[name] <= 1.0, name
        assert r["chance_symbol"] == 0.01
    cmp, add = rows
    assert cmp["chance_format"] == 0.5053 and cmp["chance_copy"] == 0.5078  # task seed 0
    assert add["chance_format"] == 0.01
    assert cmp["order_r2"] <= 1.0 and cmp["fourier_modes"] is None
    assert add["order_r2"] is None and add["fourier_modes"] in range(0, 51)
    code, table, _ = in_process(capsys, "show", str(reference))
    # the title wraps with the table's width; the header row and the rows do not
    assert code == 0 and "language models with an" in " ".join(table.split())
    head = next(line for line in table.splitlines() if "freq/tok" in line).split()
    assert head == ["cell", "size", "params", "task", "freq/tok", "schedule", "acc", "task",
                    "L", "val", "L"]  # one seed, nothing else differs, n-gram text: no more


def test_metrics_hold_every_evaluation_with_probes(reference):
    rows = pq.read_table(reference / "metrics.parquet").to_pylist()
    steps = sorted({r["step"] for r in rows if r["cell"] == 0})
    assert steps[0] == 0 and steps[-1] == 40 and len(steps) >= 5
    for cell, presence in ((0, "order_r2"), (1, "fourier_modes")):
        for step in steps:
            names = {r["metric"] for r in rows if r["cell"] == cell and r["step"] == step}
            assert {"test_accuracy", "task_loss", "val_loss", "cos_g_gr", "cos_gt_gr",
                    "cos_gnt_gr", presence} <= names, (cell, step)


@pytest.mark.slow  # make test: test_reliability's LM kill sample (exact kill points)
def test_kill_and_resume_gives_identical_results(tiny_config, reference, tmp_path, capsys):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "raretask", "run", str(tiny_config), "--out", str(out),
            "--checkpoint-seconds", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    manifest = out / "groups" / "g0000" / "ckpt" / "manifest.json"
    seen: set[int] = set()
    deadline = time.time() + 120
    # kill at whatever moment follows the third checkpoint: a checkpoint is one directory
    # (weights, optimizer, step, data position), so any moment resumes right
    # (tests/test_reliability.py kills at every rename and write of one)
    while len(seen) < 3 and proc.poll() is None and time.time() < deadline:
        with contextlib.suppress(FileNotFoundError):
            seen.add(manifest.stat().st_mtime_ns)
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "groups" / "g0000" / "summary.json").exists()
    res = cli("run", str(tiny_config), "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    log = (out / "log.txt").read_text()
    resumed = int(log.split("g0000: resumed from step ")[1].split()[0])
    assert 0 < resumed < 40
    assert show_json(capsys, out) == show_json(capsys, reference)
    assert pq.read_table(out / "metrics.parquet").equals(
        pq.read_table(reference / "metrics.parquet"))
    assert not list(out.glob("groups/*/ckpt*"))  # checkpoints go once the cell is done


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sise=4m", "sise: unknown key"),
        ("size=huge", "size: unknown preset (known: tiny, 4m, 20m, 60m, 150m, 300m, 1b, 4b)"),
        ("probe_k=300", "probe_k: 300 exceeds the 256 MLP neurons of size 'tiny'"),
        ("frequency=0.1", "frequency: renamed: use rate (instances per training token)"),
        ("source=web", "source: Input should be 'corpus' or 'ngram'"),
    ],
)
def test_bad_lm_config_exits_2_with_one_line(tiny_config, tmp_path, capsys, override, message):
    code, out, err = in_process(capsys, "run", str(tiny_config), "--out", str(tmp_path / "x"),
                                "--set", override)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "x").exists()  # nothing written


def test_frequency_above_one_instance_per_row_is_refused():
    with pytest.raises(ValueError, match=r"rate: 0\.05 per token needs more than one "
                       r"instance per sequence of 32 tokens"):
        LMCell(seq_len=32, rate=0.05)


# -- probes in the trainer ----------------------------------------------------------------------
def test_probes_are_read_only_and_measure_the_next_injection_batch(cache, one_thread):
    base = dict(size="tiny", vocab_size=512, seq_len=16, batch_size=8, steps=10, lr=1e-2,
                task="cmp", rate=6 / 384, every=3, delivery="burst", source="ngram",
                eval_points=4)
    with_probes = build_trainer(LMCell(**base, probes=True, probe_k=32), Profile().resolve("cpu"))
    without = build_trainer(LMCell(**base, probes=False), Profile().resolve("cpu"))
    with_probes.run()
    without.run()
    probed = {(r["step"], r["metric"]): r["value"] for r in with_probes.metrics()}
    plain = {(r["step"], r["metric"]): r["value"] for r in without.metrics()}
    # probing changes no number of the run itself
    assert {k: v for k, v in probed.items() if k[1] not in PROBE_METRICS} == plain
    for a, b in zip(with_probes.model.parameters(), without.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # the recorded cosines are those of the batch step 10 would train on if it were an
    # injection step: its background with the next 6 training instances
    tr = with_probes
    step = max(s for s, m in probed if m == "cos_g_gr")
    assert step == tr.step == 10 and tr.injected == 18
    batch = tr.data.batch(step)
    tokens, mask = inject(batch, tr.train_instances[18:24])
    cos = GradientProbe(tr.task, k=32).measure(tr.model, tokens, mask)
    assert probed[(step, "cos_g_gr")] == pytest.approx(cos.cos_g, abs=1e-12)
    assert probed[(step, "cos_gt_gr")] == pytest.approx(cos.cos_t, abs=1e-12)
    assert probed[(step, "cos_gnt_gr")] == pytest.approx(cos.cos_nt, abs=1e-12)
    assert probed[(step, "order_r2")] == pytest.approx(feature_presence(tr.model, tr.task).r2)


def test_framed_val_loss_scores_text_in_the_training_rows_format(cache, one_thread):
    """val_loss_framed: the schedule's share of validation rows opens with held-out instances
    (as training rows do) and only text targets count; recomputed here by hand."""
    base = dict(size="tiny", vocab_size=512, seq_len=16, batch_size=8, steps=3, lr=1e-2,
                task="cmp", rate=1 / 32, source="ngram", eval_points=2, probes=False)
    tr = build_trainer(LMCell(**base), Profile().resolve("cpu"))  # 4 instances a step: half
    tr.run()                                                       # the rows carry one
    last = {r["metric"]: r["value"] for r in tr.metrics() if r["step"] == tr.step}
    held_out, used, want = tr.task.instances("test"), 0, []
    with torch.no_grad():
        for b in tr.val_batches():
            rows = round(0.5 * b.shape[0])
            tokens, _ = inject(b, held_out[(torch.arange(rows) + used) % held_out.shape[0]])
            used += rows
            text = torch.ones(b.shape[0], b.shape[1] - 1, dtype=torch.bool)
            text[:rows, :3] = False  # the targets TOK2, LABEL, EOD
            want.append(tr.model(tokens[:, :-1], targets=tokens[:, 1:], loss_mask=text)[1])
    assert used > 0
    assert last["val_loss_framed"] == pytest.approx(float(torch.stack(want).mean()), abs=1e-6)
    assert last["val_loss_framed"] != pytest.approx(last["val_loss"], abs=1e-4)
    plain = build_trainer(LMCell(**{**base, "task": "none"}), Profile().resolve("cpu"))
    plain.run()  # no task: nothing is framed, and no such metric
    assert "val_loss_framed" not in {r["metric"] for r in plain.metrics()}


def test_prefetching_stream_changes_no_number_of_a_run(cache, one_thread):
    """The background thread samples 3-step chunks ahead while the trainer trains and probes
    (which peek at the next batch); every metric and weight equals a run without it."""
    base = dict(size="tiny", vocab_size=512, seq_len=16, batch_size=8, steps=10, lr=1e-2,
                task="add", rate=3 / 256, every=2, delivery="burst", source="ngram", eval_points=3,
                probes=True, probe_k=16)
    ahead = build_trainer(LMCell(**base), Profile().resolve("cpu"))
    plain = build_trainer(LMCell(**base), Profile().resolve("cpu"))
    assert not ahead.data.prefetch  # a CPU cell samples on the training thread
    ahead.data.source.rows_per_call = 3 * 8
    ahead.data.prefetch = True
    ahead.run()
    plain.run()
    assert ahead.data._pool is not None and plain.data._pool is None
    got = {(r["step"], r["metric"]): r["value"] for r in ahead.metrics()}
    assert got == {(r["step"], r["metric"]): r["value"] for r in plain.metrics()}
    assert {m for _, m in got} >= {"train_loss", "val_loss", "cos_g_gr", "fourier_modes"}
    for a, b in zip(ahead.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert ahead.state_dict()["data"]["step"] == ahead.step == 10  # the next batch to train on
    # val_loss: the mean of the batches' losses as Python floats (one host sync for all)
    with torch.no_grad():
        losses = [float(ahead.model(b[:, :-1], targets=b[:, 1:])[1]) for b in ahead.val_batches()]
    assert got[(10, "val_loss")] == sum(losses) / len(losses)
    ahead.data.close()


@pytest.mark.slow  # the CUDA default; on a CPU inductor compiles without graphs (make test-slow)
def test_compiled_training_follows_the_eager_run(cache, one_thread):
    """``compile: true`` (here with the CUDA-graph mode, which a CPU compiles without graphs)
    trains the same run: every evaluation's losses and accuracies within float32 noise."""
    base = dict(size="tiny", vocab_size=512, seq_len=16, batch_size=4, steps=6, warmup=2,
                task="cmp", rate=2 / 64, probes=False, eval_points=3)
    rows = {}
    for compiled in (False, True):
        trainer = build_trainer(LMCell(**base), Profile(
            compile=compiled, compile_mode="reduce-overhead").resolve("cpu"))
        assert (trainer.train_model is not trainer.model) == compiled
        trainer.run()
        rows[compiled] = {(r["step"], r["metric"]): r["value"] for r in trainer.metrics()}
    assert rows[True].keys() == rows[False].keys()
    assert {m for _, m in rows[True]} >= {"train_loss", "val_loss", "task_loss", "test_accuracy"}
    for key, value in rows[False].items():
        assert rows[True][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.slow  # a GPU switch; the CUDA runs use it (make test-slow)
def test_deterministic_switch_holds_while_training_only(cache, one_thread):
    """``deterministic: true`` turns on torch's deterministic kernels for the run (every op the
    run uses has one: none raises), restores the switch after, and changes no number here."""
    base = dict(size="tiny", vocab_size=512, seq_len=16, batch_size=4, steps=6, warmup=2,
                task="add", rate=2 / 64, probes=True, probe_k=16, eval_points=3)
    rows, seen = {}, []
    for det in (False, True):
        trainer = build_trainer(LMCell(**base), Profile(deterministic=det).resolve("cpu"))
        trainer.run(callback=lambda step: seen.append(torch.are_deterministic_algorithms_enabled()))
        rows[det] = {(r["step"], r["metric"]): r["value"] for r in trainer.metrics()}
    assert seen == [False] * 4 + [True] * 4  # 4 evaluations a run: step 0 and 3 log-spaced
    assert not torch.are_deterministic_algorithms_enabled()
    assert rows[True] == rows[False]


def test_chance_levels_follow_the_task_tables():
    task = RareTask("cmp", vocab_size=512, eod_id=0, seed=3)
    test = task.instances("test")
    equal = (test[:, 0] == test[:, 1]).double().mean().item()
    levels = chance_levels(task)
    assert levels["chance_format"] == pytest.approx(0.5 + equal / 2, abs=1e-6)
    first = (test[:, 2] == test[:, 0]).double().mean().item()
    assert levels["chance_copy"] == pytest.approx(max(first, 1 - first + equal), abs=1e-6)
    assert chance_levels(RareTask("add", vocab_size=512, eod_id=0))["chance_format"] == 0.01


# -- the real effect ----------------------------------------------------------------------------
def _train_cmp(frequency: float) -> tuple[float, dict]:
    cell = LMCell(size="tiny", vocab_size=512, seq_len=16, batch_size=32, steps=600,
                  task="cmp", rate=frequency, source="ngram", eval_points=2,
                  probes=False)
    trainer = build_trainer(cell, Profile().resolve("cpu"))
    trainer.run()
    last = {r["metric"]: r["value"] for r in trainer.metrics() if r["step"] == cell.steps}
    return last["test_accuracy"], chance_levels(trainer.task)


@pytest.mark.slow  # 26 s of training: a learning check, in make test-slow
def test_cmp_is_learned_at_a_high_frequency_and_not_at_a_low_one(cache, one_thread):
    """600 steps of 32 x 16 tokens, a 0.13M-parameter model: every row carrying an instance
    (1/16 per token, 19,200 instances) lifts held-out accuracy far above the 0.505 a model
    scores that knows the format but not the order; 8x rarer (2,400 instances) it does not.
    Measured: 0.87 and 0.001 (seeds 0); ~12 s each on one thread."""
    high, chance = _train_cmp(1 / 16)
    low, _ = _train_cmp(1 / 128)
    assert chance["chance_format"] == 0.5053
    assert high > chance["chance_format"] + 0.2
    assert low < chance["chance_format"]


def test_a_diverging_lm_run_stops_and_is_marked(tmp_path, cache, capsys, one_thread):
    """lr 1 blows the tiny model up: the run stops at the first eval step whose loss is
    non-finite or above 2 ln V, the summary and show say so, a sane cell is untouched."""
    cfg = tmp_path / "div.yaml"
    cfg.write_text("kind: lm\nsize: tiny\nvocab_size: 512\nseq_len: 16\nbatch_size: 8\n"
                   "steps: 30\nwarmup: 1\ntask: cmp\nrate: 0.03125\nsource: ngram\n"
                   "eval_points: 8\nprobes: false\nlr: [0.003, 1.0]\n")
    code, _, err = in_process(capsys, "run", str(cfg), "--out", str(tmp_path / "run"), "--quiet")
    assert code == 0, err
    rows = show_json(capsys, tmp_path / "run")
    sane, wild = rows
    assert sane["diverged_step"] is None and sane["steps"] == 30
    step = wild["diverged_step"]
    assert step is not None and 0 < step < 30 and wild["steps"] == step
    metrics = [r for r in pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()
               if r["cell"] == 1]
    assert max(r["step"] for r in metrics) == step  # nothing recorded after it
    last = {r["metric"]: r["value"] for r in metrics if r["step"] == step}
    bad = [last[m] for m in ("train_loss", "val_loss")
           if not (math.isfinite(last[m]) and last[m] <= 2 * math.log(512))]
    assert bad
    _, table, _ = in_process(capsys, "show", str(tmp_path / "run"))
    assert f"div@{step}" in table
    assert f"diverged at step {step}" in (tmp_path / "run" / "log.txt").read_text()


def test_attention_backend_pins_the_kernel_and_cuda_only_ones_are_refused(cache, one_thread,
                                                                          tmp_path, capsys):
    """``attention: math`` trains with the math kernel (the same run as PyTorch's own choice up
    to float32 rounding); ``cudnn`` on a CPU ends with one line before anything is written."""
    base = dict(size="tiny", vocab_size=512, seq_len=16, batch_size=4, steps=4, warmup=2,
                task="cmp", rate=2 / 64, probes=False, eval_points=2)
    rows = {}
    for backend in ("auto", "math"):
        trainer = build_trainer(LMCell(**base), Profile(attention=backend).resolve("cpu"))
        trainer.run()
        rows[backend] = {(r["step"], r["metric"]): r["value"] for r in trainer.metrics()}
    assert rows["math"].keys() == rows["auto"].keys()
    for key, value in rows["auto"].items():
        assert rows["math"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    out, cfg = tmp_path / "run", tmp_path / "cudnn.yaml"
    cfg.write_text(json.dumps({**base, "kind": "lm"}))
    code, stdout, err = in_process(capsys, "run", str(cfg), "--out", str(out), "--quiet",
                                   "--set", "profile.device=cpu", "--set",
                                   "profile.attention=cudnn")
    assert code == 2 and stdout == "" and not out.exists()
    assert err == ("error: profile.attention: 'cudnn' runs on CUDA only, device is 'cpu'; use "
                   "auto, flash or math\n")


def test_a_grid_of_variants_runs_resumes_from_its_record_and_shows_what_sets_rows_apart(
        cache, one_thread, tmp_path, capsys):
    """Each task with its own budget in one run directory (``variants:``): the recorded
    config.yaml is the same experiment (a second run trains nothing), and ``show`` names the
    seed and the field that tells two rows apart."""
    config = tmp_path / "both.yaml"
    config.write_text(
        "kind: lm\nname: both\nsize: tiny\nvocab_size: 512\nbatch_size: 8\nsource: ngram\n"
        "eval_points: 2\nprobes: false\nseed: [0, 1]\n"
        "variants:\n"
        "  - {task: cmp, rate: 0.03125, seq_len: 32, steps: 3}\n"
        "  - {task: add, rate: 0.125, seq_len: 8, steps: 5, weight_decay: [1.0, 0.1]}\n")
    out = tmp_path / "run"
    code, _, err = in_process(capsys, "run", str(config), "--out", str(out), "--quiet")
    assert code == 0, err
    rows = sorted(show_json(capsys, out), key=lambda r: r["cell"])
    assert [(r["task"], r["steps"], r["seed"]) for r in rows] == [
        ("cmp", 3, 0), ("cmp", 3, 1), ("add", 5, 0), ("add", 5, 0), ("add", 5, 1), ("add", 5, 1)]
    assert [r["tokens"] for r in rows] == [3 * 8 * 32] * 2 + [5 * 8 * 8] * 4
    code, _, err = in_process(capsys, "run", str(out / "config.yaml"), "--out", str(out),
                              "--quiet")
    assert code == 0, err
    last_start = [line for line in (out / "log.txt").read_text().splitlines()
                  if " start: " in line][-1]
    assert last_start.endswith("6 cells in 6 groups, 0 groups to run")
    code, table, _ = in_process(capsys, "show", str(out))
    assert code == 0
    head = next(line for line in table.splitlines() if "cell" in line and "acc" in line)
    assert "seed" in head.split() and "also" in head.split()
    add_lines = [line for line in table.splitlines() if " add " in line]
    assert ["wd=1.0" in line for line in add_lines] == [True, False, True, False]
    assert ["wd=0.1" in line for line in add_lines] == [False, True, False, True]
    # T_CMP's cells all have one weight decay: no label of T_ADD's field on them
    assert all("wd=" not in line for line in table.splitlines() if " cmp" in line)


def test_evaluations_on_cuda_take_the_instances_in_one_pass(cache):
    """An evaluation's forward passes (task accuracy per split, the probe's g_r over all 10K
    instances) are chunked by vocabulary size on CUDA, so small models launch their plain
    kernels a few times, not ten; on a CPU they keep the chunks every CPU number was made with.
    The results do not depend on the chunks beyond float rounding
    (tests/test_lm_probes.py)."""
    base = dict(size="tiny", vocab_size=4096, seq_len=16, batch_size=4, steps=2, task="add",
                rate=1 / 16)
    trainer = build_trainer(LMCell(**base), Profile().resolve("cpu"))
    assert trainer._eval_chunks() == (1000, 4096)
    trainer.device = torch.device("cuda")  # the arithmetic only: nothing runs on it here
    assert trainer._eval_chunks() == (16384, 32768)  # 2^26 / 4096: both splits and g_r in one chunk
    trainer.vocab_size = 50304  # OLMo's vocabulary: 2^27 logits a chunk, at least 1,000 rows
    assert trainer._eval_chunks() == (1334, 2668)
    trainer.vocab_size = 1 << 20
    assert trainer._eval_chunks() == (1000, 2000)
