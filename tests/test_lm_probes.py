"""Probes (raretask.lm.probes): gradient cosines and feature presence, against oracles."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raretask.errors import UserError
from raretask.lm.model import ModelConfig
from raretask.lm.probes import (
    GradientProbe,
    MLPGradient,
    embedding_fourier_modes,
    feature_presence,
    fourier_modes,
    order_r2,
    probe_metrics,
    symbol_states,
    top_neurons,
)
from raretask.lm.tasks import RareTask, inject

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
V = 256  # the tiny preset's vocabulary


def tiny(seed: int = 0, device: str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    return ModelConfig.preset("tiny").build().to(device)


def task(kind: str = "cmp") -> RareTask:
    return RareTask(kind, vocab_size=V, eod_id=0, seed=3)


def batch(n_instances: int = 3, b: int = 6, t: int = 20, seed: int = 1):
    """tokens [b, t+1] with ``n_instances`` train instances of T_CMP injected, and the mask."""
    g = torch.Generator().manual_seed(seed)
    background = torch.randint(1, V, (b, t + 1), generator=g)
    return inject(background, task().instances("train")[:n_instances])


def grads_of(model: nn.Module, layer: int = 0) -> MLPGradient:
    mlp = model.blocks[layer].mlp
    return MLPGradient(
        mlp.gate_proj.weight.grad, mlp.up_proj.weight.grad, mlp.down_proj.weight.grad
    )


def assert_close(a: MLPGradient, b: MLPGradient, atol: float, rtol: float = 0.0) -> None:
    for name in ("gate", "up", "down"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=rtol)


# -- gradient split -----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
def test_split_adds_up_to_the_training_gradient(device, masked):
    """g_t + g_nt equals loss.backward() of the training loss (Transformer.forward), to 1e-5."""
    model = tiny(device=device)
    tokens, task_mask = batch()
    idx, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    loss_mask = None
    if masked:
        loss_mask = torch.rand(idx.shape, generator=torch.Generator().manual_seed(5)) < 0.7
        loss_mask[:3, 1] = True  # keep the LABEL targets in the loss
    oracle = copy.deepcopy(model)
    mask = None if loss_mask is None else loss_mask.to(device)
    _, loss = oracle(idx, targets=targets, loss_mask=mask)
    loss.backward()
    for layer in (0, 1):
        probe = GradientProbe(task(), layer=layer)
        g_t, g_nt = probe.split_gradient(model, tokens, task_mask, loss_mask)
        assert_close(g_t + g_nt, grads_of(oracle, layer), atol=1e-5)
        assert g_t.neuron_norms().sum() > 0 and g_nt.neuron_norms().sum() > 0


def test_split_g_t_is_the_label_loss_gradient():
    """g_t = (3 / (B T)) x the gradient of the mean LABEL loss of the 3 injected instances."""
    model = tiny()
    tokens, task_mask = batch(n_instances=3, b=6, t=20)
    g_t, _ = GradientProbe(task()).split_gradient(model, tokens, task_mask)
    oracle = copy.deepcopy(model)
    logits = oracle.logits(tokens[:3, :2])[:, 1]
    (F.cross_entropy(logits, tokens[:3, 2]) * 3 / (6 * 20)).backward()
    assert_close(g_t, grads_of(oracle), atol=1e-7)


def test_micro_batches_change_nothing():
    model = tiny()
    tokens, task_mask = batch(b=7)
    whole = GradientProbe(task()).split_gradient(model, tokens, task_mask)
    parts = GradientProbe(task(), chunk_tokens=40).split_gradient(model, tokens, task_mask)
    for a, b in zip(whole, parts, strict=True):
        assert_close(a, b, atol=1e-7)


def test_reference_is_the_task_loss_gradient_over_all_instances():
    """g_r in chunks of 1500 instances (uneven) = one backward of the mean LABEL loss (10K)."""
    model = tiny()
    g_r = GradientProbe(task(), chunk_tokens=3000).reference(model)
    oracle = copy.deepcopy(model)
    inst = task().instances("all")
    F.cross_entropy(oracle.logits(inst[:, :2])[:, 1], inst[:, 2]).backward()
    assert_close(g_r, grads_of(oracle), atol=1e-8, rtol=1e-5)


def test_cosines_are_one_when_the_batch_is_the_task_set():
    """Batch = all 10K instances, training loss on LABEL only: g = g_t = g_r, g_nt = 0.

    T = 3 here, so chunk_tokens=7500 gives chunks of 2500 rows."""
    model = tiny()
    inst = task().instances("all")
    tokens, task_mask = inject(inst, inst)
    probe = GradientProbe(task(), k=64, chunk_tokens=7500)
    ref = probe.reference(model)
    only_labels = probe.measure(model, tokens, task_mask, loss_mask=task_mask[:, 1:], reference=ref)
    assert only_labels.cos_g == pytest.approx(1.0, abs=1e-6)
    assert only_labels.cos_t == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(only_labels.cos_nt) and only_labels.norms["nt"] == 0.0
    assert only_labels.norms["g"] == pytest.approx(only_labels.norms["r"], rel=1e-5)
    # with the plain mean over all 3 targets per row, g_t = g_r / 3: still parallel, g is not
    plain = probe.measure(model, tokens, task_mask, reference=ref)
    assert plain.cos_t == pytest.approx(1.0, abs=1e-6)
    assert plain.norms["t"] == pytest.approx(plain.norms["r"] / 3, rel=1e-5)
    assert plain.cos_g < 0.999


def test_batch_without_instances_gives_nan_task_cosine():
    model = tiny()
    tokens, task_mask = batch(n_instances=0)
    cos = GradientProbe(task(), k=8).measure(model, tokens, task_mask)
    assert math.isnan(cos.cos_t) and cos.norms["t"] == 0.0
    assert cos.cos_g == pytest.approx(cos.cos_nt, abs=1e-12)
    assert -1.0 <= cos.cos_g <= 1.0


def test_between_injections_is_the_background_batch_without_its_instances():
    """``cos_g_gr_between``: the cosine of a batch that carries no instance (a step between
    injections, every token an 'other' one) with the same g_r as the injection batch's."""
    from raretask.lm.probes import probe_metrics

    model, t = tiny(), task()
    background, _ = batch(n_instances=0)
    tokens, task_mask = batch(n_instances=3)
    row = probe_metrics(model, t, tokens, task_mask, k=8, between=background)
    probe = GradientProbe(t, k=8)
    alone = probe.measure(model, background, torch.zeros_like(background, dtype=torch.bool))
    assert row["cos_g_gr_between"] == pytest.approx(alone.cos_g, abs=1e-12)
    assert row["cos_g_gr"] == pytest.approx(probe.measure(model, tokens, task_mask).cos_g,
                                            abs=1e-12)
    # the injection batch's instances are what set its g apart from the background's
    assert row["cos_g_gr_between"] != pytest.approx(row["cos_g_gr"], abs=1e-3)
    assert "cos_g_gr_between" not in probe_metrics(model, t, tokens, task_mask, k=8)


# -- neuron selection ---------------------------------------------------------------------------
def test_top_neurons_brute_force():
    g = torch.Generator().manual_seed(0)
    h, c = 12, 5
    grad = MLPGradient(
        torch.randn(h, c, generator=g),
        torch.randn(h, c, generator=g),
        torch.randn(c, h, generator=g),
    )
    norms = [
        math.sqrt(
            sum(
                float(grad.gate[n, i]) ** 2
                + float(grad.up[n, i]) ** 2
                + float(grad.down[i, n]) ** 2
                for i in range(c)
            )
        )
        for n in range(h)
    ]
    expected = sorted(range(h), key=lambda n: -norms[n])[:4]
    assert top_neurons(grad, 4).tolist() == expected
    np.testing.assert_allclose(grad.neuron_norms().numpy(), norms, rtol=1e-6)
    sel = grad.neurons(torch.tensor(expected))
    assert sel.shape == (4, 3 * c)
    for row, n in enumerate(expected):
        torch.testing.assert_close(sel[row], torch.cat([grad.gate[n], grad.up[n], grad.down[:, n]]))


def test_top_neurons_ties_go_to_the_lower_index():
    grad = MLPGradient(torch.ones(5, 2), torch.zeros(5, 2), torch.zeros(2, 5))
    grad.gate[3] = 2.0
    assert top_neurons(grad, 3).tolist() == [3, 0, 1]


def test_probe_selects_the_largest_reference_neurons():
    model = tiny()
    probe = GradientProbe(task(), k=10)
    ref = probe.reference(model)
    cos = probe.measure(model, *batch(), reference=ref)
    norms = ref.neuron_norms()
    brute = sorted(range(norms.numel()), key=lambda n: -float(norms[n]))[:10]
    assert cos.neurons.tolist() == brute


# -- the model is left as it was ----------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_probe_leaves_grads_mode_and_rng_alone(training):
    model = tiny()
    model.train(training)
    model.embed.weight.grad = torch.full_like(model.embed.weight, 0.5)
    mlp = model.blocks[0].mlp
    mlp.up_proj.weight.grad = torch.full_like(mlp.up_proj.weight, -2.0)
    mlp.gate_proj.weight.requires_grad_(False)  # frozen: still probed, still frozen afterwards
    rng = torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = GradientProbe(task(), k=8)
    probe.measure(model, *batch())
    states = symbol_states(model, task())
    assert states.shape == (2, 100, 64)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training is training and all(m.training is training for m in model.modules())
    assert torch.equal(model.embed.weight.grad, torch.full_like(model.embed.weight, 0.5))
    assert torch.equal(mlp.up_proj.weight.grad, torch.full_like(mlp.up_proj.weight, -2.0))
    assert mlp.gate_proj.weight.grad is None and mlp.down_proj.weight.grad is None
    assert not mlp.gate_proj.weight.requires_grad and mlp.down_proj.weight.requires_grad
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.blocks[0]._forward_hooks  # hooks removed


def test_wrapped_model_is_unwrapped():
    """DDP keeps the model in ``.module``, torch.compile in ``._orig_mod``."""

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    model = tiny()
    tokens, task_mask = batch()
    probe = GradientProbe(task(), k=8)
    assert (
        probe.measure(Wrapper(model), tokens, task_mask).as_row()
        == probe.measure(model, tokens, task_mask).as_row()
    )


# -- T_CMP: order regression --------------------------------------------------------------------
def loo_r2_brute_force(states: np.ndarray, order: np.ndarray, p: int) -> float:
    """Leave-one-out by 100 refits of least squares on the (fixed) top-p PC scores."""
    x = states - states.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    z = np.column_stack([np.ones(len(order)), u[:, :p] * s[:p]])
    press = 0.0
    for i in range(len(order)):
        keep = np.arange(len(order)) != i
        coef, *_ = np.linalg.lstsq(z[keep], order[keep], rcond=None)
        press += (order[i] - z[i] @ coef) ** 2
    return 1 - press / ((order - order.mean()) ** 2).sum()


@pytest.mark.parametrize("kind", ["linear", "noise"])
def test_order_r2_matches_brute_force_leave_one_out(kind):
    rng = np.random.default_rng(0)
    order = rng.permutation(100).astype(float)
    states = rng.normal(size=(100, 64))
    if kind == "linear":
        states += np.outer(order, rng.normal(size=64)) * 0.2
    got = order_r2(torch.from_numpy(states), torch.from_numpy(order))
    assert got.n_components == 50
    assert got.r2 == pytest.approx(loo_r2_brute_force(states, order, 50), abs=1e-9)
    if kind == "linear":
        assert got.r2 > 0.9
    else:
        assert got.r2 < 0.3 and got.r2_fit > 0.3  # in-sample R^2 overfits noise; LOO does not


def test_order_r2_caps_components_at_the_rank():
    rng = np.random.default_rng(1)
    order = rng.permutation(100).astype(float)
    other = rng.normal(size=100)
    states = np.outer(order, rng.normal(size=8)) + np.outer(other, rng.normal(size=8))
    got = order_r2(torch.from_numpy(states), torch.from_numpy(order))
    assert got.n_components == 2
    assert got.r2 == pytest.approx(1.0, abs=1e-9) and got.r2_fit == pytest.approx(1.0, abs=1e-9)


def set_block_outputs_to_embedding(model: nn.Module) -> None:
    """Zero every sublayer's output projection: each block then passes its input through."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()


def test_cmp_presence_on_a_model_with_the_order_in_its_embedding():
    t = task("cmp")
    model = tiny()
    set_block_outputs_to_embedding(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.embed.weight[t.symbols] = t.values.float()[:, None] * 0.05 * torch.randn(
            64, generator=g
        ) + 0.3 * torch.randn(100, 64, generator=g)
    assert feature_presence(model, t).r2 > 0.9
    assert feature_presence(tiny(seed=7), t).r2 < 0.3  # random weights


def test_symbol_states_are_the_tok1_states_of_instances():
    """Position 0 sees only itself: the one-token context equals TOK1 of any instance."""
    model, t = tiny(), task()
    caught = []
    hook = model.blocks[0].register_forward_hook(lambda m, i, out: caught.append(out[:, 0]))
    inst = t.instances("all")[::101]  # pairs (i, i): TOK1 = symbol i, i = 0..99
    with torch.no_grad():
        model.logits(inst[:, :3])
    hook.remove()
    torch.testing.assert_close(symbol_states(model, t, [0])[0], caught[0], atol=1e-6, rtol=0)


# -- T_ADD: Fourier modes -----------------------------------------------------------------------
def waves(freqs, values, c=32, seed=0, noise=0.05):
    """[100, c] states whose row i is sum_k cos/sin(2 pi k values[i] / 100) along random dirs."""
    g = torch.Generator().manual_seed(seed)
    v = values.double()[:, None]
    out = noise * torch.randn(100, c, generator=g, dtype=torch.float64)
    for k in freqs:
        a, b = torch.randn(2, c, generator=g, dtype=torch.float64)
        out += torch.cos(2 * math.pi * k * v / 100) * a + torch.sin(2 * math.pi * k * v / 100) * b
    return out


def test_fourier_modes_finds_exactly_the_planted_frequencies():
    values = task("add").values
    states = torch.stack(
        [waves([3, 7], values), waves([7], values, seed=1), waves([], values, noise=1.0, seed=2)]
    )
    got = fourier_modes(states, values)
    assert got.per_layer == ((3, 7), (7,), ())
    assert got.union == (3, 7) and got.count == 2 and got.counts == (2, 1, 0)
    assert got.share.shape == (3, 50)
    torch.testing.assert_close(got.share.sum(1), torch.ones(3, dtype=torch.float64))


def test_fourier_modes_on_noise_is_zero():
    values = task("add").values
    noise = torch.randn(4, 100, 64, generator=torch.Generator().manual_seed(0))
    assert fourier_modes(noise, values).count == 0


def test_fourier_share_matches_an_explicit_dft():
    values = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    states = waves([5, 50], values, c=6, noise=0.5)
    x = states[torch.argsort(values)].numpy()
    x = x - x.mean(0)
    n = 100
    bins = [
        sum(
            abs(sum(x[v, c] * np.exp(-2j * np.pi * k * v / n) for v in range(n))) ** 2
            for c in range(6)
        )
        for k in range(n)
    ]
    total = sum(bins[1:])
    expected = [(bins[k] + bins[n - k]) / total for k in range(1, 50)] + [bins[50] / total]
    got = fourier_modes(states, values)
    np.testing.assert_allclose(got.share[0].numpy(), expected, rtol=1e-9)
    assert got.union == (5, 50)  # Nyquist counts with its single bin


def test_add_presence_on_a_model_with_planted_modes():
    t = task("add")
    model = tiny()
    set_block_outputs_to_embedding(model)
    with torch.no_grad():
        model.embed.weight[t.symbols] = waves([3, 7], t.values, c=64).float()
    got = feature_presence(model, t)
    assert got.per_layer == ((3, 7), (3, 7)) and got.count == 2
    assert feature_presence(tiny(seed=7), t).count == 0  # random weights


def test_embedding_modes_are_counted_where_the_block_outputs_hide_them():
    """fourier_modes_embedding reads the symbols' token embeddings: modes planted there count
    even when the block outputs the other count reads carry none (tiny's case, RESULTS.md)."""
    t = task("add")
    model = tiny(seed=7)
    with torch.no_grad():
        model.embed.weight[t.symbols] = waves([3, 7, 20], t.values, c=64).float()
    assert embedding_fourier_modes(model, t).union == (3, 7, 20)
    row = probe_metrics(model, t)
    assert row["fourier_modes_embedding"] == 3.0
    assert row["fourier_modes"] == float(feature_presence(model, t).count)
    assert probe_metrics(tiny(seed=7), t)["fourier_modes_embedding"] == 0.0  # random weights
    assert "fourier_modes_embedding" not in probe_metrics(tiny(seed=7), task("cmp"))


# -- invalid values -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), "probe k must be >= 1, got 0"),
        (dict(layer=-1), "probe layer must be >= 0, got -1"),
        (dict(chunk_tokens=0), "probe chunk_tokens must be >= 1, got 0"),
        (dict(split="dev"), "probe split must be 'all', 'train' or 'test', got 'dev'"),
    ],
)
def test_probe_rejects_bad_settings(kwargs, message):
    with pytest.raises(UserError, match=message):
        GradientProbe(task(), **kwargs)


def test_probe_rejects_k_above_the_hidden_width():
    message = r"probe k must be in 1..256 \(the MLP's hidden width\), got 257"
    with pytest.raises(UserError, match=message):
        GradientProbe(task(), k=257).measure(tiny(), *batch())


def test_probe_rejects_a_layer_the_model_lacks():
    message = "probe layer must be in 0..1 for a model of 2 blocks, got 2"
    with pytest.raises(UserError, match=message):
        GradientProbe(task(), layer=2).reference(tiny())


def test_probe_rejects_a_task_mask_of_another_shape():
    tokens, task_mask = batch()
    with pytest.raises(UserError, match=r"task_mask shape \[6, 20\] differs from tokens \[6, 21\]"):
        GradientProbe(task()).split_gradient(tiny(), tokens, task_mask[:, 1:])


def test_probe_rejects_a_loss_mask_aligned_with_the_tokens():
    tokens, task_mask = batch()
    with pytest.raises(UserError, match=r"loss_mask must be \[B, T\] = \[6, 20\]"):
        GradientProbe(task()).split_gradient(tiny(), tokens, task_mask, loss_mask=task_mask)


def test_order_r2_rejects_zero_components():
    with pytest.raises(UserError, match="n_components must be >= 1, got 0"):
        order_r2(torch.randn(10, 4), torch.arange(10), n_components=0)


def test_fourier_modes_rejects_a_non_positive_factor():
    with pytest.raises(UserError, match="factor must be > 0, got 0"):
        fourier_modes(torch.randn(100, 4), torch.arange(100), factor=0)


def test_fourier_modes_rejects_values_that_are_not_a_permutation():
    with pytest.raises(UserError, match=r"values must be a permutation of 0..99"):
        fourier_modes(torch.randn(100, 4), torch.zeros(100))


# -- known answers and the sign convention (issue 19) -------------------------------------------
def test_g_nt_is_g_r_when_the_other_tokens_are_the_labels():
    """Batch = all 10K instances with the mask inverted (every target but LABEL is "task"): the
    other-token part is then the LABEL loss, g_nt is parallel to g_r and cos(g_nt, g_r) = 1."""
    model = tiny()
    inst = task().instances("all")
    tokens, task_mask = inject(inst, inst)
    inverted = ~task_mask
    inverted[:, 0] = False  # position 0 is never a target
    probe = GradientProbe(task(), k=64, chunk_tokens=7500)
    cos = probe.measure(model, tokens, inverted)
    assert cos.cos_nt == pytest.approx(1.0, abs=1e-6)
    assert cos.norms["nt"] == pytest.approx(cos.norms["r"] / 3, rel=1e-5)  # mean over 3 targets
    assert cos.cos_t < 0.999  # TOK2 and EOD targets: not the task's gradient


def _task_loss(model: nn.Module, t: RareTask) -> float:
    inst = t.instances("all")
    with torch.no_grad():
        return float(model.token_losses(inst[:, :2], inst[:, 1:3])[:, 1].mean())


@pytest.mark.parametrize("part", ["g", "t", "nt"])
def test_sign_convention_positive_cosine_means_the_step_lowers_the_task_loss(part):
    """cos(x, g_r) > 0 means a descent step along x (theta -= eps x, on the probed neurons)
    lowers the task loss, < 0 that it raises it: the sign the paper reads as interference.
    The first-order change is -eps <x, g_r>, checked against the real loss change."""
    model = tiny(seed=2)
    t = task()
    tokens, task_mask = batch(n_instances=6, b=8, t=24, seed=4)
    probe = GradientProbe(t, k=32)
    ref = probe.reference(model)
    g_t, g_nt = probe.split_gradient(model, tokens, task_mask)
    x = {"g": g_t + g_nt, "t": g_t, "nt": g_nt}[part]
    neurons = top_neurons(ref, 32)
    cos = probe.measure(model, tokens, task_mask, reference=ref)
    c = {"g": cos.cos_g, "t": cos.cos_t, "nt": cos.cos_nt}[part]
    before = _task_loss(model, t)
    eps = 1e-2 / max(float(x.neurons(neurons).norm()), 1e-12)
    mlp = model.blocks[0].mlp
    with torch.no_grad():  # step only the selected neurons' 3 C parameters
        mlp.gate_proj.weight[neurons] -= eps * x.gate[neurons]
        mlp.up_proj.weight[neurons] -= eps * x.up[neurons]
        mlp.down_proj.weight[:, neurons] -= eps * x.down[:, neurons]
    change = _task_loss(model, t) - before
    predicted = -eps * float((x.neurons(neurons).double() * ref.neurons(neurons).double()).sum())
    assert change == pytest.approx(predicted, rel=0.05)
    assert math.copysign(1, change) == -math.copysign(1, c)


def test_a_model_trained_on_the_task_alone():
    """Trained 150 Adam steps on T_CMP instances only (LABEL loss), the model learns the order
    (test accuracy well above the format's 0.505, the order linear in block 0), and a batch of
    training instances has a task gradient along g_r. Measured on torch 2.13 CPU: accuracy
    0.962, order R^2 0.589, cos(g_t, g_r) 0.538 (bounds leave room for other builds)."""
    from raretask.lm.probes import probe_metrics
    from raretask.lm.trainer import chance_levels

    t = task()
    model = tiny(seed=1)
    train = t.instances("train")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        rows = train[torch.randint(0, len(train), (256,), generator=g)]
        loss = model.token_losses(rows[:, :2], rows[:, 1:3])[:, 1].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    _, acc = t.evaluate(lambda x: model.logits(x), "test")
    assert acc > chance_levels(t)["chance_format"] + 0.2
    tokens, task_mask = inject(train[:512], train[:512])
    row = probe_metrics(model, t, tokens, task_mask, k=64)
    assert row["order_r2"] > 0.4
    assert row["cos_gt_gr"] > 0.4


def test_probe_metrics_report_fourier_modes_for_a_model_with_add_features():
    """Fig. 7: a model whose states carry T_ADD's Fourier modes gets them counted in the row a
    trainer records (and the grid's summary keeps as ``fourier_modes``)."""
    t = task("add")
    model = tiny()
    set_block_outputs_to_embedding(model)
    with torch.no_grad():
        model.embed.weight[t.symbols] = waves([5, 12, 31], t.values, c=64).float()
    row = probe_metrics(model, t)
    assert row == {"fourier_modes": 3.0, "fourier_modes_embedding": 3.0}
