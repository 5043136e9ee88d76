"""The toy's numerical engine: maths against independent oracles, training behaviour, RNG.

Tiny sizes (K = 4 tasks x M = 4 features, d = 16); every test runs in well under a second or two.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bench_modules import toy_retractions
from safetensors.torch import load, save

from raretask.toy import MODEL_COLUMNS, TASK_COLUMNS, Schedule, ToyInstance, ToyTrainer
from raretask.toy import TrainSettings as Settings
from raretask.toy.model import (
    RETRACTIONS,
    batch_gradients,
    exact_metrics,
    qr_retraction,
    random_orthonormal,
    seed_shared_gradients,
)

toy_retractions()  # the benchmarks' retractions too: every one is tested against the reference

K, M = 4, 4
D = K * M
PI = np.array([0.4, 0.3, 0.2, 0.1])
LAM = np.tile(np.arange(1, M + 1.0) ** -2, (K, 1))  # lambda_j = j^-2 for every task
FREQ = np.array([True, True, True, False])  # 0.4 + 0.3 + 0.2 >= 0.8
RARE = 3


def inst(width, seed=0, schedule=Schedule(), lam=LAM):
    return ToyInstance(width, PI, lam, seed=seed, rare_task=RARE, frequent=FREQ, schedule=schedule)


def table(trainer):
    """{(instance, step, task, metric): value} from the long-format rows."""
    return {(r["instance"], r["step"], r["task"], r["metric"]): r["value"]
            for r in trainer.metrics()}


def same(a, b):
    """Exact equality of two metric tables, NaN == NaN."""
    assert a.keys() == b.keys()
    x, y = np.array(list(a.values())), np.array([b[k] for k in a])
    np.testing.assert_array_equal(x, y)


def random_problem(seed, n, i=2):
    """Random basis, orthonormal U, Gaussian D, for the maths tests (float64)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.stack([random_orthonormal(D, D, g) for _ in range(i)])
    u = torch.stack([random_orthonormal(D, n, g) for _ in range(i)])
    d = torch.randn(i, D, n, generator=g, dtype=torch.float64) * 0.3
    return g, basis, u, d


# -- maths against oracles ----------------------------------------------------------------------
@pytest.mark.parametrize("use_basis", [True, False])
@pytest.mark.parametrize("rotate", [True, False])
def test_gradients_match_autograd_of_per_sample_loss(use_basis, rotate):
    n, b, b_norm = 5, 12, 10  # two zero-weight padding rows, weights 1/b_norm
    g, basis, u, d = random_problem(0, n)
    basis = basis if use_basis else None
    z = torch.randn(2, b, D, generator=g, dtype=torch.float64)
    tasks = torch.randint(0, K, (2, b), generator=g)
    live = torch.arange(b) < b_norm
    coef = torch.nn.functional.one_hot(tasks, K).double() * live[None, :, None] * (2.0 / b_norm)
    sqrt_lam = torch.as_tensor(np.sqrt(LAM)).reshape(1, 1, D).expand(2, 1, D)
    gu, gd = batch_gradients(u, d, z, coef, sqrt_lam, basis, rotate)

    uu, dd = u.clone().requires_grad_(), d.clone().requires_grad_()
    loss = 0.0
    for i in range(2):
        bmat = basis[i] if use_basis else torch.eye(D, dtype=torch.float64)
        for s in range(b_norm):  # the loss exactly as PAPER.md writes it, one sample at a time
            t = int(tasks[i, s])
            x = bmat @ z[i, s]
            y = torch.as_tensor(np.sqrt(LAM[t])) * (bmat[:, t * M:(t + 1) * M].T @ x)
            loss = loss + ((y - dd[i, t * M:(t + 1) * M] @ (uu[i].T @ x)) ** 2).sum() / b_norm
    ref_u, ref_d = torch.autograd.grad(loss, (uu, dd))
    torch.testing.assert_close(gu, ref_u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gd, ref_d, rtol=1e-10, atol=1e-12)


def test_exact_metrics_match_numpy():
    n = 6
    _, basis, u, d = random_problem(1, n)
    lam = torch.as_tensor(LAM).expand(2, K, M)
    priors = torch.as_tensor(PI).expand(2, K)
    freq = torch.as_tensor(FREQ).expand(2, K)
    got = exact_metrics(u, d, basis, lam, priors, freq)
    for i in range(2):
        bm, um, dm = basis[i].numpy(), u[i].numpy(), d[i].numpy()
        p_u = um @ um.T
        mf = np.zeros((D, D))
        for k in range(K):
            bk = bm[:, k * M:(k + 1) * M]
            ck = bk @ np.diag(LAM[k]) @ bk.T
            s = np.trace(p_u @ ck) / np.trace(ck)
            a = np.diag(np.sqrt(LAM[k])) @ bk.T
            loss_k = np.linalg.norm(a - dm[k * M:(k + 1) * M] @ um.T) ** 2
            assert got["signal"][i, k] == pytest.approx(s, rel=1e-12)
            assert got["signal_norm"][i, k] == pytest.approx((s - n / D) / (1 - n / D), rel=1e-12)
            assert got["loss_norm"][i, k] == pytest.approx(loss_k / np.trace(ck), rel=1e-12)
            assert got["features"][i, k] == pytest.approx(np.trace(um.T @ bk @ bk.T @ um), 1e-12)
            mf += PI[k] * ck * FREQ[k]
        assert got["residual_F"][i] == pytest.approx(np.trace((np.eye(D) - p_u) @ mf), rel=1e-12)
        loss = sum(PI[k] * got["loss_norm"][i, k] * LAM[k].sum() for k in range(K))
        assert got["loss"][i] == pytest.approx(float(loss), rel=1e-12)


def test_loss_norm_of_least_squares_decoder_is_one_minus_signal():
    _, basis, u, _ = random_problem(2, 7)
    sqrt_lam = torch.as_tensor(np.sqrt(LAM)).reshape(1, D, 1)
    d_opt = sqrt_lam * (basis.transpose(1, 2) @ u)  # D_k = Lam_k^1/2 B_k^T U (U orthonormal)
    got = exact_metrics(u, d_opt, basis, torch.as_tensor(LAM).expand(2, K, M),
                        torch.as_tensor(PI).expand(2, K), torch.as_tensor(FREQ).expand(2, K))
    torch.testing.assert_close(got["loss_norm"], 1 - got["signal"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(RETRACTIONS))
def test_retractions_agree_and_are_continuous(name):
    _, _, u, _ = random_problem(3, 6)
    step = u + 1e-2 * torch.randn(u.shape, generator=torch.Generator().manual_seed(4),
                                  dtype=torch.float64)
    q = RETRACTIONS[name](step)
    if name.startswith("polar"):  # the polar factor, not the Q: the same span, Q rotated
        q_qr = qr_retraction(step)
        proj = q @ torch.linalg.solve(q.mT @ q, q.mT)  # onto span(q), exact for polar_once too
        torch.testing.assert_close(proj, q_qr @ q_qr.mT, rtol=0, atol=1e-10)
    else:
        torch.testing.assert_close(q, qr_retraction(step), rtol=0, atol=1e-10)
    # one pass leaves ~0.55 |E|^4 (|E| ~ 0.06 here: 7e-6); the others converge to rounding
    ortho_tol = 2e-5 if name == "polar_once" else 1e-7
    torch.testing.assert_close(q.mT @ q, torch.eye(6, dtype=torch.float64).expand(2, 6, 6),
                               rtol=0, atol=ortho_tol)
    torch.testing.assert_close(RETRACTIONS[name](u), u, rtol=0, atol=1e-12)  # no sign flips


def test_seed_shared_gradients_equal_per_instance_gradients():
    """J = 3 instances per seed, S = 2 seeds, seed fastest: the per-seed products over the
    encoders side by side give each instance's batch_gradients of its own seed's inputs."""
    s_n, j_n, n, b = 2, 3, 5, 12
    g, basis, u, d = random_problem(1, n, i=s_n * j_n)
    z = torch.randn(s_n, b, D, generator=g, dtype=torch.float64)
    x = torch.bmm(z, basis[:s_n].mT)
    tasks = torch.randint(0, K, (s_n * j_n, b), generator=g)
    coef = torch.nn.functional.one_hot(tasks, K).double() * (2.0 / b)
    sqrt_lam = torch.rand(s_n * j_n, 1, D, generator=g, dtype=torch.float64)
    sid = torch.arange(s_n).repeat(j_n)  # instance j * S + s reads seed s
    want = batch_gradients(u, d, z[sid], coef, sqrt_lam, None, False, x=x[sid])
    out = (torch.empty_like(u), torch.empty_like(d))
    got = seed_shared_gradients(u, d, x, z, coef, sqrt_lam, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)


def test_share_inputs_trains_like_per_instance_copies():
    """Widths >= B/2 read the seed's shared x on CPU too; 2 seeds x 2 widths, seed fastest."""
    insts = [inst(w, seed=sd) for w in (8, 8) for sd in (0, 1)]
    base = dict(steps=40, batch_size=16, lr=1e-2, eval_steps=(0, 40))
    runs = []
    for share in (False, True):
        tr = ToyTrainer(insts, Settings(**base, share_inputs=share))
        assert [gr.tiled for gr in tr._groups] == [True]
        tr.run()
        runs.append(table(tr))
    a, b = runs
    assert a.keys() == b.keys()
    x, y = np.array(list(a.values())), np.array([b[k] for k in a])
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert all(b[i, 40, -1, "loss"] < 0.9 * b[i, 0, -1, "loss"] for i in range(4))  # it trained


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
def test_group_streams_train_like_one_stream_on_cuda():
    """Three width groups on three streams inside the step's CUDA graph: the same numbers as
    one stream (only independent kernels are reordered), injections (eager steps) included."""
    insts = [inst(w, seed=sd, schedule=Schedule("matched", gap=5) if w == 8 else Schedule())
             for w in (2, 5, 8) for sd in (0, 1)]
    base = dict(steps=60, batch_size=32, lr=1e-2, eval_steps=(0, 30, 60), device="cuda",
                retraction="polar_once", share_inputs=True)
    runs = []
    for streams in (False, True):
        tr = ToyTrainer(insts, Settings(**base, group_streams=streams))
        assert len(tr._groups) == 3 and (tr._group_streams is not None) == streams
        tr.run()
        runs.append(table(tr))
    a, b = runs
    x, y = np.array(list(a.values())), np.array([b[k] for k in a])
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


# -- the trainer --------------------------------------------------------------------------------
def test_metrics_rows_match_numpy_and_start_at_mean_predictor():
    tr = ToyTrainer([inst(3), inst(6, seed=1)],
                    Settings(steps=30, batch_size=32, lr=1e-2, eval_steps=(0, 30)))
    tr.run()
    t = table(tr)
    n_rows = 2 * 2 * (len(TASK_COLUMNS) * K + len(MODEL_COLUMNS))
    assert len(tr.metrics()) == n_rows
    for i in range(2):
        assert all(t[i, 0, k, "loss_norm"] == pytest.approx(1.0, abs=1e-6) for k in range(K))
        assert t[i, 0, -1, "grad_norm_frequent"] == 0.0  # D = 0: no encoder gradient at init
        m = tr.model(i)
        u, dec, bm = m["U"], m["D"], m["basis"]
        np.testing.assert_allclose(bm.T @ bm, np.eye(D), atol=1e-6)
        for k in range(K):
            bk = bm[:, k * M:(k + 1) * M]
            s = np.trace(u @ u.T @ bk @ np.diag(LAM[k]) @ bk.T) / LAM[k].sum()
            assert t[i, 30, k, "signal"] == pytest.approx(s, rel=1e-9)
            loss_k = np.linalg.norm(np.diag(np.sqrt(LAM[k])) @ bk.T - dec[k] @ u.T) ** 2
            # 1e-6: the float32 basis is orthogonal to ~1e-7 and the metric takes Tr(C_k) = sum(lam)
            assert t[i, 30, k, "loss_norm"] == pytest.approx(loss_k / LAM[k].sum(), rel=1e-6)
        assert t[i, 30, -1, "grad_norm_frequent"] > 0
        assert -1 <= t[i, 30, -1, "grad_cosine"] <= 1
    seen = sum(t[0, 30, k, "seen"] for k in range(K))
    assert seen == 30 * 32  # i.i.d.: every sample counted once


@pytest.mark.parametrize("retraction", sorted(RETRACTIONS))
def test_encoder_stays_orthonormal(retraction):
    tr = ToyTrainer([inst(2), inst(5, seed=1), inst(8, seed=2)],
                    Settings(steps=200, batch_size=64, lr=2e-2, eval_steps=(200,),
                             retraction=retraction))
    tr.run()
    for i in range(3):
        u = tr.model(i)["U"]
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-5)
        assert table(tr)[i, 200, -1, "ortho_error"] < 1e-5


def test_learns_the_theorem_3_allocation():
    """Width N keeps the N largest utilities pi_k * lambda_kj (widths 3, 5, 6 have no ties)."""
    util = PI[:, None] * LAM
    order = np.argsort(-util, axis=None, kind="stable")
    widths = (3, 5, 6)
    tr = ToyTrainer([inst(w, seed=s) for w in widths for s in (0, 1)],
                    Settings(steps=600, batch_size=256, lr=1e-2, eval_steps=(600,)))
    tr.run()
    t = table(tr)
    for i, w in enumerate(np.repeat(widths, 2)):
        kept = np.bincount(np.unravel_index(order[:w], util.shape)[0], minlength=K)
        got = np.array([t[i, 600, k, "features"] for k in range(K)])
        np.testing.assert_allclose(got, kept, atol=0.2, err_msg=f"width {w}")
        # and the per-task loss is the theorem's optimum, normalised
        opt = np.array([LAM[k, kept[k]:].sum() / LAM[k].sum() for k in range(K)])
        got_loss = np.array([t[i, 600, k, "loss_norm"] for k in range(K)])
        np.testing.assert_allclose(got_loss, opt, atol=0.05)


def test_runs_are_deterministic():
    def go():
        tr = ToyTrainer([inst(3), inst(6, seed=1, schedule=Schedule("matched", gap=7))],
                        Settings(steps=50, batch_size=32, lr=1e-2, eval_steps=(0, 20, 50),
                                 trace_every=5))
        tr.run()
        return tr

    a, b = go(), go()
    same(table(a), table(b))
    np.testing.assert_array_equal(a.traces(), b.traces())


def _resume_setup():
    instances = [
        inst(3),
        inst(6, seed=1, schedule=Schedule("matched", gap=5)),
        inst(6, seed=2, schedule=Schedule("every", gap=3, count=7)),
        inst(10, seed=3),
    ]
    settings = Settings(steps=40, batch_size=32, lr=1e-2, eval_steps=(0, 5, 13, 16, 40),
                        trace_every=4, rng_chunk=8)
    return instances, settings


@pytest.mark.parametrize("stop", [13, 16])  # mid-chunk and on a chunk boundary
def test_resume_is_bit_exact(stop):
    instances, settings = _resume_setup()
    full = ToyTrainer(instances, settings)
    full.run()

    first = ToyTrainer(instances, settings)
    calls = []
    first.run(until=stop, callback=calls.append)
    assert calls == [0, 5, 13] + ([16] if stop == 16 else [])
    blob = save(first.state_dict())  # safetensors-compatible, round-tripped through bytes
    second = ToyTrainer(instances, settings)
    second.load_state_dict(load(blob))
    assert second.step == stop
    second.run()
    same(table(second), table(full))
    np.testing.assert_array_equal(second.traces(), full.traces())
    np.testing.assert_array_equal(second.trace_steps(), np.arange(0, 41, 4))
    for key, value in full.state_dict().items():
        torch.testing.assert_close(second.state_dict()[key], value, rtol=0, atol=0,
                                   equal_nan=True, msg=key)


def test_a_checkpoint_from_another_device_kind_resumes_reproducibly():
    """A CUDA generator's state (16 bytes, Philox) cannot continue a CPU Mersenne Twister's
    stream, nor the reverse: the streams restart from a seed fixed by instance and step, so a
    run cut on one device resumes on the other, twice the same, where set_state used to raise."""
    instances, settings = _resume_setup()
    first = ToyTrainer(instances, settings)
    first.run(until=13)
    state = first.state_dict()
    philox = torch.arange(16, dtype=torch.uint8)  # the size torch.cuda's generator state has
    foreign = {k: (philox if k.endswith(("rng_train", "rng_inject")) else v)
               for k, v in state.items()}
    runs = []
    for _ in range(2):
        resumed = ToyTrainer(instances, settings)
        resumed.load_state_dict(foreign)
        resumed.run()
        runs.append(resumed)
    same(table(runs[0]), table(runs[1]))
    full = ToyTrainer(instances, settings)
    full.run()
    assert not np.array_equal(runs[0].traces()[-1], full.traces()[-1])  # other draws after 13
    np.testing.assert_array_equal(runs[0].traces()[:4], full.traces()[:4])  # steps 0..12 kept


def test_load_rejects_other_instances():
    instances, settings = _resume_setup()
    state = ToyTrainer(instances, settings).state_dict()
    other = ToyTrainer([inst(3, seed=9)] + instances[1:], settings)
    with pytest.raises(ValueError, match="meta.seeds"):
        other.load_state_dict(state)


def test_instances_do_not_depend_on_group_mates():
    """Mixed widths and schedules in one trainer == each instance trained alone (bit-exact)."""
    instances = [
        inst(2),
        inst(5, seed=1),
        inst(5, seed=2, schedule=Schedule("matched", gap=4)),
        inst(5, seed=3, schedule=Schedule("every", gap=3, count=5)),
        inst(8, seed=4),
    ]
    settings = Settings(steps=30, batch_size=32, lr=1e-2, eval_steps=(0, 12, 30), trace_every=3)
    together = ToyTrainer(instances, settings)
    together.run()
    t = table(together)
    for i, x in enumerate(instances):
        alone = ToyTrainer([x], settings)
        alone.run()
        a = table(alone)
        same({key: t[(i, *key[1:])] for key in a}, a)
        np.testing.assert_array_equal(together.traces()[:, i], alone.traces()[:, 0])


def test_evals_do_not_disturb_training():
    x = [inst(4, schedule=Schedule("matched", gap=6))]
    sparse = ToyTrainer(x, Settings(steps=30, batch_size=32, lr=1e-2, eval_steps=(30,)))
    dense = ToyTrainer(x, Settings(steps=30, batch_size=32, lr=1e-2,
                                   eval_steps=tuple(range(31)), trace_every=1))
    sparse.run()
    dense.run()
    a, b = table(sparse), table(dense)
    same(a, {key: b[key] for key in a})


def test_matched_injection_conserves_samples_and_wide_model_accumulates():
    """Paper Fig. 4: G = 50, m = round(50 * 64 * 0.1) = 320 rare samples per injection.

    Frequent tasks have 2 features each, so a width-10 model has room for the rare task and
    accumulates it injection after injection; a width-3 model forgets it (update-and-forget).
    """
    lam = LAM.copy()
    lam[:3, 2:] = 0.0
    gap, steps, bsz = 50, 400, 64
    sched = Schedule("matched", gap=gap)
    tr = ToyTrainer([inst(3, schedule=sched, lam=lam), inst(10, schedule=sched, lam=lam)],
                    Settings(steps=steps, batch_size=bsz, lr=1e-2, eval_steps=(gap - 1, steps),
                             trace_every=1))
    tr.run()
    t = table(tr)
    for i in range(2):
        assert t[i, gap - 1, RARE, "seen"] == 0  # withheld until the first injection
        assert t[i, steps, RARE, "seen"] == round(steps * bsz * PI[RARE]) == 2560
        assert sum(t[i, steps, k, "seen"] for k in range(K)) == steps * bsz + 2560
    trace = tr.traces()
    assert trace.shape == (steps + 1, 2)
    for s in range(2 * gap, steps, gap):  # the first injection only trains D_rare (D starts at 0)
        assert trace[s + 3, 1] - trace[s - 1, 1] > 0.01, f"no jump at step {s}"
    assert trace[-1, 1] > 0.5 > trace[gap, 1]  # wide: accumulated
    assert abs(trace[-1, 0] - trace[gap, 0]) < 0.05  # narrow: back where it started


def test_every_schedule_counts():
    tr = ToyTrainer([inst(4, schedule=Schedule("every", gap=3, count=5))],
                    Settings(steps=20, batch_size=16, eval_steps=(20,)))
    tr.run()
    assert table(tr)[0, 20, RARE, "seen"] == 6 * 5  # injections at steps 3, 6, ..., 18


# -- validation: one test per invalid value, matching its message -------------------------------
def test_matched_with_too_small_gap_is_rejected():
    with pytest.raises(ValueError, match=r"schedule\.gap: gap=1 gives m = .* = 0 rare samples"):
        ToyTrainer([inst(4, schedule=Schedule("matched", gap=1))],
                   Settings(steps=10, batch_size=4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="matched", gap=0), r"schedule\.gap must be >= 1"),
        (dict(kind="every", gap=2, count=0), r"schedule\.count must be >= 1"),
        (dict(kind="weekly"), r"schedule\.kind"),
    ],
)
def test_bad_schedules_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(width=17), r"width must be an integer in \[1, d=16\]"),
        (dict(frequencies=PI * 2), "frequencies must sum to 1"),
        (dict(eigenvalues=LAM[:, ::-1]), "eigenvalues of task 0 must be sorted descending"),
        (dict(rare_task=4), r"rare_task must be an integer in \[0, 4\)"),
        (dict(frequent=np.array([False, False, False, True]) & False), "frequent set holds no"),
    ],
)
def test_bad_instances_are_rejected(change, message):
    args = dict(width=4, frequencies=PI, eigenvalues=LAM, seed=0, rare_task=RARE, frequent=FREQ)
    with pytest.raises(ValueError, match=message):
        ToyInstance(**{**args, **change})


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match=r"eval_steps must lie in \[0, steps=10\]"):
        Settings(steps=10, eval_steps=(0, 11))
    with pytest.raises(ValueError, match="retraction must be one of"):
        Settings(steps=10, retraction="svd")
    with pytest.raises(ValueError, match=r"until must lie in \[step=0, steps=10\]"):
        ToyTrainer([inst(4)], Settings(steps=10, batch_size=4)).run(until=11)


def test_padded_group_trains_each_instance_like_its_own_width():
    """pad_width merges widths 2..8 into one group padded to 8 (the GPU layout): per-instance
    numbers equal one group per width up to float32 rounding, with injections too, and a
    checkpoint of one layout resumes in the other."""
    instances = [inst(2), inst(5, seed=1), inst(5, seed=2, schedule=Schedule("matched", gap=4)),
                 inst(8, seed=3), inst(12, seed=4)]
    base = dict(steps=24, batch_size=32, lr=1e-2, eval_steps=(0, 10, 24), trace_every=4,
                retraction="series_qr")
    plain = ToyTrainer(instances, Settings(**base))
    padded = ToyTrainer(instances, Settings(**base, pad_width=8))
    assert sorted(gr.n for gr in plain._groups) == [2, 5, 8, 12]
    assert sorted(gr.n for gr in padded._groups) == [8, 12]
    plain.run(until=10)
    padded.run(until=10)
    state = padded.state_dict()  # real columns only
    assert state["instance.0.U"].shape == (D, 2) and state["instance.2.D"].shape == (K, M, 5)
    resumed = ToyTrainer(instances, Settings(**base))  # padded checkpoint, unpadded trainer
    resumed.load_state_dict(state)
    for tr in (plain, padded, resumed):
        tr.run()
    a, b, c = table(plain), table(padded), table(resumed)
    assert a.keys() == b.keys() == c.keys()
    for key, value in a.items():
        assert b[key] == pytest.approx(value, abs=2e-4, nan_ok=True), key
        assert c[key] == pytest.approx(value, abs=2e-4, nan_ok=True), key
    ortho = [v for k, v in b.items() if k[3] == "ortho_error"]
    assert max(ortho) < 1e-5  # padding columns do not count as non-orthonormal
    np.testing.assert_allclose(padded.traces(), plain.traces(), atol=2e-4)
    gr = next(g for g in padded._groups if g.n == 8)
    j = gr.idx.index(0)
    assert torch.count_nonzero(gr.params[:, j, :, 2:]) == 0  # padding stays exactly zero
    np.testing.assert_allclose(padded.model(1)["U"], plain.model(1)["U"], atol=2e-4)
