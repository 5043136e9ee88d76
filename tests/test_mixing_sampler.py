"""The sampler: even spreading (window bounds), caps, exact resume, chunking independence."""

import numpy as np
import pytest

from raretask.errors import UserError
from raretask.mixing.sampler import MixtureDataset, MixtureSampler


def window_errors(tasks: np.ndarray, q: np.ndarray, w: int) -> np.ndarray:
    out = np.zeros(q.size)
    for k in range(q.size):
        c = np.concatenate([[0], np.cumsum(tasks == k)])
        out[k] = np.max(np.abs(c[w:] - c[:-w] - q[k] * w))
    return out


def rare_bounds(s: MixtureSampler) -> dict[int, float]:
    """B_j = 1 + r_j * sum_{i<j} B_i for the rare levels (rarest first)."""
    bounds, acc = {}, 0.0
    for k, r in zip(s.rare, s.rates, strict=True):
        bounds[k] = 1.0 + r * acc
        acc += bounds[k]
    return bounds


MIXES = [
    [0.6, 0.25, 0.1, 0.04, 0.01],
    [0.5, 0.3, 0.17, 0.02, 0.007, 0.003],
    [0.9, 0.1],
    [0.34, 0.33, 0.32, 0.01],
]


@pytest.mark.parametrize("q", MIXES)
def test_rare_tasks_are_spread_within_the_bound(q):
    q = np.asarray(q) / np.sum(q)
    rho = q.min()
    w = int(np.ceil(10 / rho))
    s = MixtureSampler(q, sizes=[10**6] * q.size, total=4 * w)
    tasks = s.tasks(4 * w)
    err = window_errors(tasks, q, w)
    rarest = int(np.argmin(q))
    assert err[rarest] < 1.0  # as even as integers allow: floor or ceil of q W in every window
    for k, b in rare_bounds(s).items():
        assert err[k] <= b + 1e-9
    # the frequent tasks: earliest-deadline-first (< 2) plus what the rare tasks push onto them
    f = len(s.frequent)
    slack = sum(rare_bounds(s).values())
    for k in s.frequent:
        assert err[k] <= 2 * (1 - (1 / (2 * f - 2) if f > 1 else 0)) + q[k] * slack + 1e-9
    # over the whole run every task is within the same bounds of its expected count
    counts = np.bincount(tasks, minlength=q.size)
    assert np.all(np.abs(counts - q * 4 * w) <= 2 + slack)


def test_rarest_task_count_in_every_window_of_10_over_rho_is_10_or_within_1():
    q = np.array([0.7, 0.2, 0.095, 0.005])
    s = MixtureSampler(q, sizes=[10**6] * 4, total=20_000)
    tasks = s.tasks(20_000)
    c = np.concatenate([[0], np.cumsum(tasks == 3)])
    w = 2000  # 10 / rho
    counts = c[w:] - c[:-w]
    assert set(counts.tolist()) <= {9, 10, 11} and np.abs(counts - 10).max() <= 1
    assert counts.min() >= 10 - 1 and counts.max() <= 10 + 1


def test_no_example_beyond_its_cap():
    q = np.array([0.5, 0.3, 0.2])
    sizes = [400, 300, 70]
    s = MixtureSampler(q, sizes=sizes, total=700, max_epochs=2.0, seed=3)
    pairs = s.take(700)
    for k, n in enumerate(sizes):
        ex = pairs[pairs[:, 0] == k, 1]
        assert ex.size <= 2 * n and np.all(ex < n)
        assert np.bincount(ex, minlength=n).max() <= 2
    # task 2 wants 140 = exactly its cap: one full pass of each of its 70 examples, twice
    ex2 = pairs[pairs[:, 0] == 2, 1]
    assert ex2.size == 140 and np.all(np.bincount(ex2, minlength=70) == 2)
    assert sorted(ex2[:70].tolist()) == list(range(70))  # a permutation per epoch


def test_caps_that_cannot_cover_the_total_are_refused():
    with pytest.raises(UserError, match="exceed what the caps allow"):
        MixtureSampler([0.5, 0.5], sizes=[10, 10], total=100, max_epochs=2)
    with pytest.raises(UserError, match="task 'b': weight 0.5 but no examples"):
        MixtureSampler([0.5, 0.5], sizes=[10, 0], total=5, names=["a", "b"])


def test_resume_from_a_saved_state_continues_exactly():
    q = [0.55, 0.3, 0.1, 0.04, 0.01]
    ref = MixtureSampler(q, sizes=[500, 400, 300, 50, 7], total=5000, max_epochs=9, seed=1)
    full = ref.take(5000)
    a = MixtureSampler(q, sizes=[500, 400, 300, 50, 7], total=5000, max_epochs=9, seed=1)
    first = a.take(1234)
    state = a.state_dict()
    b = MixtureSampler(q, sizes=[500, 400, 300, 50, 7], total=5000, max_epochs=9, seed=1)
    b.load_state_dict(state)
    rest = b.take(10_000)
    assert np.array_equal(np.concatenate([first, rest]), full)
    # chunking does not matter either
    c = MixtureSampler(q, sizes=[500, 400, 300, 50, 7], total=5000, max_epochs=9, seed=1)
    parts = [c.take(n) for n in (1, 7, 13, 4096, 10_000)]
    assert np.array_equal(np.concatenate(parts), full)
    # and another seed reorders examples but not tasks
    d = MixtureSampler(q, sizes=[500, 400, 300, 50, 7], total=5000, max_epochs=9, seed=2)
    other = d.take(5000)
    assert np.array_equal(other[:, 0], full[:, 0]) and not np.array_equal(other, full)


def test_iterable_dataset_resumes():
    sources = [[f"a{i}" for i in range(50)], [f"b{i}" for i in range(20)], ["c0", "c1"]]
    ds = MixtureDataset(sources, weights=[0.7, 0.28, 0.02], total=300, max_epochs=5)
    full = list(ds)
    assert len(full) == 300 and sum(x.startswith("c") for x in full) == 6
    ds2 = MixtureDataset(sources, weights=[0.7, 0.28, 0.02], total=300, max_epochs=5)
    it = iter(ds2.sampler)
    head = [next(it) for _ in range(10)]
    assert [sources[t][e] for t, e in head] == full[:10]
    ds3 = MixtureDataset(sources, weights=[0.7, 0.28, 0.02], total=300, max_epochs=5)
    ds3.sampler.take(100)
    state = ds3.state_dict()
    ds4 = MixtureDataset(sources, weights=[0.7, 0.28, 0.02], total=300, max_epochs=5)
    ds4.load_state_dict(state)
    assert list(ds4) == full[100:]
    with pytest.raises(UserError, match="sampler state"):
        ds4.load_state_dict({"position": 1})


SOURCES = [[f"a{i}" for i in range(500)], [f"b{i}" for i in range(300)],
           [f"c{i}" for i in range(20)]]
MIX = dict(weights=[0.7, 0.28, 0.02], total=2003, max_epochs=5, seed=3)  # a partial last block


def test_dataloader_workers_keep_the_sampler_order():
    from torch.utils.data import DataLoader

    full = list(MixtureDataset(SOURCES, **MIX))
    assert len(full) == 2003
    ds = MixtureDataset(SOURCES, **MIX, batch_size=8)
    got = [x for batch in DataLoader(ds, batch_size=8, num_workers=2) for x in batch]
    assert got == full  # the loader's round-robin over the workers' blocks = the sequence
    with pytest.raises(Exception, match="give batch_size"):  # re-raised by the loader
        list(DataLoader(MixtureDataset(SOURCES, **MIX), batch_size=8, num_workers=2))


def test_ranks_take_alternate_blocks_and_seek_resumes():
    full = list(MixtureDataset(SOURCES, **MIX))
    ranks = [MixtureDataset(SOURCES, **MIX, batch_size=8, rank=r, world_size=3) for r in range(3)]
    parts = [list(d) for d in ranks]
    assert [len(p) for p in parts] == [len(d) for d in ranks] == [672, 667, 664]
    # block b of the sequence is rank b % 3's (b // 3)-th block
    rebuilt = [x for b in range(-(-2003 // 8)) for x in parts[b % 3][(b // 3) * 8:(b // 3 + 1) * 8]]
    assert rebuilt == full
    for r, consumed in [(1, 0), (1, 400), (2, 664), (0, 672)]:
        d = MixtureDataset(SOURCES, **MIX, batch_size=8, rank=r, world_size=3)
        d.seek(consumed)
        assert list(d) == parts[r][consumed:]
    with pytest.raises(UserError, match=r"seek: expected 0..667 samples, got 668"):
        ranks[1].seek(668)
    with pytest.raises(UserError, match="rank must be in 0..world_size - 1, got rank 3 of 3"):
        MixtureDataset(SOURCES, **MIX, rank=3, world_size=3)
    with pytest.raises(UserError, match="batch_size must be an integer >= 1"):
        MixtureDataset(SOURCES, **MIX, batch_size=0)
