"""The real VBench, run through the adapter in its own environment (docs/method.md §11).

These tests need the eval environment: the interpreter named by ``ANYFLOW_VBENCH_PYTHON``, else
``.venv-eval/bin/python`` at the repository root. Without it they skip, saying how to create it
(docs/evaluation-vbench.md):

    python3.11 -m venv .venv-eval
    .venv-eval/bin/pip install -c images/eval/constraints.txt -r images/eval/requirements.txt

``temporal_flickering`` needs no downloaded weights, so it is scored for real here, on CPU; a
dimension that needs weights (``dynamic_degree``: RAFT) must come back "not run" with the reason.
Downloads are made to fail fast and deterministically (an unreachable loopback proxy, an empty
``VBENCH_CACHE_DIR``), so the test behaves the same with or without network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anyflow.eval import vbench as vb

ROOT = Path(__file__).resolve().parent.parent
LOCAL_ENV = ROOT / ".venv-eval" / "bin" / "python"
HOW_TO = (
    "no VBench eval environment: set ANYFLOW_VBENCH_PYTHON to its interpreter, or create "
    f"{LOCAL_ENV.parent.parent} with `python3.11 -m venv .venv-eval && .venv-eval/bin/pip install "
    "-c images/eval/constraints.txt -r images/eval/requirements.txt` (docs/evaluation-vbench.md)"
)
# VBench's normalisation range for temporal_flickering (scripts/constant.py), re-typed for the test.
FLICKER_RANGE = (0.6293, 1.0)


def _eval_python() -> str | None:
    python = os.environ.get("ANYFLOW_VBENCH_PYTHON")
    if python:
        return python
    return str(LOCAL_ENV) if LOCAL_ENV.is_file() else None


@pytest.fixture
def eval_env(tmp_path, monkeypatch) -> str:
    python = _eval_python()
    if python is None:
        pytest.skip(HOW_TO)
    monkeypatch.setenv("ANYFLOW_VBENCH_PYTHON", python)
    monkeypatch.setenv("ANYFLOW_VBENCH_DEVICE", "cpu")
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "vbench-cache"))  # no weights cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # discard port: downloads fail at once
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    command = vb.find_vbench()
    if command is None:
        pytest.fail(f"ANYFLOW_VBENCH_PYTHON={python} exists but cannot run VBench: {vb._locate_vbench()[1]}")
    return python


def _clips() -> dict[str, np.ndarray]:
    """Three 16-frame 64×64 clips: a static one, the same with every other frame 40 levels brighter,
    and a procedural clip with a moving shape."""
    from anyflow.data.procedural import make_clip

    moving = make_clip(3, 3, frames=16, height=64, width=64).video  # "a blue triangle moving right"
    g = np.random.default_rng(0)
    texture = (0.5 * moving[0] + 0.5 * g.integers(0, 256, size=moving.shape[1:])).astype(np.uint8)
    static = np.repeat(texture[None], 16, axis=0)
    flicker = static.copy()
    flicker[1::2] = np.clip(flicker[1::2].astype(np.int16) + 40, 0, 255).astype(np.uint8)
    return {
        "a still textured frame": static,
        "a flickering textured frame": flicker,
        "a moving shape": moving,
    }


def _flicker_formula(path: Path) -> float:
    """VBench's temporal_flickering per video (vbench/temporal_flickering.py: cal_score), re-computed
    independently on the frames decoded here: ``(255 − mean_i mean|f_i − f_{i+1}|) / 255``."""
    import imageio.v3 as iio

    frames = iio.imread(path).astype(np.float64)
    mae = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    return float((255.0 - mae.mean()) / 255.0)


def test_temporal_flickering_real_vbench_cpu(eval_env, tmp_path):
    clips = _clips()
    videos = tmp_path / "videos"
    paths = vb.write_vbench_videos(list(clips.values()), list(clips), videos, samples_per_prompt=1, fps=16)
    out_dir = tmp_path / "results"

    out = vb.run_vbench(videos, ["temporal_flickering", "dynamic_degree"], output_dir=out_dir, timeout_s=600)

    log = (out_dir / "temporal_flickering" / "vbench.log").read_text()
    assert out["temporal_flickering"]["status"] == "ok", (out, log)
    assert "device cpu" in log, log

    # The JSON VBench itself wrote: {dimension: [mean, [{"video_path", "video_results"}, ...]]}.
    (result_file,) = (out_dir / "temporal_flickering").glob("*_eval_results.json")
    mean, per_video = json.loads(result_file.read_text())["temporal_flickering"]
    by_name = {Path(r["video_path"]).name: float(r["video_results"]) for r in per_video}
    assert sorted(by_name) == sorted(p.name for p in paths)
    assert out["temporal_flickering"]["score"] == pytest.approx(mean, abs=1e-12)
    assert mean == pytest.approx(np.mean(list(by_name.values())), abs=1e-9)

    static = by_name[vb.vbench_filename("a still textured frame", 0)]
    flicker = by_name[vb.vbench_filename("a flickering textured frame", 0)]
    moving = by_name[vb.vbench_filename("a moving shape", 0)]
    assert static > flicker
    assert static > 0.99 and flicker < 0.9  # ~40 levels of brightness change → ~1 − 40/255
    assert static > moving
    # VBench decodes with OpenCV (BGR), we decode with imageio-ffmpeg (RGB): the formula is per
    # channel and symmetric, so only decoder rounding may differ.
    for path in paths:
        assert by_name[path.name] == pytest.approx(_flicker_formula(path), abs=1e-3), path.name

    # A dimension that needs downloaded weights is "not run" with the reason, never a score.
    dd = out["dynamic_degree"]
    assert dd["status"] == "not run" and "score" not in dd
    assert "offline" in dd["reason"], dd["reason"]
    assert not list((out_dir / "dynamic_degree").glob("*_eval_results.json"))

    # Aggregation from what VBench wrote: the real JSON, parsed, then normalised per docs/method.md §11.
    assert vb.parse_vbench_results(out_dir) == {"temporal_flickering": pytest.approx(mean, abs=1e-12)}
    lo, hi = FLICKER_RANGE
    for scores in (out, vb.parse_vbench_results(out_dir)):
        agg = vb.aggregate(scores)
        assert agg["normalized"] == {"temporal_flickering": pytest.approx((mean - lo) / (hi - lo))}
        assert agg["status"] == "not computed" and agg["total"] is None
        assert agg["quality"] is None and agg["semantic"] is None
        assert "temporal_flickering" not in agg["missing"] and "dynamic_degree" in agg["missing"]
    # With every other quality dimension at its range maximum, Quality moves with flicker alone.
    full = {d: vb.NORMALIZE_T2V[d][1] for d in vb.ALL_T2V_DIMENSIONS} | {
        "temporal_flickering": out["temporal_flickering"]
    }
    agg = vb.aggregate(full)
    assert agg["status"] == "computed"
    assert agg["quality"] == pytest.approx((5.5 + (mean - lo) / (hi - lo)) / 6.5)
    assert agg["total"] == pytest.approx(0.8 * agg["quality"] + 0.2 * 1.0)


def test_cuda_request_without_gpu_is_not_run(eval_env, tmp_path):
    probe = subprocess.run(
        [eval_env, "-c", vb._DRIVER, "--probe"], capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0, probe.stderr
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    assert info["vbench"] == "0.1.5"
    if info["cuda"]:
        pytest.skip("the eval interpreter sees a CUDA device")
    clip = _clips()["a still textured frame"]
    vb.write_vbench_videos([clip], ["a still textured frame"], tmp_path / "v", samples_per_prompt=1)
    out = vb.run_vbench(tmp_path / "v", ["temporal_flickering"], output_dir=tmp_path / "o", device="cuda")
    rec = out["temporal_flickering"]
    assert rec["status"] == "not run" and "no CUDA device" in rec["reason"], rec


def test_named_interpreter_without_vbench_is_not_run(tmp_path, monkeypatch):
    """Runs everywhere: an ANYFLOW_VBENCH_PYTHON that cannot import vbench (this test's own
    interpreter) is reported with the reason and not silently replaced by a `vbench` CLI."""
    if subprocess.run([sys.executable, "-c", "import vbench"], capture_output=True).returncode == 0:
        pytest.skip("this interpreter has vbench")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vbench").write_text("#!/bin/sh\nexit 3\n")
    (bindir / "vbench").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ANYFLOW_VBENCH_PYTHON", sys.executable)
    assert vb.find_vbench() is None
    out = vb.run_vbench(tmp_path, ["temporal_flickering"], output_dir=tmp_path / "o")
    reason = out["temporal_flickering"]["reason"]
    assert out["temporal_flickering"]["status"] == "not run"
    assert reason.startswith(f"ANYFLOW_VBENCH_PYTHON={sys.executable} cannot import vbench")
    assert "vbench" in reason.split(":", 1)[1]
    monkeypatch.setenv("ANYFLOW_VBENCH_PYTHON", str(tmp_path / "missing-python"))
    out = vb.run_vbench(tmp_path, ["temporal_flickering"], output_dir=tmp_path / "o")
    assert "cannot run" in out["temporal_flickering"]["reason"]
