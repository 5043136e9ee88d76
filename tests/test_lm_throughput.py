"""benchmarks/lm_throughput.py: the HF OLMo-2 model computes raretask's function; the CPU run's
figures are consistent with each other."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raretask.lm.model import ModelConfig, Transformer

pytest.importorskip("transformers")  # a guard: transformers is in the dev extra

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lm_throughput.py"
_spec = importlib.util.spec_from_file_location("lm_throughput", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
sys.modules["lm_throughput"] = bench
_spec.loader.exec_module(bench)

CONFIGS = {
    "tiny": ModelConfig.preset("tiny"),
    # more layers and heads, another RoPE base and epsilon, odd vocabulary
    "l3h6": ModelConfig(vocab_size=317, d_model=96, n_layers=3, n_heads=6, mlp_hidden=160,
                        max_seq_len=40, rope_theta=10_000.0, norm_eps=1e-5),
    "tied": ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64,
                        max_seq_len=24, tie_embeddings=True),
}


def random_weights(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A raretask model far from init: matrices N(0, 0.05^2), norm weights U(0.5, 1.5), so a
    misplaced norm or projection shows in the logits (at init every norm weight is 1)."""
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return model


def forward_both(cfg, state, seq):
    ours = Transformer(cfg)
    ours.load_state_dict(state)
    hf = bench.build_hf(cfg, state)
    logits, loss = ours(seq[:, :-1], targets=seq[:, 1:])
    out = hf(input_ids=seq, labels=seq, use_cache=False)  # HF shifts the labels itself
    return ours, hf, logits, loss, out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_olmo2_gives_raretask_logits_loss_and_gradients(name, one_thread):
    cfg = CONFIGS[name]
    state = random_weights(cfg).state_dict()
    seq = torch.randint(0, cfg.vocab_size, (3, cfg.max_seq_len // 2 + 1),
                        generator=torch.Generator().manual_seed(1))
    ours, hf, logits, loss, out = forward_both(cfg, state, seq)
    assert logits.abs().max() > 1.0  # not a near-zero comparison
    assert (logits - out.logits[:, :-1]).abs().max().item() < 1e-4
    assert loss.item() == pytest.approx(out.loss.item(), abs=1e-5)
    # the backward pass too: the same gradient for every parameter, under HF's name
    loss.backward()
    out.loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    for n, g in bench.hf_state_dict({n: p.grad for n, p in ours.named_parameters()}).items():
        assert (g - hf_grads[n]).abs().max().item() < 1e-5 * max(1.0, g.abs().max().item()), n


def test_the_parity_check_sees_a_misplaced_norm(one_thread):
    """Negative control: swapping the attention and MLP output norms moves the logits far
    beyond the tolerance, so 1e-4 does discriminate."""
    cfg = CONFIGS["l3h6"]
    state = random_weights(cfg).state_dict()
    swapped = dict(state)
    for i in range(cfg.n_layers):
        a, m = f"blocks.{i}.attn_norm.weight", f"blocks.{i}.mlp_norm.weight"
        swapped[a], swapped[m] = state[m], state[a]
    seq = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    logits = Transformer(cfg)
    logits.load_state_dict(state)
    good = logits.logits(seq)
    bad = bench.build_hf(cfg, swapped)(input_ids=seq, use_cache=False).logits
    assert (good - bad).abs().max().item() > 1e-2


def test_hf_names_cover_both_models_one_to_one():
    for cfg in CONFIGS.values():
        ours = Transformer(cfg).state_dict()
        mapped = bench.hf_state_dict(ours)
        hf = bench.build_hf(cfg, ours).state_dict()
        assert set(mapped) == set(hf)
        assert len(mapped) == len(ours)
    with pytest.raises(KeyError, match="'blocks.0.attn.qkv.weight'"):
        bench.hf_state_dict({"blocks.0.attn.qkv.weight": torch.zeros(1)})


def test_olmo2_config_has_raretask_dimensions():
    cfg = ModelConfig.preset("300m")
    hf = bench.olmo2_config(cfg)
    assert (hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers) == (1024, 4096, 16)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.vocab_size) == (16, 16, 50304)
    assert (hf.rms_norm_eps, hf.max_position_embeddings) == (1e-6, 2048)
    assert hf.tie_word_embeddings is False and hf.pad_token_id is None
    theta = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}
    assert theta["rope_theta"] == 500_000.0
    small = CONFIGS["l3h6"]
    model = bench.build_hf(small, Transformer(small).state_dict())
    assert model.config._attn_implementation == "sdpa"
    assert model.model.rotary_emb.inv_freq[1].item() == pytest.approx(10_000.0 ** (-2 / 16))


# -- the script -----------------------------------------------------------------------------------
def run_script(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models on a busy 2-core box
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_throughput") / "small.json"
    res = run_script("--device", "cpu", "--preset", "tiny", "--batch-size", "2", "--seq-len",
                     "32", "--vocab-size", "300", "--warmup", "1", "--steps", "2",
                     "--variants", "raretask,hf-eager", "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out, json.loads(out.read_text())


def test_small_run_figures_are_consistent(small_run):
    out, r = small_run
    assert out.with_suffix(".log").read_text().count("tokens/s") >= 3  # lines and table
    assert r["device_type"] == "cpu" and r["dtype"] == "float32"
    assert r["tokens_per_step"] == 2 * 32
    # 6 (N + V C) + 12 L C T = 6 (131,648 + 300 * 64) + 12 * 2 * 64 * 32, at --vocab-size 300
    assert r["model"]["vocab_size"] == 300
    assert r["flops_per_token"] == 954_240 == ModelConfig.preset(
        "tiny", vocab_size=300).flops_per_token(32)
    assert "full T x T" in r["flops_note"]
    assert [v["name"] for v in r["variants"]] == ["raretask", "hf-eager"]
    for v in r["variants"]:
        assert v["tokens_per_s"] > 0
        assert v["tokens_per_s"] == pytest.approx(64 * 2 / v["timed_s"], rel=1e-12)
        assert v["step_ms"] == pytest.approx(1e3 * v["timed_s"] / 2, rel=1e-12)
        assert v["mfu"] == pytest.approx(
            r["flops_per_token"] * v["tokens_per_s"] / (r["peak_tflops"] * 1e12), rel=1e-12)
        assert v["peak_memory_bytes"] is None  # CPU
        assert math.isfinite(v["final_loss"]) and abs(v["final_loss"] - math.log(300)) < 0.5
        assert v["compiled"] is False  # CPU default: no compile
    ours, hf = r["variants"]
    assert r["ratio"]["best_hf"] == "hf-eager"
    assert r["ratio"]["raretask_over_best_hf"] == pytest.approx(
        ours["tokens_per_s"] / hf["tokens_per_s"], rel=1e-12)
    # same start, same batches, float32: both train the same function the same way
    assert ours["final_loss"] == pytest.approx(hf["final_loss"], abs=1e-4)
    assert r["parity"]["max_abs_logit_diff"] < 1e-4
    assert r["parity"]["loss_raretask"] == pytest.approx(r["parity"]["loss_hf"], abs=1e-5)


def test_bad_argument_exits_2_with_one_error_line():
    res = run_script("--device", "cpu", "--small", "--variants", "raretask,hf-fast", timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: --variants: unknown variant(s) hf-fast (known: raretask, hf-eager, hf-compiled)"]


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "--preset: unknown preset 'huge' (known: tiny, 4m"),
    (["--seq-len", "65"], "--seq-len: 65 exceeds preset 'tiny''s max_seq_len 64"),
    (["--variants", "hf-eager,hf-eager"], "--variants: hf-eager,hf-eager names a variant twice"),
    (["--variants", ","], "--variants: unknown variant(s) (none given)"),
    (["--steps", "0"], "--steps: 0 is not >= 1"),
    (["--batch-size", "0"], "--batch-size: 0 is not >= 1"),
    (["--warmup", "-1"], "--warmup: -1 is not >= 0"),
    (["--peak-tflops", "0"], "--peak-tflops: 0.0 is not a positive number"),
    (["--vocab-size", "1"], "--vocab-size: 1 is not >= 2"),
    (["--device", "meta"], "--device: 'meta' is neither cpu nor cuda"),
    (["--device", "tpu"], "--device: Expected one of"),
    (["--batch-size", "two"], "argument --batch-size: invalid int value: 'two'"),
    (["--attention", "cudnn"], "--attention: 'cudnn' runs on CUDA only"),
    (["--attention", "fast"], "argument --attention: invalid choice: 'fast'"),
])
def test_each_bad_argument_is_named(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse(["--device", "cpu", "--small", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {message}")


@pytest.mark.slow
def test_compiled_variants_train_the_same_losses_on_cpu(tmp_path):
    """torch.compile on CPU (inductor, C++): about 10-40 s cold on 2 cores, a few s cached."""
    out = tmp_path / "compiled.json"
    res = run_script("--device", "cpu", "--small", "--compile", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr
    r = json.loads(out.read_text())
    assert [(v["name"], v["compiled"]) for v in r["variants"]] == [
        ("raretask", True), ("hf-eager", False), ("hf-compiled", True)]
    losses = [v["final_loss"] for v in r["variants"]]
    assert max(losses) - min(losses) < 1e-4
