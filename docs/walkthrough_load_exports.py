"""docs/mixing.md's walk-through: the plan's exports loaded by the tools that read them, and the
sampler. Run in the walk-through's directory (man.jsonl, plan_tok/): python THIS_FILE ."""
import importlib.metadata
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

walk = Path(sys.argv[1])
pages = [json.loads(line) for line in
         (walk / "man.jsonl").read_text(encoding="utf-8").splitlines()]
by = {}
for p in pages:
    by.setdefault(p["section"], []).append(p)

# token files as OLMo-core and Megatron read them: one uint16 id per whitespace word
tok = walk / "tok"
tok.mkdir(exist_ok=True)
vocab = {}
for sec, rows in by.items():
    ids = [vocab.setdefault(w, len(vocab) % 65000) for r in rows for w in r["text"].split()]
    np.asarray(ids, np.uint16).tofile(tok / f"{sec}.npy")

plan_dir = walk / "plan_tok"
olmo = yaml.safe_load((plan_dir / "olmo_core.yaml").read_text())
from olmo_core.data.source_mixture import SourceMixtureDatasetConfig  # noqa: E402

cfg = olmo["source_mixture_config"]
mix = SourceMixtureDatasetConfig.from_dict({**cfg, "render_tables": False, "quiet": True})
built = mix.build(npdtype=np.uint16, sequence_length=512)
got = {o.name: sum(p.tokens for p in o.path_tokens) for o in built.sources}
total = sum(got.values())
planned = {s["source_name"]: s["target_ratio"] for s in cfg["source_list"]["sources"]}
version = importlib.metadata.version("ai2-olmo-core")
print(f"OLMo-core {version}: built {total:,} tokens (requested {cfg['requested_tokens']:,})")
for name in planned:
    print(f"  {name:5s} planned {planned[name]:.5f}  built {got[name] / total:.5f}")

from megatron.core.datasets.utils import get_blend_from_list  # noqa: E402

prefixes, weights = get_blend_from_list((plan_dir / "megatron.txt").read_text().split())
print("Megatron get_blend_from_list:", len(prefixes), "prefixes, weights sum",
      f"{sum(weights):.12f}", "all > 0:", all(w > 0 for w in weights))

from raretask.mixing.sampler import MixtureDataset  # noqa: E402

plan = json.loads((plan_dir / "plan.json").read_text())
ds = MixtureDataset.from_plan(plan, sources={k: v for k, v in by.items()})
items = list(ds)
counts = Counter(x["section"] for x in items)
print(f"MixtureDataset.from_plan: {len(items):,} examples per epoch;",
      ", ".join(f"{k} {counts[k]:,}" for k in sorted(counts)))
pos = [i for i, x in enumerate(items) if x["section"] == "man4"]
gaps = np.diff(pos)
print(f"  man4: {len(pos)} draws of {len(by['man4'])} pages, gap {gaps.min()}..{gaps.max()} "
      f"(1/share = {len(items) / len(pos):.1f})")
state = None
it = iter(ds)
for k, _ in enumerate(it):
    if k == 9_999:
        state = ds.state_dict()
        break
resumed = MixtureDataset.from_plan(plan, sources={k: v for k, v in by.items()})
resumed.load_state_dict(state)
print("  state_dict after 10,000 items -> resumed continues with item 10,001:",
      next(iter(resumed))["page"] == items[10_000]["page"])

import datasets  # noqa: E402

inter = json.loads((plan_dir / "interleave.json").read_text())
parts = [datasets.Dataset.from_list(by[t]).to_iterable_dataset().repeat(None)
         for t in inter["datasets"]]
mixed = datasets.interleave_datasets(parts, probabilities=inter["probabilities"],
                                     seed=inter["seed"],
                                     stopping_strategy=inter["stopping_strategy"])
rows = list(mixed.take(inter["take"]))
c = Counter(r["section"] for r in rows)
print(f"datasets {datasets.__version__} interleave_datasets(...).take({inter['take']:,}): "
      f"{len(rows):,} rows;", ", ".join(f"{k} {c[k]:,}" for k in sorted(c)))
pos = [i for i, r in enumerate(rows) if r["section"] == "man4"]
print(f"  man4: {len(pos)} rows, gap {np.diff(pos).min()}..{np.diff(pos).max()} (iid draws)")
