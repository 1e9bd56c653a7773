"""VBench adapter: naming, prompt sets, aggregation against hand-computed totals, result parsing."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from anyflow.eval import vbench as vb


def _vbench_prompt_from_filename(path: str) -> str:
    """VBench's own rule (vbench/utils.py get_prompt_from_filename), re-stated for the test."""
    stem = Path(path).stem
    return re.sub(r"-\d+$", "", stem)


def test_filenames_follow_vbench_convention():
    assert (
        vb.vbench_filename("A 3D model of a 1800s victorian house.", 0)
        == "A 3D model of a 1800s victorian house.-0.mp4"
    )
    assert vb.vbench_filename("a red car", 4) == "a red car-4.mp4"
    assert vb.vbench_filename("AC/DC on stage", 1) == "AC_DC on stage-1.mp4"
    long = "x" * 300
    assert vb.vbench_filename(long, 3) == "x" * 180 + "-3.mp4"
    # Every standard prompt keeps its full text (VBench's standard mode matches on it) and round-trips.
    for prompt in vb.load_prompts("vbench"):
        name = vb.vbench_filename(prompt, 2)
        assert len(name.encode()) <= 255
        assert _vbench_prompt_from_filename(name) == prompt
    with pytest.raises(ValueError, match="empty file name"):
        vb.vbench_filename("  ", 0)


def test_write_vbench_videos(tmp_path):
    import imageio.v3 as iio

    prompts = ["a red car", "a/b test"]
    videos = [np.full((4, 16, 16, 3), 40 * i, dtype=np.uint8) for i in range(4)]
    paths = vb.write_vbench_videos(videos, prompts, tmp_path / "v", samples_per_prompt=2, fps=16)
    assert [p.name for p in paths] == [
        "a red car-0.mp4",
        "a red car-1.mp4",
        "a_b test-0.mp4",
        "a_b test-1.mp4",
    ]
    frames = iio.imread(paths[3])
    assert frames.shape[0] == 4 and abs(float(frames.mean()) - 120) < 3
    mapping = json.loads((tmp_path / "v" / "prompt_file.json").read_text())
    assert mapping == {
        "a red car-0.mp4": "a red car",
        "a red car-1.mp4": "a red car",
        "a_b test-0.mp4": "a/b test",
        "a_b test-1.mp4": "a/b test",
    }
    with pytest.raises(ValueError, match="pass exactly 4 videos"):
        vb.write_vbench_videos(videos[:3], prompts, tmp_path / "w", samples_per_prompt=2)


def test_standard_prompt_list_matches_vbench_counts():
    prompts = vb.load_prompts("vbench")
    assert len(prompts) == 946  # docs/method.md §11
    assert prompts[0] == "In a still frame, a stop sign"
    assert prompts[-1] == "a surfboard on the bottom of skis, front view"
    per_dim = Counter(d for _, dims in vb.vbench_prompt_dimensions() for d in dims)
    # VBench paper / prompts_per_dimension sizes.
    assert per_dim == {
        "temporal_flickering": 75, "multiple_objects": 82, "human_action": 100, "subject_consistency": 72,
        "dynamic_degree": 72, "motion_smoothness": 72, "object_class": 79, "color": 85, "appearance_style": 90,
        "temporal_style": 100, "overall_consistency": 93, "aesthetic_quality": 93, "imaging_quality": 93,
        "scene": 86, "background_consistency": 86, "spatial_relationship": 84,
    }  # fmt: skip
    assert set(per_dim) == set(vb.ALL_T2V_DIMENSIONS)


def test_other_prompt_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYFLOW_VBENCH_EXTENDED", str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="all_dimension_aug_wanx"):
        vb.load_prompts("vbench-extended")
    (tmp_path / "ext.txt").write_text("\n".join(f"long {i}" for i in range(946)) + "\n")
    monkeypatch.setenv("ANYFLOW_VBENCH_EXTENDED", str(tmp_path / "ext.txt"))
    assert vb.load_prompts("vbench-extended")[5] == "long 5"
    (tmp_path / "short.txt").write_text("a\nb\n")
    monkeypatch.setenv("ANYFLOW_VBENCH_EXTENDED", str(tmp_path / "short.txt"))
    with pytest.raises(ValueError, match="has 2 prompts"):
        vb.load_prompts("vbench-extended")

    from anyflow.data.procedural import make_clip

    caps = vb.load_prompts("procedural", n=3, seed=7)
    assert caps == [make_clip(7, i, frames=2, height=16, width=16).caption for i in range(3)]
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    assert vb.load_prompts(str(tmp_path / "p.txt")) == ["first", "second"]
    (tmp_path / "p.json").write_text(json.dumps([{"prompt_en": "x"}, "y"]))
    assert vb.load_prompts(str(tmp_path / "p.json")) == ["x", "y"]
    with pytest.raises(FileNotFoundError, match="neither"):
        vb.load_prompts("nope")


# Normalisation ranges re-typed from VBench scripts/constant.py so the test does not reuse the module's table.
RANGES = {
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0), "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975), "dynamic_degree": (0.0, 1.0), "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0), "object_class": (0.0, 1.0), "multiple_objects": (0.0, 1.0), "human_action": (0.0, 1.0),
    "color": (0.0, 1.0), "spatial_relationship": (0.0, 1.0), "scene": (0.0, 0.8222), "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364),
    "i2v_subject": (0.1462, 1.0), "i2v_background": (0.2615, 1.0), "camera_motion": (0.0, 1.0),
}  # fmt: skip


def _raw(normalized: dict[str, float]) -> dict[str, float]:
    return {d: RANGES[d][0] + x * (RANGES[d][1] - RANGES[d][0]) for d, x in normalized.items()}


QUALITY_X = {
    "subject_consistency": 0.9, "background_consistency": 0.8, "temporal_flickering": 0.7, "motion_smoothness": 0.6,
    "dynamic_degree": 0.5, "aesthetic_quality": 0.4, "imaging_quality": 0.3,
}  # fmt: skip
SEMANTIC_X = dict(zip(
    ["object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
     "appearance_style", "temporal_style", "overall_consistency"],
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], strict=True,
))  # fmt: skip


def test_t2v_aggregation_known_totals():
    out = vb.aggregate(_raw({**QUALITY_X, **SEMANTIC_X}))
    quality = (0.9 + 0.8 + 0.7 + 0.6 + 0.5 * 0.5 + 0.4 + 0.3) / 6.5  # = 3.95 / 6.5
    semantic = 0.5
    assert out["status"] == "computed" and out["missing"] == []
    assert out["quality"] == pytest.approx(quality)
    assert out["semantic"] == pytest.approx(semantic)
    assert out["total"] == pytest.approx(0.8 * quality + 0.2 * semantic)  # 0.586154
    assert out["total"] == pytest.approx(0.5861538461538)
    # A realistic raw vector, hand-normalised.
    raw = {d: 0.95 for d in QUALITY_X} | {d: 0.25 for d in SEMANTIC_X}
    norm = {d: (v - RANGES[d][0]) / (RANGES[d][1] - RANGES[d][0]) for d, v in raw.items()}
    q = (sum(norm[d] for d in QUALITY_X) - 0.5 * norm["dynamic_degree"]) / 6.5
    s = sum(norm[d] for d in SEMANTIC_X) / 9
    assert vb.aggregate(raw)["total"] == pytest.approx(0.8 * q + 0.2 * s)


def test_aggregation_missing_dimensions_are_not_zero():
    scores: dict = _raw({**QUALITY_X, **SEMANTIC_X})
    del scores["color"]
    scores["scene"] = {"status": "not run", "reason": "model weights not available offline"}
    out = vb.aggregate(scores)
    assert out["status"] == "not computed"
    assert out["total"] is None and out["semantic"] is None
    assert out["quality"] == pytest.approx(3.95 / 6.5)
    assert out["missing"] == ["color", "scene"]
    assert "color" in out["reason"] and "scene" in out["reason"]
    ok = vb.aggregate({d: {"status": "ok", "score": v} for d, v in _raw({**QUALITY_X, **SEMANTIC_X}).items()})
    assert ok["total"] == pytest.approx(0.5861538461538)
    assert vb.aggregate({})["status"] == "not computed"


def test_i2v_aggregation_known_totals():
    x = {
        "subject_consistency": 0.9, "background_consistency": 0.8, "motion_smoothness": 0.7, "dynamic_degree": 0.6,
        "aesthetic_quality": 0.5, "imaging_quality": 0.4, "i2v_subject": 0.95, "i2v_background": 0.85, "camera_motion": 0.3,
    }  # fmt: skip
    out = vb.aggregate(_raw(x), kind="i2v")
    quality = (0.9 + 0.8 + 0.7 + 0.5 * 0.6 + 0.5 + 0.4) / 5.5
    i2v = (0.95 + 0.85 + 0.1 * 0.3) / 2.1
    assert out["quality"] == pytest.approx(quality)
    assert out["i2v"] == pytest.approx(i2v)
    assert out["total"] == pytest.approx(0.5 * quality + 0.5 * i2v)
    del x["camera_motion"]
    assert vb.aggregate(_raw(x), kind="i2v")["missing"] == ["camera_motion"]
    with pytest.raises(ValueError, match="kind"):
        vb.aggregate({}, kind="v2v")


def test_parse_vbench_result_files(tmp_path):
    # The format VBench writes: {dimension: [mean, [{"video_path": ..., "video_results": ...}, ...]]}, one file per run.
    (tmp_path / "subject_consistency").mkdir()
    (tmp_path / "subject_consistency" / "results_2025-01-01-00:00:00_eval_results.json").write_text(
        '{"subject_consistency": [0.9612, [{"video_path": "/v/a red car-0.mp4", "video_results": 0.9612}]]}'
    )
    (tmp_path / "temporal_flickering_eval_results.json").write_text(
        '{"temporal_flickering": [0.9801, [{"video_path": "/v/x-0.mp4", "video_results": 0.97}, '
        '{"video_path": "/v/x-1.mp4", "video_results": 0.9902}]], "dynamic_degree": 0.25}'
    )
    (tmp_path / "unrelated_full_info.json").write_text("[]")
    assert vb.parse_vbench_results(tmp_path) == {
        "subject_consistency": 0.9612,
        "temporal_flickering": 0.9801,
        "dynamic_degree": 0.25,
    }
    (tmp_path / "bad_eval_results.json").write_text('{"color": ["n/a"]}')
    with pytest.raises(ValueError, match="no numeric score"):
        vb.parse_vbench_results(tmp_path)


def test_run_vbench_without_vbench_reports_not_run(tmp_path, monkeypatch):
    monkeypatch.delenv("ANYFLOW_VBENCH_PYTHON", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = vb.run_vbench(tmp_path, ["temporal_flickering", "color"], output_dir=tmp_path / "o")
    assert out == {
        d: {"status": "not run", "reason": vb.NOT_INSTALLED} for d in ("temporal_flickering", "color")
    }
    with pytest.raises(ValueError, match="unknown dimensions"):
        vb.run_vbench(tmp_path, ["sharpness"], output_dir=tmp_path / "o")


def test_run_vbench_subprocess_contract(tmp_path, monkeypatch):
    """A stand-in ``vbench`` executable (a shell script) checks the command line we send and writes
    VBench-format output: a score for temporal_flickering, a download failure for dynamic_degree."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "vbench"
    script.write_text(
        "#!/bin/sh\n"
        'echo "$@" >> "$ARGS_LOG"\n'
        'while [ $# -gt 0 ]; do case "$1" in --dimension) dim=$2;; --output_path) out=$2;; esac; shift; done\n'
        'if [ "$dim" = dynamic_degree ]; then echo "requests.exceptions.ConnectionError: huggingface.co" >&2; exit 1; fi\n'
        'printf \'{"%s": [0.97, []]}\' "$dim" > "$out/results_x_eval_results.json"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("ANYFLOW_VBENCH_PYTHON", raising=False)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ARGS_LOG", str(tmp_path / "args.log"))
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "prompt_file.json").write_text("{}")
    out = vb.run_vbench(videos, ["temporal_flickering", "dynamic_degree", "color"], output_dir=tmp_path / "o")
    assert out["temporal_flickering"] == {"status": "ok", "score": 0.97}
    assert out["dynamic_degree"]["status"] == "not run" and "offline" in out["dynamic_degree"]["reason"]
    assert out["color"]["status"] == "not run" and "standard prompt suite" in out["color"]["reason"]
    first = (tmp_path / "args.log").read_text().splitlines()[0].split()
    assert first[0] == "evaluate" and first[first.index("--mode") + 1] == "custom_input"
    assert first[first.index("--prompt_file") + 1] == str(videos / "prompt_file.json")
    assert vb.aggregate(out)["status"] == "not computed"


@pytest.mark.skipif(
    vb.find_vbench() is None, reason="no VBench environment (eval image / ANYFLOW_VBENCH_PYTHON / vbench CLI)"
)
def test_temporal_flickering_with_real_vbench(tmp_path):
    from anyflow.eval.metrics import flicker_score

    g = np.random.default_rng(0)
    base = g.integers(0, 255, size=(1, 64, 64, 3), dtype=np.uint8)
    video = np.repeat(base, 16, axis=0)
    video[8:] = np.clip(video[8:].astype(int) + 20, 0, 255).astype(np.uint8)
    vb.write_vbench_videos([video], ["In a still frame, a stop sign"], tmp_path / "v", samples_per_prompt=1)
    out = vb.run_vbench(tmp_path / "v", ["temporal_flickering"], output_dir=tmp_path / "o")
    if out["temporal_flickering"]["status"] != "ok":
        pytest.skip(f"VBench present but did not run: {out['temporal_flickering']['reason']}")
    import imageio.v3 as iio

    decoded = iio.imread(tmp_path / "v" / "In a still frame, a stop sign-0.mp4")
    assert out["temporal_flickering"]["score"] == pytest.approx(flicker_score(decoded), abs=0.02)


NAN_PYTHON = r'''
import json, os, sys
args = sys.argv[3:]  # called as: <this> -c <driver> ARGS
if "--probe" in args:
    sys.exit(0)
out = args[args.index("--output_path") + 1]
dim = args[args.index("--dimension") + 1]
# what VBench writes when no video belongs to the dimension: np.mean([]) -> NaN
open(os.path.join(out, "x_eval_results.json"), "w").write('{"%s": [NaN, []]}' % dim)
'''


def test_a_nan_score_is_not_run_never_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from anyflow.eval.vbench import aggregate, run_vbench, write_vbench_videos

    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n{NAN_PYTHON}")
    fake.chmod(0o755)
    monkeypatch.setenv("ANYFLOW_VBENCH_PYTHON", str(fake))
    videos = tmp_path / "videos"
    write_vbench_videos([np.zeros((4, 16, 16, 3), np.uint8)], ["a red circle"], videos, samples_per_prompt=1, fps=8)
    dims = run_vbench(videos, ["temporal_flickering"], output_dir=tmp_path / "out")
    assert dims["temporal_flickering"]["status"] == "not run"
    assert "no score" in dims["temporal_flickering"]["reason"] and "score" not in dims["temporal_flickering"]
    agg = aggregate(dims)
    assert agg["status"] != "computed" and "temporal_flickering" in agg["missing"]


def test_evaluate_cache_key_follows_the_vbench_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluate artifact whose VBench dimensions were all "not run" must not be reused once an eval
    environment exists; with VBench off the environment does not matter."""
    from anyflow.config import apply_overrides, get_preset
    from anyflow.stages import cache_key

    on = apply_overrides(get_preset("tiny"), {"evaluate.vbench": True})
    off = get_preset("tiny")
    monkeypatch.delenv("ANYFLOW_VBENCH_PYTHON", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no vbench CLI either
    keys = [cache_key("evaluate", c, ("evaluate",), {}) for c in (on, off)]
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\nimport sys; sys.exit(0)\n")
    fake.chmod(0o755)
    monkeypatch.setenv("ANYFLOW_VBENCH_PYTHON", str(fake))
    assert cache_key("evaluate", on, ("evaluate",), {}) != keys[0]
    assert cache_key("evaluate", off, ("evaluate",), {}) == keys[1]
