"""The sampler: even spreading (window bounds), caps and the budget, exact resume (mid-iteration,
workers, ranks), epochs, building from a plan."""

import itertools
import json
import warnings

import numpy as np
import pytest

from raretask.errors import UserError
from raretask.mixing.plan import make_plan
from raretask.mixing.sampler import CHUNK, MixtureDataset, MixtureSampler
from raretask.mixing.thresholds import CalibratedThreshold


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


# -- caps and the budget ------------------------------------------------------------------------

def test_a_total_beyond_the_caps_budget_is_refused_in_one_line():
    with pytest.raises(UserError) as err:
        MixtureSampler([0.5, 0.5], sizes=[10, 10], total=100, max_epochs=2)
    assert str(err.value) == (
        "total: 100 samples exceed the budget of 40 that the caps allow (task '0': share 0.5 x "
        "total = 50 occurrences, max_epochs 2 x 10 examples = 20); lower total, add data, or "
        "pass beyond_budget='repeat' to raise the caps")
    with pytest.raises(UserError, match="task 'b': weight 0.5 but no examples"):
        MixtureSampler([0.5, 0.5], sizes=[10, 0], total=5, names=["a", "b"])
    with pytest.raises(UserError, match="beyond_budget must be 'refuse' or 'repeat'"):
        MixtureSampler([0.5, 0.5], sizes=[10, 10], total=5, beyond_budget="drop")
    with pytest.raises(UserError, match="max_epochs: expected one number"):
        MixtureSampler([0.5, 0.5], sizes=[10, 10], total=5, max_epochs=[2])
    # per-task caps: only the capped task sets the budget, (cap + 1) / share
    s = MixtureSampler([0.9, 0.1], sizes=[10, 50], total=1000, max_epochs=[None, 2])
    assert s.budget == 1010 and s.caps[1] == 100


def max_gap(tasks: np.ndarray, k: int) -> int:
    """Longest run of positions without task k, the run's start and end included."""
    at = np.flatnonzero(tasks == k)
    return int(np.diff(np.concatenate([[-1], at, [tasks.size]])).max())


def test_beyond_budget_repeat_raises_the_caps_and_keeps_the_rare_task_to_the_end():
    q, sizes = [0.6, 0.37, 0.03], [6000, 3000, 100]
    assert MixtureSampler(q, sizes, total=10_000, max_epochs=3).budget == 10_033
    with pytest.warns(UserWarning, match=r"total 20,000 exceeds the caps' budget of 10,033: "
                                         r"caps raised for '2' \(up to 6.01 passes"):
        s = MixtureSampler(q, sizes, total=20_000, max_epochs=3, beyond_budget="repeat")
    pairs = s.take(20_000)
    tasks = pairs[:, 0]
    assert np.bincount(tasks).tolist() == [12_000, 7_400, 600]
    # evenly spread over the whole run (the bug: capped at 300, none in the last 49%)
    assert max_gap(tasks, 2) == 34 <= 1.5 / 0.03
    assert np.bincount(pairs[tasks == 2, 1], minlength=100).tolist() == [6] * 100


# -- exact resume --------------------------------------------------------------------------------

BIG = [[f"a{i}" for i in range(5000)], [f"b{i}" for i in range(3000)],
       [f"c{i}" for i in range(900)], [f"d{i}" for i in range(100)]]
BIG_MIX = dict(weights=[0.59, 0.29, 0.09, 0.03], total=10_000, max_epochs=3, seed=7)
KS = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5000, *np.random.default_rng(5).integers(1, 10_000, 3),
      9_999, 10_000]


@pytest.fixture(scope="module")
def big_full():
    return list(MixtureDataset(BIG, **BIG_MIX))


def test_sampler_state_taken_mid_iteration_is_that_of_the_pairs_yielded():
    q, sizes = [0.59, 0.29, 0.09, 0.03], [5000, 3000, 900, 100]
    full = [tuple(map(int, r)) for r in MixtureSampler(q, sizes, 10_000, 3, seed=7).take(10_000)]
    for k in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5000, 9_999, 10_000):
        s = MixtureSampler(q, sizes, 10_000, 3, seed=7)
        it = iter(s)
        head = list(itertools.islice(it, k))
        assert s.position == k
        state = json.loads(json.dumps(s.state_dict()))
        assert state["position"] == k  # the bug: 5,000 consumed read 8,192
        fresh = MixtureSampler(q, sizes, 10_000, 3, seed=7)
        fresh.load_state_dict(state)
        assert head + list(fresh) == full
        assert list(it) == full[k:]  # the iteration itself goes on after state_dict


@pytest.mark.parametrize("k", KS)
def test_dataset_state_after_k_items_resumes_with_item_k_plus_1(big_full, k):
    ds = MixtureDataset(BIG, **BIG_MIX)
    it = iter(ds)
    head = list(itertools.islice(it, k))
    state = json.loads(json.dumps(ds.state_dict()))
    assert state["consumed"] == k and state["epoch"] == 0 and state["sampler"]["position"] == k
    fresh = MixtureDataset(BIG, **BIG_MIX)
    fresh.load_state_dict(state)
    assert head + list(fresh) == big_full
    bare = MixtureDataset(BIG, **BIG_MIX)  # what a loop that only counts samples can save
    bare.load_state_dict({"consumed": int(k)})
    assert list(bare)[:50] == big_full[k:k + 50]
    assert next(it, None) == (big_full[k] if k < 10_000 else None)


def test_dataset_state_is_checked():
    ds = MixtureDataset(BIG, **BIG_MIX)
    state = ds.state_dict(consumed=300)
    other = MixtureDataset(BIG, **{**BIG_MIX, "seed": 8})
    with pytest.raises(UserError, match=r"dataset state: mix '\w+' is not this dataset's"):
        other.load_state_dict(state)
    with pytest.raises(UserError, match="sampler position 300 does not match consumed 301"):
        ds.load_state_dict({**state, "consumed": 301})
    with pytest.raises(UserError, match=r"expected consumed \(and epoch, sampler, mix\), got "
                                        r"\['frequent_time', 'level', 'occurrences', 'position'\]"):
        ds.load_state_dict(ds.sampler.state_dict())  # the old format, which counted chunks
    with pytest.raises(UserError, match=r"consumed: expected 0..10000 samples .* got 10001"):
        ds.load_state_dict({"consumed": 10_001})
    with pytest.raises(UserError, match=r"state_dict: expected 0..10000 samples .* got -1"):
        ds.state_dict(consumed=-1)


SOURCES = [[f"a{i}" for i in range(500)], [f"b{i}" for i in range(300)],
           [f"c{i}" for i in range(20)]]
MIX = dict(weights=[0.7, 0.28, 0.02], total=2003, max_epochs=5, seed=3)  # a partial last block
FIRST = ['a36', 'b199', 'a1', 'a55', 'a217', 'b112', 'a224', 'a323', 'b248', 'a190']


def loader(ds, workers=2):
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=8, num_workers=workers)


def flat(batches):
    return [x for batch in batches for x in batch]


def test_dataloader_workers_keep_the_sampler_order_and_resume_from_the_loops_count():
    full = list(MixtureDataset(SOURCES, **MIX))
    assert len(full) == 2003 and full[:10] == FIRST
    assert [sum(x[0] == t for x in full) for t in "abc"] == [1402, 561, 40]
    ds = MixtureDataset(SOURCES, **MIX, batch_size=8)
    got = []
    for i, batch in enumerate(loader(ds)):
        got += batch
        if i == 36:  # the loop has received 37 batches; the workers have prefetched more
            break
    assert got == full[:296] and ds.consumed == 0  # the object in this process did not move
    state = json.loads(json.dumps(ds.state_dict(consumed=len(got))))
    fresh = MixtureDataset(SOURCES, **MIX, batch_size=8)
    fresh.load_state_dict(state)
    assert flat(loader(fresh)) == full[296:]
    assert flat(loader(fresh)) == full[296:]  # still where it was loaded: set_epoch moves on
    fresh.set_epoch(0)  # the same epoch keeps the position
    assert flat(loader(fresh, workers=0)) == full[296:] and fresh.consumed == 0
    assert flat(loader(fresh)) == full  # num_workers=0 completed the epoch: a new one
    for k in (8, 2000, 2003):  # the first batch, the last full one, the end
        d = MixtureDataset(SOURCES, **MIX, batch_size=8)
        d.load_state_dict(ds.state_dict(consumed=k))
        assert flat(loader(d)) == full[k:]
    odd = MixtureDataset(SOURCES, **MIX, batch_size=8)
    odd.load_state_dict({"consumed": 300})
    raises_in_workers(odd, "consumed 300 is not a multiple of batch_size 8")
    raises_in_workers(MixtureDataset(SOURCES, **MIX), "give batch_size")


def raises_in_workers(ds, match: str) -> None:
    """The loader re-raises a worker's UserError; its workers are shut down here, or the next
    test's forked workers inherit them."""
    it = iter(loader(ds))
    try:
        with pytest.raises(UserError, match=match):
            next(it)
    finally:
        it._shutdown_workers()


def test_ranks_take_alternate_blocks_and_each_rank_resumes_exactly():
    full = list(MixtureDataset(SOURCES, **MIX))
    ranks = [MixtureDataset(SOURCES, **MIX, batch_size=8, rank=r, world_size=3) for r in range(3)]
    parts = [list(d) for d in ranks]
    assert [len(p) for p in parts] == [len(d) for d in ranks] == [672, 667, 664]
    # block b of the sequence is rank b % 3's (b // 3)-th block
    rebuilt = [x for b in range(-(-2003 // 8)) for x in parts[b % 3][(b // 3) * 8:(b // 3 + 1) * 8]]
    assert rebuilt == full
    for r, consumed in [(1, 0), (1, 1), (1, 400), (1, 403), (2, 663), (2, 664), (0, 672)]:
        d = MixtureDataset(SOURCES, **MIX, batch_size=8, rank=r, world_size=3)
        it = iter(d)
        assert list(itertools.islice(it, consumed)) == parts[r][:consumed]
        state = d.state_dict()
        e = MixtureDataset(SOURCES, **MIX, batch_size=8, rank=r, world_size=3)
        e.load_state_dict(state)
        assert list(e) == parts[r][consumed:] == list(it)
        d.seek(consumed)
        assert list(d) == parts[r][consumed:]
    with_workers = MixtureDataset(SOURCES, **MIX, batch_size=8, rank=1, world_size=3)
    with_workers.load_state_dict({"consumed": 400})
    assert flat(loader(with_workers)) == parts[1][400:]
    with pytest.raises(UserError, match="mix .* is not this dataset's"):  # rank 0's state
        ranks[1].load_state_dict(ranks[0].state_dict(consumed=8))
    with pytest.raises(UserError, match=r"seek: expected 0..667 samples .* got 668"):
        ranks[1].seek(668)
    with pytest.raises(UserError, match="rank must be in 0..world_size - 1, got rank 3 of 3"):
        MixtureDataset(SOURCES, **MIX, rank=3, world_size=3)
    with pytest.raises(UserError, match="batch_size must be an integer >= 1"):
        MixtureDataset(SOURCES, **MIX, batch_size=0)


# -- epochs --------------------------------------------------------------------------------------

def test_every_iteration_is_a_full_epoch_and_set_epoch_reshuffles_examples_only():
    ds = MixtureDataset(SOURCES, **MIX)
    first, again = list(ds), list(ds)
    assert len(first) == 2003 and again == first  # the bug: the second epoch was empty
    ds.set_epoch(1)
    e1 = list(ds)
    assert e1[:10] == ['a396', 'b108', 'a423', 'a461', 'a50', 'b252', 'a332', 'a204', 'b269', 'a94']
    assert [x[0] for x in e1] == [x[0] for x in first]  # the same task sequence: the spacing
    assert e1 != first
    for t, n in (("a", 500), ("b", 300), ("c", 20)):  # still a permutation per pass and task
        xs = [x for x in e1 if x[0] == t]
        assert sorted(xs[:n]) == sorted(f"{t}{i}" for i in range(n))
    ds.set_epoch(1)
    assert list(itertools.islice(iter(ds), 5)) == e1[:5]
    ds.set_epoch(1)  # the same epoch: keeps the position
    assert ds.consumed == 5 and list(ds) == e1[5:]
    with pytest.raises(UserError, match="set_epoch: expected an integer >= 0, got -1"):
        ds.set_epoch(-1)
    # with workers: every pass over the loader is a full epoch, set_epoch alike
    dw = MixtureDataset(SOURCES, **MIX, batch_size=8)
    assert flat(loader(dw)) == first and flat(loader(dw)) == first
    dw.set_epoch(1)
    assert flat(loader(dw)) == e1


def test_a_state_saved_in_epoch_1_resumes_epoch_1():
    ds = MixtureDataset(SOURCES, **MIX)
    ds.set_epoch(1)
    e1 = list(ds)
    list(itertools.islice(iter(ds), 1000))
    state = ds.state_dict()
    assert state["epoch"] == 1 and state["consumed"] == 1000
    fresh = MixtureDataset(SOURCES, **MIX)
    fresh.load_state_dict(state)
    assert list(fresh) == e1[1000:]
    assert len(list(fresh)) == 2003  # then a full epoch again


# -- from a plan ---------------------------------------------------------------------------------

NAMES, COUNTS = ["a", "b", "c", "d"], [6000, 3000, 900, 100]


@pytest.fixture(scope="module")
def plan_json():
    thr = CalibratedThreshold(np.log10(0.02), 0.0)  # 2% at any size; d (1%) gets 1.5 x 2%
    plan = make_plan(NAMES, COUNTS, thr, 1.0, targets=["d"], margin=1.5, available=COUNTS,
                     max_epochs=3)
    return json.loads(json.dumps(plan.to_json()))


def test_from_plan_yields_task_and_example_index_pairs_evenly_spread(plan_json):
    ds = MixtureDataset.from_plan(plan_json, seed=0)
    assert len(ds) == 10_000  # the plan's budget
    items = list(ds)
    assert items[:6] == [("a", 5849), ("b", 2610), ("a", 5286), ("a", 4422), ("b", 1429),
                         ("a", 5247)]
    counts = {t: sum(x[0] == t for x in items) for t in NAMES}
    assert counts == {"a": 5879, "b": 2939, "c": 882, "d": 300}  # d at its cap: 3 x 100
    tasks = np.array([NAMES.index(t) for t, _ in items])
    assert max_gap(tasks, 3) == 34 <= 1.5 / 0.03  # over the whole run
    d = [e for t, e in items if t == "d"]
    assert np.bincount(d, minlength=100).tolist() == [3] * 100


def test_from_plan_refuses_a_total_beyond_the_budget_or_repeats_when_asked(plan_json, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_json))
    with pytest.raises(UserError, match=r"^total: 20,000 samples exceed the budget of 10,033 "
                                        r"that the caps allow \(task 'd': share 0.03"):
        MixtureDataset.from_plan(path, total=20_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = MixtureDataset.from_plan(str(path), total=20_000, beyond_budget="repeat")
    assert "caps raised for 'd'" in str(caught[0].message)
    tasks = np.array([NAMES.index(t) for t, _ in ds])
    assert np.bincount(tasks).tolist() == [11_758, 5_879, 1_763, 600]
    assert max_gap(tasks, 3) <= 1.5 / 0.03


def test_from_plan_with_sources_yields_the_examples(plan_json):
    sources = {t: [f"{t}{i}" for i in range(n)] for t, n in zip(NAMES, COUNTS, strict=True)}
    pairs = list(MixtureDataset.from_plan(plan_json, total=2000, seed=4))
    want = [f"{t}{i}" for t, i in pairs]
    assert list(MixtureDataset.from_plan(plan_json, total=2000, seed=4, sources=sources)) == want
    as_list = [sources[t] for t in NAMES]
    assert list(MixtureDataset.from_plan(plan_json, total=2000, seed=4, sources=as_list)) == want
    with pytest.raises(UserError, match="sources: task 'c' has 899 examples but the plan "
                                        "counted 900"):
        MixtureDataset.from_plan(plan_json, sources={**sources, "c": sources["c"][1:]})
    with pytest.raises(UserError, match="sources: unknown task 'e'"):
        MixtureDataset.from_plan(plan_json, sources={**sources, "e": []})
    with pytest.raises(UserError, match=r"sources: task 'd' \(weight 0.03\) is missing"):
        MixtureDataset.from_plan(plan_json, sources={t: sources[t] for t in "abc"})
    with pytest.raises(UserError, match=r"sources: expected 4 entries"):
        MixtureDataset.from_plan(plan_json, sources=as_list[:3])
    with pytest.raises(UserError, match="the plan is in examples; tokens_per_example"):
        MixtureDataset.from_plan(plan_json, tokens_per_example=[1, 2, 3, 4])


def test_from_plan_in_tokens_needs_tokens_per_example(plan_json):
    tokens = {**plan_json, "unit": "tokens", "budget": 1e6,
              "tasks": [{**t, "available": t["available"] * 100} for t in plan_json["tasks"]]}
    with pytest.raises(UserError, match="^plan: the plan is in tokens and does not record "
                                        "tokens per example; give tokens_per_example"):
        MixtureDataset.from_plan(tokens)
    tpe = {"a": 200, "b": 100, "c": 100, "d": 100}  # a's examples are twice as long
    ds = MixtureDataset.from_plan(tokens, tokens_per_example=tpe)
    w = np.array([t["weight"] for t in plan_json["tasks"]]) / [200, 100, 100, 100]
    assert np.allclose(ds.sampler.weights, w / w.sum(), rtol=1e-12)
    assert ds.sampler.sizes.tolist() == [3000, 3000, 900, 100]  # tokens / tokens per example
    assert len(ds) == int(1e6 * w.sum()) == 7_060  # the token budget in examples
    recorded = MixtureDataset.from_plan({**tokens, "tokens_per_example": tpe})  # plan --out's
    assert list(itertools.islice(recorded, 200)) == list(itertools.islice(ds, 200))
    with pytest.raises(UserError, match="tokens_per_example: task 'b': expected a number > 0"):
        MixtureDataset.from_plan(tokens, tokens_per_example={**tpe, "b": 0})


def test_from_plan_bad_inputs(plan_json, tmp_path):
    with pytest.raises(UserError, match=r"nope.json: cannot read the plan"):
        MixtureDataset.from_plan(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match=r"bad.json: not JSON"):
        MixtureDataset.from_plan(tmp_path / "bad.json")
    with pytest.raises(UserError, match="not a plan file written by raretask plan"):
        MixtureDataset.from_plan({"unit": "examples"})
    bare = {**plan_json, "budget": None,
            "tasks": [{**t, "available": None} for t in plan_json["tasks"]]}
    with pytest.raises(UserError, match="task 'a' has no example count in the plan"):
        MixtureDataset.from_plan(bare, total=10)
    with pytest.raises(UserError, match="the plan has no budget; give total"):
        MixtureDataset.from_plan(bare, sources=[["x"] * 10] * 4)


def _edit_task(plan_json, i, **kw):
    return {**plan_json, "tasks": [{**t, **kw} if j == i else t
                                   for j, t in enumerate(plan_json["tasks"])]}


@pytest.mark.parametrize(("edit", "message"), [
    # a plan.json edited by hand (issue 22 review): each was read silently or crashed before
    (lambda p: _edit_task(p, 3, weight=float("nan")), "tasks.3.weight: expected a share from 0 "
     "to 1, got nan"),
    (lambda p: _edit_task(p, 3, weight=-0.1), "tasks.3.weight: expected a share from 0 to 1"),
    (lambda p: _edit_task(p, 3, weight="0.05"), "tasks.3.weight: expected a share from 0 to 1, "
     "got '0.05'"),
    (lambda p: {**p, "tasks": [{**t, "weight": t["weight"] / 2} for t in p["tasks"]]},
     "tasks.*.weight: the weights sum to 0.5, not 1"),
    (lambda p: {**p, "budget": float("inf")}, "budget: expected null or a number > 0 and <= "
     "9,007,199,254,740,992, got inf"),
    (lambda p: {**p, "budget": "1e6"}, "budget: expected null or a number > 0"),
    (lambda p: _edit_task(p, 0, available=float("nan")), "tasks.0.available: expected null or a "
     "number from 0 to 9,007,199,254,740,992, got nan"),
    (lambda p: _edit_task(p, 0, available=1e300), "tasks.0.available: expected null or a "
     "number"),
    (lambda p: _edit_task(p, 2, task="a"), "tasks.2.task: 'a' repeats tasks.0.task"),
    (lambda p: {**p, "unit": "words"}, "unit: expected 'examples' or 'tokens', got 'words'"),
    (lambda p: {**p, "tasks": []}, "tasks: expected at least one task"),
    (lambda p: {**p, "max_epochs": float("nan")}, "max_epochs: expected null or a number > 0"),
])
def test_from_plan_refuses_an_edited_plan_naming_the_field(plan_json, tmp_path, edit, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(edit(plan_json)))  # NaN and Infinity as Python's json writes
    with pytest.raises(UserError) as err:
        MixtureDataset.from_plan(path)
    assert str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("kw", "message"), [
    ({"total": float("nan")}, "total must be an integer from 0 to 9,007,199,254,740,992, got nan"),
    ({"total": True}, "total must be an integer from 0 to 9,007,199,254,740,992, got True"),
    ({"total": 10**30}, "total must be an integer from 0 to 9,007,199,254,740,992, got 10000"),
    ({"total": 10, "seed": "x"}, "seed must be an integer, got 'x'"),
])
def test_from_plan_refuses_a_bad_total_or_seed_in_one_line(plan_json, kw, message):
    with pytest.raises(UserError) as err:
        MixtureDataset.from_plan(plan_json, **kw)
    assert str(err.value).startswith(message)
    assert MixtureDataset.from_plan(plan_json, total=2.0**4).sampler.total == 16  # JSON floats


def hf_rows(dataset):
    for task, example in dataset:
        yield {"task": task, "example": example}


def test_hf_iterable_dataset_over_it_keeps_the_order(plan_json):
    datasets = pytest.importorskip("datasets")
    ds = MixtureDataset.from_plan(plan_json, total=500)
    hf = datasets.IterableDataset.from_generator(hf_rows, gen_kwargs={"dataset": ds})
    assert [(r["task"], r["example"]) for r in hf] == list(ds)
