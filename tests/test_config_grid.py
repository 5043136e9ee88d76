"""Experiment configs: list axes expand to grids, overrides, and one-line errors naming fields."""

import re
from pathlib import Path

import pytest

from raretask.config import ToyCell, load_experiment, parse_override
from raretask.errors import UserError
from raretask.studies.base import eval_steps
from raretask.studies.toy import plan_groups

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_list_fields_are_axes_in_field_order():
    grid = load_experiment(None, ["width=[8,16]", "beta=[1,2]", "seed=[0,1,2]", "steps=10"])
    cells = list(grid.cells())
    assert len(cells) == 12
    assert [(c.width, c.beta, c.seed) for c in cells[:4]] == [
        (8, 1, 0), (8, 1, 1), (8, 1, 2), (8, 2, 0)]
    assert all(c.steps == 10 for c in cells)


def test_defaults_follow_the_paper_and_are_recorded():
    cell = ToyCell()
    assert (cell.tasks, cell.alpha, cell.steps) == (32, 2.0, 100_000)
    resolved = load_experiment(None, ["width=[8,16]"]).resolved()
    assert resolved["width"] == [8, 16] and resolved["lr"] == 1e-3
    assert resolved["learned_threshold"] == 0.3


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    grid = load_experiment(CONFIGS / name)
    cells = list(grid.cells())
    assert cells
    if grid.kind == "toy":  # LM configs: tests/test_lm_configs.py
        assert all(c.width <= c.tasks * c.features for c in cells)


def test_paper_configs_have_the_paper_grids():
    fig2 = list(load_experiment(CONFIGS / "fig2_phase.yaml").cells())
    assert len(fig2) == 63 and {c.width for c in fig2} == {8, 16, 32, 64, 128, 256, 512}
    assert {c.beta for c in fig2} == {1.0, 1.5, 2.0} and {c.steps for c in fig2} == {100_000}
    fig4 = list(load_experiment(CONFIGS / "fig4_injection.yaml").cells())
    assert {32, 256} <= {c.width for c in fig4} and 1280 in {c.every for c in fig4}
    short = list(load_experiment(CONFIGS / "fig2_phase.yaml", ["steps=2000"]).cells())
    assert {c.steps for c in short} == {2000}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["wdth=8"], "--set wdth: unknown key"),
        (["width=-1"], "--set width: Input should be greater than or equal to 1, got -1"),
        (["beta=[]"], "--set beta: list is empty"),
        (["width=2000"], "--set width: 2000 exceeds the total feature count"),
        (["schedule=matched"], "--set schedule: renamed: use delivery (iid, even or burst; "
                               "'matched' is burst)"),
        (["delivery=even", "every=5"], "--set every: only a burst delivery has a period"),
        (["rate=1.5"], "--set rate: Input should be less than 1"),
        (["lr=0"], "--set lr: Input should be greater than 0"),
        (["kind=vision"], "--set kind: unknown experiment kind 'vision'"),
        (["profile.group_size=0"],
         "--set profile.group_size: Input should be greater than or equal to 1"),
        (["tf32=false"], "--set tf32: an execution setting, not part of the experiment: set "
                         "profile.tf32"),
        (["steps"], "--set 'steps': expected key=value"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(UserError) as err:
        load_experiment(None, overrides)
    assert str(err.value).startswith(message)


def test_an_error_names_where_the_value_came_from(tmp_path):
    """A bad value in the file names the file; one given with --set names --set."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("width: -1\nsteps: 10\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(cfg))}: width: Input should be"):
        load_experiment(cfg, ["steps=20"])
    with pytest.raises(UserError, match=r"^--set steps: Input should be a valid integer"):
        load_experiment(cfg, ["width=4", "steps=abc"])


def test_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: toy\nwidth: [8, 16\n")
    with pytest.raises(UserError, match=r"bad.yaml line \d+"):
        load_experiment(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_experiment(bad)


def test_override_values_are_yaml():
    assert parse_override("width=[8, 16]") == ("width", [8, 16])
    assert parse_override("lr=0.01") == ("lr", 0.01)
    # YAML 1.1 reads 1e-2 as a string; validation makes it a number in the resolved config
    assert load_experiment(None, ["lr=1e-2"]).resolved()["lr"] == 0.01
    assert parse_override("delivery=burst") == ("delivery", "burst")


def test_groups_pack_cells_of_the_same_shape():
    grid = load_experiment(None, ["width=[8,16,32]", "seed=[0,1]", "lr=[0.001,0.01]",
                                  "steps=10"])
    cells = list(grid.cells())
    groups = plan_groups(cells, 4)
    assert sorted(i for g in groups for i in g.cell_ids) == list(range(12))
    for g in groups:
        assert len(g.cell_ids) <= 4
        assert len({cells[i].lr for i in g.cell_ids}) == 1
    assert plan_groups(cells, 4) == groups  # a pure function of the config: resume-safe


def test_eval_steps_are_log_spaced_and_end_at_the_last_step():
    s = eval_steps(100_000, 30)
    assert s[0] == 1 and s[-1] == 100_000 and list(s) == sorted(set(s))
    assert 20 <= len(s) <= 31
    assert eval_steps(5, 30) == (1, 2, 3, 4, 5)


def test_the_fix_is_an_ordinary_grid_and_an_old_fix_config_says_how(capsys, tmp_path):
    """configs/fix_toy.yaml is a toy grid whose `arm` axis holds the fix's arms; a config of
    the old kind fix_toy gets one line saying what to write instead."""
    from raretask.cli import main

    grid = load_experiment(CONFIGS / "fix_toy.yaml")
    assert grid.kind == "toy" and grid.axes["arm"] == ["natural", "plan", "even", "burst", "big"]
    old = tmp_path / "old.yaml"
    old.write_text("kind: fix_toy\nwidth: 16\n")
    with pytest.raises(SystemExit) as exc:
        main(["run", str(old), "--out", "/nonexistent/never-written"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert "kind: 'fix_toy' configs are now toy grids: write kind: toy with an 'arm' axis" \
        in err[0]


# -- variants: one experiment as a union of products ---------------------------------------------
VARIANTS = {"kind": "lm", "name": "both", "size": ["tiny"], "seed": [0, 1], "steps": 4,
            "seq_len": 32, "vocab_size": 512,
            "variants": [{"task": "cmp", "rate": [0.0078125, 0.00390625]},
                         {"task": "add", "rate": 0.03125, "seq_len": 8,
                          "weight_decay": [1.0, 0.1]}]}


def test_variants_are_a_union_of_products_in_order():
    cells = list(load_experiment(None, base=VARIANTS).cells())
    assert [(c.task, c.rate, c.seq_len, c.weight_decay, c.seed) for c in cells] == [
        ("cmp", 0.0078125, 32, 0.1, 0), ("cmp", 0.00390625, 32, 0.1, 0),
        ("cmp", 0.0078125, 32, 0.1, 1), ("cmp", 0.00390625, 32, 0.1, 1),
        # a variant's field over the top one (seq_len); its own axis last (weight decay fastest)
        ("add", 0.03125, 8, 1.0, 0), ("add", 0.03125, 8, 0.1, 0),
        ("add", 0.03125, 8, 1.0, 1), ("add", 0.03125, 8, 0.1, 1)]
    assert all(c.steps == 4 for c in cells)


def test_variants_resolve_to_a_config_that_numbers_the_cells_alike():
    grid = load_experiment(None, base=VARIANTS)
    resolved = grid.resolved()
    # what every variant shares sits at the top; the rest, each axis included, per variant
    assert resolved["steps"] == 4 and resolved["vocab_size"] == 512 and "task" not in resolved
    assert [v["task"] for v in resolved["variants"]] == ["cmp", "add"]
    assert resolved["variants"][1]["weight_decay"] == [1.0, 0.1]
    again = load_experiment(None, base=resolved)
    assert [c.model_dump() for c in again.cells()] == [c.model_dump() for c in grid.cells()]
    assert again.resolved() == resolved


def test_set_reaches_into_the_variants_and_wins():
    grid = load_experiment(None, ["seq_len=16", "steps=2"], base=VARIANTS)
    assert {(c.seq_len, c.steps) for c in grid.cells()} == {(16, 2)}
    assert VARIANTS["variants"][1]["seq_len"] == 8  # the caller's mapping is left alone


@pytest.mark.parametrize(("variants", "message"), [
    ([], "config: variants: expected a non-empty list of mappings"),
    ("cmp", "config: variants: expected a non-empty list of mappings"),
    ([{"task": "cmp"}, 3], "config: variants[1]: expected a mapping of cell fields"),
    ([{"task": "cmp", "kind": "toy"}], "config: variants[0]: kind: set it at the top"),
    ([{"task": "cmp", "profile": {}}], "config: variants[0]: profile: set it at the top"),
    ([{"task": "cmp", "variants": []}], "config: variants[0]: variants: set it at the top"),
    ([{"task": "cmp"}, {"taks": "add"}], "config: variants[1]: taks: unknown key"),
    ([{"task": "cmp"}, {"frequency": 0.1}], "config: variants[1]: frequency: renamed: use rate"),
    ([{"task": "cmp"}, {"task": "add", "rate": -1}], "config: variants[1]: rate: "),
])
def test_variant_errors_name_the_variant_and_field(variants, message):
    base = {"kind": "lm", "size": "tiny", "rate": 0.005, "seed": [0, 1], "steps": 4,
            "variants": variants}
    with pytest.raises(UserError) as err:
        load_experiment(None, base=base)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_an_unknown_top_key_beside_variants_is_named_at_the_top():
    with pytest.raises(UserError, match=r"^config: lrr: unknown key$"):
        load_experiment(None, base={**VARIANTS, "lrr": 0.1})


def test_a_bad_top_value_is_named_at_the_top_with_the_variant_it_breaks():
    base = {"kind": "lm", "size": "tiny", "rate": 0.01, "steps": 4,
            "variants": [{"task": "cmp", "seq_len": 64}, {"task": "add", "seq_len": 128}]}
    with pytest.raises(UserError) as err:
        load_experiment(None, base=base)
    text = str(err.value)
    assert text.startswith("config: rate: 0.01 per token needs more than one instance per "
                           "sequence of 128 tokens") and text.endswith("(with variants[1])")


def test_a_setting_two_variants_make_is_one_cell_where_it_first_appears():
    """A union of sets: ``--set size=tiny`` on a config whose last variant is one big size's
    extra cell folds it into the others, as a CPU check of fig5_lm_scale.yaml does."""
    base = {"kind": "lm", "size": "tiny", "rate": 0.005, "steps": 4,
            "variants": [{"task": "cmp", "seed": [0, 1]}, {"task": "cmp", "seed": [1, 2]}]}
    cells = list(load_experiment(None, base=base).cells())
    assert [c.seed for c in cells] == [0, 1, 2]
    grid = load_experiment(CONFIGS / "fig5_lm_scale.yaml", ["size=tiny", "seed=0"])
    assert [(c.task, c.rate) for c in grid.cells()][5:] == [
        ("add", r) for r in (0.03125, 0.015625, 0.0078125, 0.00390625, 0.001953125)]
