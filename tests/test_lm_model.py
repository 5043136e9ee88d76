"""The OLMo-2-style decoder: shapes, causality, counts, init loss, RoPE, learning, autocast."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from raretask.lm.model import (
    PRESETS,
    ModelConfig,
    RMSNorm,
    Transformer,
    apply_rotary,
    rope_tables,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return ModelConfig.preset("tiny", **overrides).build()


# -- config ----------------------------------------------------------------------------------
def test_unknown_key_rejected():
    with pytest.raises(ValidationError, match="d_modle"):
        ModelConfig.preset("tiny", d_modle=32)


def test_heads_must_divide_width():
    with pytest.raises(
        ValidationError, match=r"d_model \(64\) must be a multiple of n_heads \(3\)"
    ):
        ModelConfig.preset("tiny", n_heads=3)


def test_head_dim_must_be_even():
    with pytest.raises(ValidationError, match="head_dim = d_model / n_heads = 3 must be even"):
        ModelConfig.preset("tiny", d_model=48, n_heads=16)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset '7b'"):
        ModelConfig.preset("7b")


def test_config_is_frozen():
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(ValidationError):
        cfg.d_model = 8


# -- counts ----------------------------------------------------------------------------------
# (total, non-embedding) at the presets' vocabularies (50304; 256 for tiny), untied.
PINNED = {
    "tiny": (164_416, 131_648),
    "4m": (24_041_664, 4_724_928),
    "20m": (57_520_512, 18_887_040),
    "60m": (129_951_360, 65_562_240),
    "150m": (228_311_808, 151_044_864),
    "300m": (371_524_608, 268_502_016),
    "1b": (1_279_920_128, 1_073_874_944),
    "4b": (4_707_323_904, 4_295_233_536),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_counts_pinned(name):
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):  # no memory, even at 4B
        model = Transformer(cfg)
    counted = (model.num_params(True), model.num_params(False))
    assert counted == PINNED[name]
    assert (cfg.num_params(True), cfg.num_params(False)) == PINNED[name]


def test_preset_names_match_their_size():
    """Non-embedding counts land within 20% of the paper's names."""
    target = {"4m": 4e6, "20m": 20e6, "60m": 60e6, "150m": 150e6, "300m": 300e6, "1b": 1e9,
              "4b": 4e9}
    for name, n in target.items():
        assert abs(PINNED[name][1] / n - 1) < 0.2, name
    assert PINNED["tiny"][0] < 1_000_000
    assert ModelConfig.preset("4m").n_layers == 8 and ModelConfig.preset("4b").n_layers == 16


def test_tied_vs_untied_differ_by_one_matrix():
    untied, tied = tiny(), tiny(tie_embeddings=True)
    cfg = untied.config
    assert untied.num_params() - tied.num_params() == cfg.vocab_size * cfg.d_model
    assert untied.num_params(False) == tied.num_params(False)
    assert tied.lm_head.weight is tied.embed.weight


def test_flops_per_token_formula():
    cfg = ModelConfig.preset("1b")
    n, v, c, layers = cfg.num_params(False), cfg.vocab_size, cfg.d_model, cfg.n_layers
    assert cfg.flops_per_token(4096) == 6 * (n + v * c) + 12 * layers * c * 4096
    # tiny, by hand: N = 131,648; V C = 16,384; 12 L C T = 12 * 2 * 64 * 64
    assert ModelConfig.preset("tiny").flops_per_token(64) == 6 * (131_648 + 16_384) + 98_304


# -- behaviour -------------------------------------------------------------------------------
def test_shapes_and_loss_is_mean_of_token_losses():
    model = tiny()
    idx = torch.randint(0, 256, (3, 17))
    logits, loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert logits.shape == (3, 16, 256) and loss.shape == ()
    per = model.token_losses(idx[:, :-1], idx[:, 1:])
    assert per.shape == (3, 16) and per.dtype == torch.float32
    torch.testing.assert_close(loss, per.mean())
    assert model(idx)[1] is None


def test_loss_mask_selects_positions():
    model = tiny()
    idx = torch.randint(0, 256, (2, 9))
    x, y = idx[:, :-1], idx[:, 1:]
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 3] = mask[1, 5] = True
    per = model.token_losses(x, y)
    torch.testing.assert_close(model(x, y, mask)[1], (per[0, 3] + per[1, 5]) / 2)
    assert model(x, y, torch.zeros_like(mask))[1].item() == 0.0


def test_fused_projections_compute_the_split_model_exactly():
    """One GEMM for q/k/v and one for gate/up: same parameters, logits and gradients (float64)."""
    fused, split = tiny().double(), tiny(fuse_projections=False).double()
    assert fused.state_dict().keys() == split.state_dict().keys()
    split.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    outs = [m(idx[:, :-1], targets=idx[:, 1:]) for m in (fused, split)]
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-12)
    for (_, loss) in outs:
        loss.backward()
    for (name, a), b in zip(fused.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12, msg=name)


def test_loss_without_logits_is_the_same_loss():
    model = tiny()
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    logits, loss = model(idx[:, :-1], targets=idx[:, 1:])
    none, same = model(idx[:, :-1], targets=idx[:, 1:], return_logits=False)
    assert logits.shape == (2, 8, 256) and none is None
    assert torch.equal(loss, same)


def test_too_long_sequence_rejected():
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_seq_len 64"):
        tiny()(torch.zeros(1, 65, dtype=torch.long))


def test_causality():
    model = tiny()
    idx = torch.randint(0, 256, (2, 32))
    t = 12
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 7) % 256
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-4


def test_loss_at_init_is_log_vocab():
    model = tiny()
    idx = torch.randint(0, 256, (8, 64))
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert abs(loss.item() - math.log(256)) < 0.1


def test_init_values():
    model = tiny()
    std = model.config.init_std
    w = model.blocks[0].mlp.gate_proj.weight
    assert w.abs().max() <= 3 * std
    assert abs(w.std().item() - std * 0.986) < 0.002  # std of N(0, s^2) truncated at 3 s
    assert torch.equal(model.blocks[1].attn.q_norm.weight, torch.ones(64))
    cos, sin = rope_tables(16, 64, model.config.rope_theta)
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    assert "rope_cos" not in model.state_dict()


def test_init_is_reproducible_with_generator():
    a, b = tiny(), tiny()
    a.init_weights(torch.Generator().manual_seed(3))
    b.init_weights(torch.Generator().manual_seed(3))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_rmsnorm_unit_rms():
    norm = RMSNorm(32, eps=1e-6)
    y = norm(torch.randn(4, 32) * 5)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4), atol=1e-4, rtol=0)


def test_rope_depends_on_relative_position_only():
    torch.manual_seed(1)
    cos, sin = rope_tables(16, 64, 10_000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q.expand(64, 16), cos, sin)[m]  # q placed at every position, take m
        kn = apply_rotary(k.expand(64, 16), cos, sin)[n]
        return (qm @ kn).item()

    for m, n, s in [(5, 2, 10), (0, 7, 30), (20, 20, 33)]:
        assert score(m, n) == pytest.approx(score(m + s, n + s), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)  # and it does depend on m - n
    assert score(3, 3) == pytest.approx((q @ k).item(), abs=1e-4)  # zero offset: no rotation


def test_overfits_one_batch():
    model = tiny()
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


def test_bf16_autocast():
    """The CUDA recipe (fp32 weights, bf16 autocast) on CPU: dtypes agree inside attention."""
    model = tiny()
    idx = torch.randint(0, 256, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    _, ref = model(idx[:, :-1], targets=idx[:, 1:])
    assert abs(loss.item() - ref.item()) < 0.05
    loss.backward()
    assert model.embed.weight.grad is not None


def test_compiles_without_graph_breaks():
    model = tiny()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    idx = torch.randint(0, 256, (2, 17))
    mask = torch.ones(2, 16, dtype=torch.bool)
    _, loss = compiled(idx[:, :-1], idx[:, 1:], mask)
    torch.testing.assert_close(loss, model(idx[:, :-1], idx[:, 1:], mask)[1])


def test_scaled_fig5_presets_span_25x_past_100m_with_gpu_friendly_shapes():
    """Issue 19: 4m .. 150m span >= 25x in N up to >= 100M; the new shapes have head_dim 64
    and widths that are multiples of 128 (full tensor-core tiles)."""
    n = {name: PINNED[name][1] for name in ("4m", "20m", "60m", "150m")}
    assert n["150m"] >= 100e6 and n["150m"] / n["4m"] >= 25
    assert list(n.values()) == sorted(n.values())
    for name in ("60m", "150m"):
        cfg = ModelConfig.preset(name)
        assert cfg.head_dim == 64 and cfg.d_model % 128 == 0 and cfg.mlp_hidden == 4 * cfg.d_model
