"""Smoke run of experiments/fair_anystep.py (issue 17) with tiny budgets: every arm runs, the numbers are
finite, CD gets the same network calls as AnyFlow (within one CD step), and the outputs are written."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "fair_anystep.py"


def _load():
    spec = importlib.util.spec_from_file_location("fair_anystep", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fair_anystep"] = mod
    spec.loader.exec_module(mod)
    return mod


# ≈ 6–9 s on the shared 2-core box

def _config_of_main(mod, monkeypatch: pytest.MonkeyPatch, argv: list[str]):
    """The config ``mod.main(argv)`` hands its first seed's run (which is stopped there)."""
    seen = []

    class Stop(Exception):
        pass

    def fake_run_seed(seed, fc):
        seen.append(fc)
        raise Stop

    monkeypatch.setattr(mod, "run_seed", fake_run_seed)
    with pytest.raises(Stop):
        mod.main(argv)
    return seen[0]

def test_fair_anystep_smoke(tmp_path: Path) -> None:
    mod = _load()
    args = [
        "--out",
        str(tmp_path),
        "--floor",
        "",
        "--seeds",
        "0",
        "--teacher-steps",
        "20",
        "--flowmap-steps",
        "12",
    ]
    args += [
        "--onpolicy-steps",
        "4",
        "--curve-every",
        "6",
        "--n-eval",
        "32",
        "--ref-steps",
        "20",
        "--width",
        "16",
        "--n-heldout",
        "64",
    ]
    args += ["--sched-g1", "cosine", "--heldout-loss-n", "64"]  # the lr-schedule mode runs too
    assert mod.main([*args, "--batch", "16"]) == 0
    res = json.loads((tmp_path / "fair_results.json").read_text())
    (seed,) = res["per_seed"]
    names = set(seed["rows"])
    for arm in ("released", "meanflow"):
        assert {f"AnyFlow stage 1, {arm} target", f"AnyFlow stage 1 + 2, {arm} target"} <= names
    assert {"AnyFlow stage 1, g = 1", "CD, unguided teacher", "CD, CFG-3 teacher"} <= names
    for row in seed["rows"].values():
        assert all(math.isfinite(v) for v in row["coupled"].values())
    for arm, calls in seed["calls"].items():
        per_step = mod.CALLS["cd_g"] if arm == "guided" else mod.CALLS["cd_1"]
        assert 0 <= calls["anyflow"] - calls["cd"] < per_step
    assert [p[0] for p in seed["curves"]["stage 1, meanflow"]] == [1, 6, 12]
    assert all(len(p) == 4 and math.isfinite(p[3]) for p in seed["curves"]["stage 1, g = 1"])  # held-out loss
    for row in seed["rows"].values():
        assert all(math.isfinite(v) for v in row["dist"].values())
    assert {"CD, unguided", "CD, CFG 3"} <= set(seed["curves"])
    assert (tmp_path / "fair_results.md").read_text().count("| AnyFlow stage 1") == 10  # two tables
    assert (tmp_path / "fair_anystep.png").stat().st_size > 0


# ~3 s: the seed-0 learning-rate search picks by training loss (stage 1) and distance to data (CD), never
# computes the exact reference, and its choice is what a --selection run trains with.
def test_fair_anystep_select_smoke(tmp_path: Path, monkeypatch) -> None:
    mod = _load()
    small = ["--seeds", "0", "--teacher-steps", "10", "--flowmap-steps", "6", "--curve-every", "3"]
    small += [
        "--n-eval",
        "16",
        "--n-heldout",
        "32",
        "--width",
        "8",
        "--batch",
        "8",
        "--grid-lrs",
        "1e-4",
        "1e-2",
    ]

    def no_reference(*a, **k):
        raise AssertionError("the selection must not compute the exact reference")

    monkeypatch.setattr(mod, "exact_reference", no_reference)
    assert mod.main(["--select", "--out", str(tmp_path / "sel"), *small]) == 0
    sel = json.loads((tmp_path / "sel" / "selection.json").read_text())
    for field, rows in sel["grid"].items():
        assert [r["lr"] for r in rows] == [1e-4, 1e-2]
        if field.startswith("lr_"):
            best = min(rows, key=lambda r: r["train_loss"])
        else:
            best = min(rows, key=lambda r: r["dist"]["1"])
        assert sel["chosen"][field] == best["lr"]
    monkeypatch.undo()
    fc = _config_of_main(mod, monkeypatch, ["--selection", str(tmp_path / "sel" / "selection.json"),
                                            "--out", str(tmp_path), *small])
    assert {f: getattr(fc, f) for f in mod.LR_FIELDS} == sel["chosen"]
    assert mod.main(["--selection", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2


def test_fair_anystep_merge(tmp_path: Path) -> None:
    """--merge combines single-seed report folders (mean ± std over seeds) and refuses mixed configs."""
    mod = _load()
    rows = {"m": {"g": 1.0, "calls_per_step": 1, "coupled": {"1": 1.0}, "dist": {"1": 0.5}}}
    fc = mod.FairConfig(nfe=(1,))
    for seed, val in ((1, 1.0), (2, 3.0)):
        rec = {
            "seed": seed,
            "rows": {"m": {**rows["m"], "coupled": {"1": val}}},
            "curves": {"c": [[1, val, 0.5]]},
            "train_loss": {"c": val},
            "calls": {},
            "timings_s": {"x": 1.0},
            "floors": {f"exact CFG-{g} ODE samples vs held-out data": 0.0 for g in (1, 3)},
        }
        cfg = mod.dataclasses.asdict(mod.dataclasses.replace(fc, seeds=(seed,)))
        d = tmp_path / f"s{seed}"
        d.mkdir()
        run = {"config": cfg, "command": "c", "floor": None, "per_seed": [rec], "wall_s": 1.0}
        (d / "fair_results.json").write_text(json.dumps(run))
    assert (
        mod.main(["--merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m")]) == 0
    )
    md = (tmp_path / "m" / "fair_results.md").read_text()
    assert "| m | CFG 1 | 2 ± 1.4 |" in md  # mean 2, sample std √2
    assert json.loads((tmp_path / "m" / "fair_results.json").read_text())["config"]["seeds"] == [1, 2]
    other = json.loads((tmp_path / "s2" / "fair_results.json").read_text())
    other["config"]["batch"] = 7
    (tmp_path / "s2" / "fair_results.json").write_text(json.dumps(other))
    assert (
        mod.main(["--merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m")]) == 2
    )


def test_fair_anystep_flatness_and_schedule() -> None:
    """The convergence criterion reads the last 25 % of the steps; an unknown schedule is refused."""
    mod = _load()
    curve = [[1, 9.0, 9.0], [500, 2.0, 1.0], [750, 1.0, 1.0], [1000, 0.9, 1.0]]
    assert mod.flatness(curve, 1) == pytest.approx(0.1)  # (1.0 − 0.9) / 1.0, from step 750 = ¾ · 1000
    assert mod.flatness(curve, 2) == 0.0
    assert mod.flatness([[1, 4.0], [600, 2.0], [1000, 1.0]], 1) == pytest.approx(0.5)  # last point ≤ 750
    fc = mod.FairConfig()
    s2 = fc.stage2(mod.toy.ExpConfig(), "released", dmd=1.0)
    assert (s2.onpolicy_lr, s2.onpolicy_ema, s2.fd_epsilon, s2.dmd_real_scale) == (1e-4, 0.99, 5.0, 1.0)
    assert mod.toy.loss_config(mod.dataclasses.replace(s2, fd_epsilon=2.5)).fd_epsilon == 2.5
    with pytest.raises(ValueError, match="schedule"):
        mod.Setup.train_stage1(None, mod.toy.ExpConfig(), lambda *a: [], "linear")


# ~10 s: the stage-1 (schedule, lr) search picks by held-out loss, the stage-2 search per factor by the distance
# to the teacher's CFG-3 samples, neither computes the exact reference, and a report run applies both.
def test_fair_anystep_select_stages_smoke(tmp_path: Path, monkeypatch) -> None:
    mod = _load()
    small = ["--seeds", "0", "--teacher-steps", "10", "--flowmap-steps", "8", "--onpolicy-steps", "3"]
    small += ["--curve-every", "2", "--n-eval", "16", "--n-heldout", "32", "--width", "8", "--batch", "8"]
    small += ["--heldout-loss-n", "64", "--grid-stage1", "constant@1e-4", "cosine@1e-2"]
    small += ["--grid-stage2", "lr@3e-4", "dmd@1"]

    def no_reference(*a, **k):
        raise AssertionError("the selection must not compute the exact reference")

    monkeypatch.setattr(mod, "exact_reference", no_reference)
    s1 = tmp_path / "s1" / "selection_stage1.json"
    assert mod.main(["--select-stage1", "--out", str(s1.parent), *small]) == 0
    sel1 = json.loads(s1.read_text())
    assert set(sel1["grid"]) == {"g1", "released", "meanflow"}
    for arm, rows in sel1["grid"].items():
        assert [(r["schedule"], r["lr"]) for r in rows] == [("constant", 1e-4), ("cosine", 1e-2)]
        best = min(rows, key=lambda r: r["heldout_loss"])
        assert (sel1["chosen"][f"lr_{arm}"], sel1["chosen"][f"sched_{arm}"]) == (best["lr"], best["schedule"])
    s2 = tmp_path / "s2" / "selection_stage2.json"
    args2 = ["--select-stage2", "--select-arms", "released", "--selection", str(s1), "--out", str(s2.parent)]
    assert mod.main([*args2, *small]) == 0
    sel2 = json.loads(s2.read_text())
    rows = sel2["grid"]["released"]
    assert [(r["factor"], r["value"]) for r in rows] == [
        ("stage 1 only", None),
        ("default", None),
        ("lr", 3e-4),
        ("dmd", 1.0),
    ]
    for r in rows[1:]:
        assert r["score"] == pytest.approx(sum(r["dist_teacher"][n] for n in ("1", "2", "4")) / 3)
    for name, alt in (("lr", rows[2]), ("dmd", rows[3])):
        want = alt["value"] if alt["score"] < rows[1]["score"] else mod.S2_DEFAULTS[name]
        assert sel2["chosen"][f"s2_{name}_released"] == want
    assert sel2["chosen"]["s2_ema_released"] == 0.99 and sel2["chosen"]["s2_fd_released"] == 5.0
    monkeypatch.undo()
    fc = _config_of_main(mod, monkeypatch, ["--selection", str(s1), str(s2), "--out", str(tmp_path), *small])
    chosen = sel1["chosen"] | sel2["chosen"]
    assert {f: getattr(fc, f) for f in chosen} == chosen


def test_fair_anystep_one_arm(tmp_path: Path) -> None:
    """--arms unguided (the budget check of the g = 1 arm) runs that arm alone, at equal calls."""
    mod = _load()
    args = ["--seeds", "0", "--teacher-steps", "10", "--flowmap-steps", "6", "--curve-every", "3"]
    args += ["--n-eval", "16", "--n-heldout", "32", "--width", "8", "--batch", "8", "--heldout-loss-n", "32"]
    args += ["--ref-steps", "10", "--floor", "", "--arms", "unguided", "--sched-g1", "cosine"]
    assert mod.main([*args, "--out", str(tmp_path)]) == 0
    (seed,) = json.loads((tmp_path / "fair_results.json").read_text())["per_seed"]
    assert {n for n in seed["rows"] if not n.startswith("teacher")} == {
        "AnyFlow stage 1, g = 1",
        "CD, unguided teacher",
    }
    assert seed["calls"] == {"unguided": {"anyflow": 18, "cd": 18, "cd_steps": 6}}


def test_fair_anystep_budget_check(tmp_path: Path) -> None:
    """budget_constant/RULE.md applied by --budget-check: v(S) averages the curve at S − 2000, S − 1000 and S exactly;
    a drop of 10 % or more on doubling is "not enough", less is "enough"; cosine runs, the released arm, another
    curve spacing or evaluation size, and a missing point are refused."""
    mod = _load()
    run_config = {"curve_every": 1000, "n_eval": 4096}

    def write(arm: str, points: list, sched: str = "constant", **config) -> str:
        run = tmp_path / f"{arm}-{len(list(tmp_path.iterdir()))}"
        run.mkdir()
        grid = {arm: [{"schedule": sched, "lr": 1e-3, "curve": [[s, None, d, 0.0] for s, d in points]}]}
        doc = {"seed": 0, "grid": grid, "config": run_config | config}
        (run / "selection_stage1.json").write_text(json.dumps(doc))
        return str(run)

    falling = write("g1", [(1, 9.0), (1000, 5.0), (2000, 0.30), (3000, 0.22), (4000, 0.20), (5000, 9.0),
                           (6000, 0.10), (7000, 0.11), (8000, 0.12)])
    flat = write("meanflow", [(1, 9.0), (1000, 5.0), (2000, 0.21), (3000, 0.20), (4000, 0.20), (5000, 9.0),
                              (6000, 0.20), (7000, 0.19), (8000, 0.19)])
    out = tmp_path / "out"
    assert mod.main(["--budget-check", falling, flat, "--flowmap-steps", "4000", "--out", str(out)]) == 0
    chk = json.loads((out / "budget_check.json").read_text())
    g1, mf = chk["rows"]
    assert g1["v"]["4000"] == pytest.approx(0.24) and g1["drop"] == pytest.approx((0.24 - 0.11) / 0.24)
    assert not g1["enough"] and mf["arm"] == "meanflow" and mf["drop"] == pytest.approx(0.01 / (0.61 / 3))
    assert mf["enough"] and "**no**" in (out / "budget_check.md").read_text()
    points = [(s, 1.0) for s in (1, 1000, 2000, 3000, 4000, 6000, 7000, 8000)]
    for bad, match in ((write("g1", points, "cosine"), "constant-rate runs only"),
                       (write("released", points), "g1 and meanflow only"),
                       (write("g1", points, curve_every=500), "curve_every"),
                       (write("g1", points, n_eval=1024), "n_eval"),
                       (write("g1", [p for p in points if p[0] != 7000]), "no point at step 7000")):
        with pytest.raises(ValueError, match=match):
            mod.budget_check([bad], 4000)
