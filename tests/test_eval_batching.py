"""The evaluate stage samples, decodes and measures ``evaluate.batch_size`` samples at a time: the metrics do not
depend on the batch size, no more than one batch of videos is decoded at once, and VBench sampling is skipped
when no VBench can score the videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pipeline_fixtures import FAST

import anyflow.eval.pipeline
from anyflow.eval import vbench as vb
from anyflow.models.vae import VideoVAE
from anyflow.stages import run_stage

NUM_PROMPTS, SPP, NFES = 3, 2, (1, 2)
NUM = NUM_PROMPTS * SPP
SMALL = {**FAST, "evaluate.num_prompts": NUM_PROMPTS, "evaluate.samples_per_prompt": SPP,
         "evaluate.nfes": ",".join(map(str, NFES)), "evaluate.reference_steps": 8}


def _evaluate(tiny_chain: dict, store: Path, **overrides) -> Path:
    art = run_stage("evaluate", store=str(store), overrides={**SMALL, **overrides}, progress=False,
                    inputs={"generator": tiny_chain["generator"].uri, "teacher": tiny_chain["teacher"].uri,
                            "flowmap": tiny_chain["flowmap"].uri})
    assert not art.cached
    return Path(art.uri)


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every VAE decode call."""
    sizes: list[int] = []
    original = VideoVAE.decode

    def spy(self, latents):
        sizes.append(int(latents.shape[0]))
        return original(self, latents)

    monkeypatch.setattr(VideoVAE, "decode", spy)
    return sizes


@pytest.fixture
def sampled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every flow-map checkpoint sampling call (diffusers' AnyFlowPipeline)."""
    sizes: list[int] = []
    original = anyflow.eval.pipeline.sample_with_pipeline

    def spy(base, pipe, c, noise, nfe, **kw):
        sizes.append(int(noise.shape[0]))
        return original(base, pipe, c, noise, nfe, **kw)

    monkeypatch.setattr(anyflow.eval.pipeline, "sample_with_pipeline", spy)
    return sizes


def test_metrics_do_not_depend_on_the_batch_size(tiny_chain, tmp_path: Path, decoded: list[int]) -> None:
    store = tmp_path / "store"
    one = json.loads((_evaluate(tiny_chain, store, **{"evaluate.batch_size": 1}) / "metrics.json").read_text())
    assert decoded and max(decoded) == 1  # never more than one decoded video at a time
    decoded.clear()
    every = json.loads((_evaluate(tiny_chain, store, **{"evaluate.batch_size": 64}) / "metrics.json").read_text())
    assert max(decoded) == NUM  # one batch holds every sample

    assert one["prompts"] == every["prompts"] and len(one["prompts"]) == NUM
    assert set(one["metrics"]) == set(every["metrics"]) == {"teacher", "flowmap", "generator"}
    for model, rows in every["metrics"].items():
        assert sorted(rows) == sorted(one["metrics"][model]) == [str(n) for n in NFES]
        for n, row in rows.items():
            assert sorted(row) == sorted(one["metrics"][model][n])
            assert {"coupled_mse", "psnr", "ssim", "flicker", "energy_distance", "adherence_colour"} <= set(row)
            for key, value in row.items():
                np.testing.assert_allclose(one["metrics"][model][n][key], value, rtol=1e-5, atol=0,
                                           err_msg=f"{model}/nfe{n}/{key}")
    assert one["per_sample_coupled_mse"].keys() == every["per_sample_coupled_mse"].keys()
    for key, values in every["per_sample_coupled_mse"].items():
        assert len(values) == NUM
        np.testing.assert_allclose(one["per_sample_coupled_mse"][key], values, rtol=1e-5, atol=0, err_msg=key)
        # the row's coupled_mse is the mean of the per-sample values
        model, nfe = key.rsplit("/nfe", 1)
        assert every["metrics"][model][nfe]["coupled_mse"] == pytest.approx(np.mean(values), rel=1e-12)


def test_no_vbench_sampling_without_vbench(tiny_chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           sampled: list[int]) -> None:
    monkeypatch.setenv("ANYFLOW_VBENCH_PYTHON", str(tmp_path / "no-such-python"))
    assert vb.find_vbench() is None
    out = _evaluate(tiny_chain, tmp_path / "store", **{"evaluate.vbench": True, "evaluate.batch_size": 4})
    # the sweep only: 2 flow-map checkpoints × the NFEs × 2 batches (6 samples by 4); nothing for VBench
    assert sampled == [4, 2] * (2 * len(NFES))
    assert not (out / "vbench").exists()
    doc = json.loads((out / "metrics.json").read_text())
    dims = doc["vbench"]["all checkpoints"]["dimensions"]
    assert set(dims) == {"temporal_flickering"}
    assert dims["temporal_flickering"]["status"] == "not run"
    assert "ANYFLOW_VBENCH_PYTHON" in dims["temporal_flickering"]["reason"]


def test_vbench_videos_are_written_batch_by_batch(tiny_chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  sampled: list[int], decoded: list[int]) -> None:
    seen: dict[str, dict] = {}

    def fake_run_vbench(videos_dir, dimensions, *, output_dir, **kw):
        videos_dir = Path(videos_dir)
        seen[videos_dir.name] = {
            "files": sorted(p.name for p in videos_dir.iterdir() if p.suffix == ".mp4"),
            "prompt_file": json.loads((videos_dir / vb.PROMPT_FILE).read_text(encoding="utf-8")),
        }
        return {d: {"status": "ok", "score": 0.5} for d in dimensions}

    monkeypatch.setattr(vb, "find_vbench", lambda: ["fake-vbench"])
    monkeypatch.setattr(vb, "run_vbench", fake_run_vbench)
    out = _evaluate(tiny_chain, tmp_path / "store", **{"evaluate.vbench": True, "evaluate.batch_size": 1})
    assert max(decoded) == 1
    # sweep + VBench: 2 checkpoints × the NFEs × 6 samples, one sample per call each time
    assert sampled == [1] * (2 * 2 * len(NFES) * NUM)
    doc = json.loads((out / "metrics.json").read_text())
    prompts = doc["prompts"][::SPP]
    want = {vb.vbench_filename(p, i): p for p in prompts for i in range(SPP)}  # what writing all at once writes
    assert sorted(seen) == sorted(f"{m}-nfe{n}" for m in ("flowmap", "generator") for n in NFES)
    for entry in seen.values():
        assert entry["files"] == sorted(want) and entry["prompt_file"] == want
    assert doc["vbench"]["generator/nfe1"]["dimensions"]["temporal_flickering"]["score"] == 0.5
