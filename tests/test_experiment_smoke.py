"""Smoke run of experiments/toy_anystep.py with tiny budgets (< 20 s on 2 cores).

Checks the whole teacher → flow map → on-policy → consistency-baseline → evaluation path runs, that
every reported number is finite, that the table/JSON/plots have the promised shape, and two invariants
that a plumbing bug would break: the teacher's coupled error shrinks with N (harness sanity, issue 7),
and FMBS at N = 2 is exactly the explicit rollout (prefix = one step, no suffix).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "toy_anystep.py"


def _load():
    spec = importlib.util.spec_from_file_location("toy_anystep", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["toy_anystep"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    mod = _load()
    out = tmp_path_factory.mktemp("toy")
    argv = [
        "--out", str(out), "--seeds", "0", "1", "--teacher-steps", "60", "--flowmap-steps", "20",
        "--onpolicy-steps", "10", "--ref-steps", "32", "--n-eval", "64", "--n-heldout", "128",
        "--fmbs-batch", "32", "--fmbs-k-per-n", "2", "--width", "32", "--batch", "64",
    ]  # fmt: skip
    assert mod.main(argv) == 0
    return mod, out, json.loads((out / "results.json").read_text())


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def test_outputs_exist_and_are_finite(smoke):
    _, out, res = smoke
    for name in ("results.json", "results.md", "anystep_vs_nfe.png", "samples_seed0.png"):
        assert (out / name).stat().st_size > 0, name
    vals = list(_leaves(res["aggregate"]))
    assert len(vals) > 100 and all(math.isfinite(v) for v in vals)


def test_table_shape(smoke):
    _, out, res = smoke
    agg, nfe = res["aggregate"], [1, 2, 4, 8, 16, 32]
    assert len(res["per_seed"]) == 2
    assert set(agg["sampling"]) == {"teacher", "flowmap", "anyflow", "consistency"}
    for per_n in agg["sampling"].values():
        assert sorted(int(n) for n in per_n) == nfe
        for cell in per_n.values():
            assert set(cell) == {"coupled", "ed_data", "ed_ref"}
            assert set(cell["coupled"]) == {"mean", "std"} and cell["coupled"]["std"] >= 0
    assert set(agg["field"]) == {"init", "flowmap", "anyflow", "consistency"}
    assert set(agg["fmbs"]) == {"init", "flowmap", "anyflow"}
    md = (out / "results.md").read_text()
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| teacher")]
    assert len(table_rows) == 3  # coupled, ed_data, ed_ref tables
    assert all(ln.count("±") == len(nfe) for ln in table_rows)


def test_harness_invariants(smoke):
    _, _, res = smoke
    agg = res["aggregate"]
    teacher = [agg["sampling"]["teacher"][str(n)]["coupled"]["mean"] for n in (1, 4, 32)]
    assert teacher[0] > teacher[1] > teacher[2]  # Euler converges to its own 64-step reference
    # The student at init equals the teacher on r = t, so its unguided field error is exactly zero.
    assert agg["field"]["init"]["uncond_mse"]["mean"] == 0.0
    for name in ("init", "flowmap", "anyflow"):
        assert agg["fmbs"][name]["2"]["state_rel"]["mean"] < 1e-6
        assert agg["fmbs"][name]["2"]["final_rel"]["mean"] < 1e-6


def test_consistency_endpoint_boundary():
    _load()
    from toy_models import RingMixture, ToyFlowMapMLP, as_fn, consistency_endpoint, to_flowmap

    data = RingMixture()
    g = torch.Generator().manual_seed(0)
    x, c, _ = data.batch(16, g)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        student = to_flowmap(ToyFlowMapMLP(cond_dim=data.cond_dim, width=32))
    assert torch.equal(consistency_endpoint(as_fn(student), x, torch.zeros(16), c), x)
