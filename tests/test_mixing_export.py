"""Exports in the unit each loader reads, loaded by the loaders themselves: OLMo-core builds the
source mixture (ai2-olmo-core), Megatron parses --data-path and builds its blending indices
(megatron-core), datasets interleaves (datasets). Mosaic streaming does not install beside this
project's numpy/transformers, so its derivation of rows per stream is copied from
mosaicml-streaming 0.13.0 (checked once against the real library; docs/mixing.md says how)."""

import dataclasses
import json
import math
from collections import Counter

import numpy as np
import pytest
import yaml

from raretask.errors import UserError
from raretask.mixing.export import (
    FORMATS,
    Unconvertible,
    _streaming_proportions,
    convert,
    render,
    render_all,
    write_all,
)
from raretask.mixing.plan import make_plan
from raretask.mixing.thresholds import CalibratedThreshold

NAMES = ["web", "books", "code", "medical"]
COUNTS = [600, 100, 250, 30]  # examples
TPE = {"web": 200.0, "books": 2000.0, "code": 400.0, "medical": 50.0}  # tokens per example
# the plan lifts medical to 5% of examples; in tokens that is 2.5 / 422.5 of the mix
TOKEN_SHARES = {"web": 120 / 422.5, "books": 200 / 422.5, "code": 100 / 422.5,
                "medical": 2.5 / 422.5}
L = 32  # tokens per sequence in these tests


def plan_in_examples(**kw):
    thr = CalibratedThreshold(math.log10(0.05), 0.0)  # every target needs a 5% share
    return make_plan(NAMES, COUNTS, thr, 1.0, targets=["medical"], margin=1.0,
                     available=COUNTS, **kw)


def plan_in_tokens(**kw):
    tokens = [c * TPE[n] for n, c in zip(NAMES, COUNTS, strict=True)]
    thr = CalibratedThreshold(math.log10(0.02), 0.0)
    return make_plan(NAMES, tokens, thr, 1.0, targets=["medical"], margin=1.0,
                     available=tokens, unit="tokens", **kw)


def test_an_examples_plan_reaches_token_loaders_as_token_shares():
    plan = plan_in_examples()
    assert plan.weights()["medical"] == pytest.approx(0.05, abs=1e-15)
    shares, budget = convert(plan, "tokens", TPE)
    assert shares == pytest.approx(TOKEN_SHARES, abs=1e-15)
    assert budget == pytest.approx(980 * 422.5, rel=1e-15)  # 414,050 tokens
    olmo = yaml.safe_load(render(plan, "olmo_core.yaml", "/d/{task}", TPE, sequence_length=L))
    src = olmo["source_mixture_config"]["source_list"]["sources"]
    assert {s["source_name"]: s["target_ratio"] for s in src} == \
        pytest.approx(TOKEN_SHARES, abs=1e-12)
    parts = render(plan, "megatron.txt", "/d/{task}", TPE).split()
    assert dict(zip(parts[1::2], map(float, parts[::2]), strict=True)) == \
        pytest.approx({f"/d/{k}": v for k, v in TOKEN_SHARES.items()}, abs=1e-12)
    mosaic = yaml.safe_load(render(plan, "mosaicml.yaml", "/d/{task}", TPE, sequence_length=L))
    assert mosaic["epoch_size"] == 12940  # ceil(414,050 / 32)
    assert {k: v["proportion"] for k, v in mosaic["streams"].items()} == \
        pytest.approx(TOKEN_SHARES, abs=1 / 12940)
    weights = json.loads(render(plan, "weights.json", tokens_per_example=TPE))
    assert weights["unit"] == "examples" and weights["token_weights"] == \
        pytest.approx(TOKEN_SHARES, abs=1e-12)


@pytest.mark.parametrize("fmt", ["olmo_core.yaml", "megatron.txt", "mosaicml.yaml"])
def test_token_loaders_refuse_an_examples_plan_without_tokens_per_example(fmt):
    plan = plan_in_examples()
    with pytest.raises(Unconvertible) as err:
        render(plan, fmt)
    msg = str(err.value)
    assert msg.startswith(f"{fmt}: ") and "\n" not in msg and "plan is in examples" in msg
    with pytest.raises(Unconvertible):  # one task without its tokens per example is enough
        render(plan, fmt, tokens_per_example={k: v for k, v in TPE.items() if k != "code"})


def test_render_all_skips_what_it_cannot_convert_and_names_why(tmp_path):
    plan = plan_in_examples()
    texts, skipped = render_all(plan)
    assert sorted(texts) == ["interleave.json", "weights.json", "weights.yaml"]
    assert sorted(skipped) == ["megatron.txt", "mosaicml.yaml", "olmo_core.yaml"]
    written = write_all(plan, tmp_path, tokens_per_example=TPE, sequence_length=L)
    assert sorted(p.name for p in written) == sorted(FORMATS)
    with pytest.raises(UserError, match="--path-template"):  # not a unit problem: raises
        render_all(plan, "/d/x", TPE)


def test_a_token_plan_reaches_interleave_as_example_probabilities():
    plan = plan_in_tokens()
    w = plan.weights()
    inter = json.loads(render(plan, "interleave.json", tokens_per_example=TPE))
    mass = sum(w[k] / TPE[k] for k in NAMES)
    assert dict(zip(inter["datasets"], inter["probabilities"], strict=True)) == \
        pytest.approx({k: w[k] / TPE[k] / mass for k in NAMES}, abs=1e-12)
    assert inter["take"] == round(plan.budget * mass)
    with pytest.raises(Unconvertible, match=r"^interleave.json: .* plan is in tokens"):
        render(plan, "interleave.json")


# -- OLMo-core ---------------------------------------------------------------------------------


def _token_files(tmp_path, names=NAMES):
    """One raw uint16 token file per source, as OLMo-core's numpy datasets read them."""
    for n, c in zip(names, COUNTS, strict=True):
        np.zeros(int(c * TPE[n]), np.uint16).tofile(tmp_path / f"{n}.npy")
    return str(tmp_path / "{task}.npy")


def _olmo_build(text):
    from olmo_core.data.source_mixture import SourceMixtureDatasetConfig

    cfg = yaml.safe_load(text)["source_mixture_config"]
    mix = SourceMixtureDatasetConfig.from_dict({**cfg, "render_tables": False, "quiet": True})
    built = mix.build(npdtype=np.uint16, sequence_length=L)
    tokens = {o.name: sum(p.tokens for p in o.path_tokens) for o in built.sources}
    return tokens, sum(tokens.values())


@pytest.mark.parametrize(("kw", "ratios", "fractions"), [
    ({"max_epochs": 10.0}, [10.0] * 4, {}),  # the cap, as asked
    # twice the data, uncapped: the epochs the budget needs, rounded up at 1e-4, not 1.0
    ({"budget": 1960}, [1.9602, 1.9602, 1.9602, 3.267], {}),
    # a cap below one epoch that binds: a fraction of the source (the batch rounding's hair more)
    ({"max_epochs_for": {"books": 0.5}}, [1.0366, 1.0, 1.0366, 1.6335], {"books": 0.5001}),
])
def test_olmo_core_builds_the_planned_token_mix(tmp_path, kw, ratios, fractions):
    plan = plan_in_examples(**kw)
    shares, _ = convert(plan, "tokens", TPE)
    text = render(plan, "olmo_core.yaml", _token_files(tmp_path), TPE, sequence_length=L,
                  global_batch_size=8 * L)
    cfg = yaml.safe_load(text)["source_mixture_config"]
    sources = cfg["source_list"]["sources"]
    assert cfg["global_batch_size"] == 256 and cfg["requested_tokens"] % 256 == 0
    assert [s["max_repetition_ratio"] for s in sources] == ratios
    assert {s["source_name"]: s["max_source_fraction"] for s in sources
            if "max_source_fraction" in s} == fractions
    tokens, total = _olmo_build(text)
    assert total == cfg["requested_tokens"]
    assert {k: v / total for k, v in tokens.items()} == pytest.approx(shares, abs=1e-3)


def test_olmo_core_refuses_what_the_old_export_wrote(tmp_path):
    """The library's check is live: the repetition ratio 1.0 the old export wrote for an
    uncapped plan fails OLMo-core's build."""
    from olmo_core.exceptions import OLMoConfigurationError

    plan = plan_in_examples(budget=1960)
    obj = yaml.safe_load(render(plan, "olmo_core.yaml", _token_files(tmp_path), TPE,
                                sequence_length=L))
    for s in obj["source_mixture_config"]["source_list"]["sources"]:
        s["max_repetition_ratio"] = 1.0
    with pytest.raises(OLMoConfigurationError, match="Insufficient tokens"):
        _olmo_build(yaml.safe_dump(obj))


def test_olmo_core_dataset_config_reads_the_wrapper(tmp_path):
    from olmo_core.data import NumpyFSLDatasetConfig
    from olmo_core.data.numpy_dataset import NumpyFSLDatasetMixture

    plan = plan_in_examples()
    obj = yaml.safe_load(render(plan, "olmo_core.yaml", _token_files(tmp_path), TPE,
                                sequence_length=L))
    obj["source_mixture_config"].update(render_tables=False, quiet=True)
    cfg = NumpyFSLDatasetConfig.from_dict({
        **obj, "sequence_length": L, "work_dir": str(tmp_path / "work"),
        "tokenizer": {"vocab_size": 100, "eos_token_id": 0, "pad_token_id": 1}})
    assert isinstance(cfg.build(), NumpyFSLDatasetMixture)


# -- Megatron ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # no TE/Apex
def test_megatron_parses_the_line_and_blends_the_token_shares():
    from megatron.core.datasets.helpers_cpp import build_blending_indices
    from megatron.core.datasets.utils import get_blend_from_list, normalize

    thr = CalibratedThreshold(math.log10(0.05), 0.0)
    names, counts = [*NAMES, "empty"], [*COUNTS, 0]  # a task with no data: weight 0
    plan = make_plan(names, counts, thr, 1.0, targets=["medical"], margin=1.0, available=counts)
    assert plan.weights()["empty"] == 0
    line = render(plan, "megatron.txt", "/data/{task}_text_document", {**TPE, "empty": 1.0})
    prefixes, weights = get_blend_from_list(line.split())  # argparse nargs="*" after the shell
    assert prefixes == [f"/data/{n}_text_document" for n in NAMES]  # the zero weight dropped
    weights = normalize(weights)
    assert all(w > 0 for w in weights)  # BlendedDataset's assertion
    assert weights == pytest.approx([TOKEN_SHARES[n] for n in NAMES], abs=1e-11)
    size = 100_000
    index, sample = np.zeros(size, np.int16), np.zeros(size, np.int64)
    build_blending_indices(index, sample, np.array(weights), len(weights), size, False)
    got = np.bincount(index, minlength=len(weights))
    assert np.all(np.abs(got - size * np.array(weights)) <= 1)  # 28402 47337 23669 592


@pytest.mark.parametrize(("template", "rename", "why"), [
    ("/data dir/{task}", None, "holds whitespace"),
    ("/data/{task}", "web text", "holds whitespace"),
    ("/data/{task}\t", None, "holds whitespace"),
    ("{task}", "-web", "starts with '-'"),
    ("{task}", "", "is empty"),
])
def test_megatron_refuses_unsafe_prefixes(template, rename, why):
    plan = plan_in_examples()
    if rename is not None:
        tasks = (dataclasses.replace(plan.tasks[0], task=rename), *plan.tasks[1:])
        plan = dataclasses.replace(plan, tasks=tasks)
        tpe = {rename: 200.0, **{k: v for k, v in TPE.items() if k != "web"}}
    else:
        tpe = TPE
    with pytest.raises(UserError) as err:
        render(plan, "megatron.txt", template, tpe)
    msg = str(err.value)
    assert msg.startswith("megatron.txt: task ") and why in msg and "\n" not in msg


def test_a_task_name_megatron_cannot_read_leaves_only_megatron_out(tmp_path, capsys):
    """A data's own task name with a space refused the whole plan --out (plan.json and five
    loadable exports) before; now megatron.txt alone is left out, said in one line; a template
    with a space is still the user's to fix and refuses everything (issue 22 review)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"task": t, "text": "w w w"}) + "\n"
                            for t in ["web text"] * 9 + ["rare"]))
    _cli(capsys, "analyze", str(data), "--task-field", "task", "--out", str(tmp_path / "an"))
    out = tmp_path / "plan"
    text = _cli(capsys, "plan", str(tmp_path / "an"), "--size", "16", "--unit", "tokens",
                "--path-template", "/d/{task}", "--out", str(out))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        {"plan.json", *FORMATS} - {"megatron.txt"})
    why = ("megatron.txt: task 'web text': the data prefix '/d/web text' holds whitespace "
           "(Megatron splits on it); rename the task (Megatron's line has no quoting)")
    assert json.loads((out / "plan.json").read_text())["exports_skipped"] == {"megatron.txt": why}
    assert "not written: megatron.txt: task 'web text'" in " ".join(text.split())
    olmo = yaml.safe_load((out / "olmo_core.yaml").read_text())["source_mixture_config"]
    assert [s["paths"] for s in olmo["source_list"]["sources"]] == [["/d/web text"], ["/d/rare"]]
    with pytest.raises(SystemExit) as exc:
        from raretask.cli import main
        main(["plan", str(tmp_path / "an"), "--size", "16", "--unit", "tokens",
              "--path-template", "/my data/{task}", "--out", str(tmp_path / "p2")])
    assert exc.value.code == 2 and not (tmp_path / "p2").exists()
    assert capsys.readouterr().err.startswith("error: megatron.txt: task 'web text': the data "
                                              "prefix '/my data/web text' holds whitespace")


# -- Mosaic streaming --------------------------------------------------------------------------


def streaming_rows_per_stream(proportions, epoch_size, seed=0):
    """mosaicml-streaming 0.13.0, ``Stream.apply_weights``, relative branch (copied): each
    stream's rows per epoch, and how many rows were handed out at random."""
    p = np.array(proportions, np.float64)
    p /= p.sum()
    choose = (epoch_size * p).astype(np.int64)
    shortfall = epoch_size - choose.sum()
    rng = np.random.default_rng(seed)
    choose[rng.choice(len(p), shortfall, False)] += 1
    return choose, int(shortfall)


@pytest.mark.parametrize("budget", [None, 1960])
def test_mosaic_streams_give_the_planned_rows_per_epoch(budget):
    plan = plan_in_examples(budget=budget, max_epochs=10)
    cfg = yaml.safe_load(render(plan, "mosaicml.yaml", "/d/{task}", TPE, sequence_length=L))
    assert set(cfg) == {"epoch_size", "streams"}
    assert all(set(s) == {"local", "proportion"} for s in cfg["streams"].values())
    props = [s["proportion"] for s in cfg["streams"].values()]
    assert sum(props) == pytest.approx(1, abs=1e-12)
    rows, shortfall = streaming_rows_per_stream(props, cfg["epoch_size"])
    assert shortfall == 0  # nothing left to chance
    want = {None: [3675, 6125, 3063, 77], 1960: [7350, 12251, 6125, 153]}[budget]
    assert rows.tolist() == want  # what streaming 0.13.0 itself yields (see module docstring)
    assert np.all(np.abs(rows - cfg["epoch_size"] * np.array(list(TOKEN_SHARES.values()))) < 1)


def test_streaming_proportions_reproduce_any_counts():
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(2, 40))
        counts = rng.integers(0, 10 ** int(rng.integers(1, 9)), size=k).tolist()
        counts[0] += 1
        rows, shortfall = streaming_rows_per_stream(_streaming_proportions(counts), sum(counts))
        assert shortfall == 0 and rows.tolist() == counts


# -- Hugging Face datasets ---------------------------------------------------------------------


def test_interleave_takes_the_budget_in_planned_rows():
    from datasets import Dataset, interleave_datasets

    plan = plan_in_tokens(budget=2 * sum(c * TPE[n] for n, c in zip(NAMES, COUNTS, strict=True)))
    cfg = json.loads(render(plan, "interleave.json", tokens_per_example=TPE))
    assert cfg["take"] == 2206 and cfg["stopping_strategy"] == "first_exhausted"
    small = {n: Dataset.from_dict({"task": [n] * c}) for n, c in zip(NAMES, COUNTS, strict=True)}
    parts = [small[n].to_iterable_dataset().repeat(None) for n in cfg["datasets"]]
    mixed = interleave_datasets(parts, probabilities=cfg["probabilities"], seed=cfg["seed"],
                                stopping_strategy=cfg["stopping_strategy"]).take(cfg["take"])
    got = Counter(row["task"] for row in mixed)
    assert sum(got.values()) == cfg["take"]
    for n, p in zip(cfg["datasets"], cfg["probabilities"], strict=True):
        sd = math.sqrt(cfg["take"] * p * (1 - p))
        assert abs(got[n] - cfg["take"] * p) <= 4 * sd, (n, got[n], cfg["take"] * p)
    # what the old export relied on: all_exhausted stops when the last task first runs out
    old = interleave_datasets(list(small.values()), probabilities=cfg["probabilities"], seed=0,
                              stopping_strategy="all_exhausted")
    assert len(old) < 0.75 * cfg["take"]


# -- end to end: analyze -> plan -> every export -----------------------------------------------


def _cli(capsys, *args):
    from raretask.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err
    return out.out


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("unit", ["tokens", "examples"])
def test_analyze_plan_export_loads_in_each_library(tmp_path, capsys, unit):
    from megatron.core.datasets.utils import get_blend_from_list, normalize

    rows = [{"domain": n, "ntok": int(TPE[n]), "text": "x"}
            for n, c in zip(NAMES, COUNTS, strict=True) for _ in range(c)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _cli(capsys, "analyze", str(data), "--task-field", "domain", "--tokens-field", "ntok",
         "--out", str(tmp_path / "a"))
    template = _token_files(tmp_path)
    _cli(capsys, "plan", str(tmp_path / "a"), "--size", "16", "--target", "medical", "--unit",
         unit, "--max-epochs", "10", "--out", str(tmp_path / "p"), "--path-template", template,
         "--sequence-length", str(L))
    out = tmp_path / "p"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["unit"] == unit and plan["exports_skipped"] == {}
    weights = json.loads((out / "weights.json").read_text())
    tok = weights["weights"] if unit == "tokens" else weights["token_weights"]
    if unit == "tokens":  # lifted well above its natural token share
        assert tok["medical"] > 3 * 1500 / 421500
    tokens, total = _olmo_build((out / "olmo_core.yaml").read_text())
    assert {k: v / total for k, v in tokens.items()} == pytest.approx(tok, abs=1e-3)
    prefixes, w = get_blend_from_list((out / "megatron.txt").read_text().split())
    assert dict(zip(prefixes, normalize(w), strict=True)) == \
        pytest.approx({template.format(task=n): tok[n] for n in NAMES}, abs=1e-11)
    mosaic = yaml.safe_load((out / "mosaicml.yaml").read_text())
    rows_, shortfall = streaming_rows_per_stream(
        [s["proportion"] for s in mosaic["streams"].values()], mosaic["epoch_size"])
    assert shortfall == 0 and np.all(np.abs(rows_ / mosaic["epoch_size"] -
                                            np.array([tok[n] for n in mosaic["streams"]])) < 1e-3)
    inter = json.loads((out / "interleave.json").read_text())
    ex = weights["weights"] if unit == "examples" else weights["example_weights"]
    assert inter["probabilities"] == pytest.approx([ex[n] for n in inter["datasets"]], abs=1e-11)
