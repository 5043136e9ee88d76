"""`raretask scaling` end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CSV = Path(__file__).resolve().parents[1] / "examples" / "scaling_synthetic.csv"


def run(*args):
    return subprocess.run([sys.executable, "-m", "raretask", "scaling", *args],
                          capture_output=True, text=True, timeout=120)


def test_json_fit_and_classification():
    res = run(str(CSV), "--sizes", "20e6,300e6,1e9", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["fit"]["a"] == pytest.approx(0.46, abs=0.03)
    assert out["fit"]["b"] == pytest.approx(0.51, abs=0.06)
    a, b = out["fit"]["a"], out["fit"]["b"]
    assert out["exponents"]["compute"] == pytest.approx(a * b / (a + b))
    ratio = out["max_data_scalable_ratio"]
    assert ratio == pytest.approx((1 + a / b) ** (1 / a))
    assert len(out["pairs"]) == 3
    for p in out["pairs"]:
        assert p["verdict"] == ("data" if p["large"] / p["small"] < ratio else "model")
        assert p["gap_compute_optimal"] > 0


def test_bad_sizes_and_bad_file(tmp_path):
    res = run(str(CSV), "--sizes", "1e6,abc")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip() == "error: --sizes: 'abc' is not a number"
    bad = tmp_path / "d.csv"
    bad.write_text("params,tokens,loss\n1e6,1e9,-3\n")
    res = run(str(bad))
    assert res.returncode == 2 and res.stdout == ""
    assert "line 2" in res.stderr and "loss" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
