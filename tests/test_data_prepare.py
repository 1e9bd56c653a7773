"""prepare(): procedural and real mp4 sources → tiny VAE + tiny text encoder → shards → LatentDataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anyflow.data.prepare import DataPrepError, prepare
from anyflow.data.procedural import make_clip
from anyflow.data.shards import LatentDataset
from anyflow.data.video import VideoSpec, frames_to_tensor, write_video
from anyflow.models.tiny import build_tiny_text_encoder, build_tiny_vae
from anyflow.models.vae import VideoVAE

GEOM = dict(frames=5, height=16, width=16, fps=8)
NEG = "blurry static gray"


@pytest.fixture(scope="module")
def encoders():
    return VideoVAE(build_tiny_vae(seed=0)), build_tiny_text_encoder(seed=0)


def _run(source, out: Path, encoders, **kw) -> dict:
    vae, text = encoders
    args = dict(encode_video=vae.encode, encode_text=text.encode, negative_prompt=NEG, out_dir=out,
                samples_per_shard=4, progress=False, batch_size=3, **GEOM)
    return prepare(source, **{**args, **kw})


def test_procedural_to_shards_to_loader(tmp_path: Path, encoders) -> None:
    vae, text = encoders
    summary = _run("procedural:n=5,seed=2", tmp_path / "ds", encoders)
    assert (summary["clips_read"], summary["clips_written"], summary["clips_skipped"], summary["num_shards"]) == (5, 5, 0, 2)
    assert summary["latents_shape"] == [2, 4, 2, 2] and summary["text_shape"] == [16, 32]
    timing = ("seconds", "clips_per_s")  # this run's, returned for the metrics but not part of the dataset
    assert json.loads((tmp_path / "ds" / "summary.json").read_text()) == {
        k: v for k, v in summary.items() if k not in timing}
    assert summary["seconds"] > 0 and summary["clips_per_s"] > 0
    ds = LatentDataset(str(tmp_path / "ds"), batch_size=5, seed=0, shuffle=False)
    batch = next(ds)
    assert batch["keys"] == [f"procedural-2-{i:06d}" for i in range(5)]
    # Independent reference: render the clips and encode them in one batch (prepare used batches of 3 + 2).
    spec = VideoSpec(frames=5, fps=8, height=16, width=16)
    clips = [make_clip(2, i, frames=5, height=16, width=16) for i in range(5)]
    want = vae.encode(torch.stack([frames_to_tensor(c.video, spec) for c in clips]))
    torch.testing.assert_close(batch["latents"], want, atol=1e-5, rtol=1e-5)
    assert batch["captions"] == [c.caption for c in clips]
    torch.testing.assert_close(batch["text"], text.encode([c.caption for c in clips]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ds.negative_embedding(), text.encode([NEG]))


def _mp4_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for i, name in enumerate(["ok_1", "ok_2", "short", "small", "nocaption"]):
        video = make_clip(4, i, frames=12, height=48, width=48).video
        video = video[:3] if name == "short" else video[:, ::8, ::8] if name == "small" else video
        write_video(root / f"{name}.mp4", video, fps=16)
        if name != "nocaption":
            (root / f"{name}.txt").write_text(make_clip(4, i, frames=2, height=16, width=16).caption)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (root / "broken.txt").write_text("a red square moving up")
    (root / "lonely.json").write_text('{"captions": ["no video"]}')
    return root


@pytest.mark.s3
def test_real_mp4s_with_bad_inputs_counted_then_loaded_from_s3(tmp_path: Path, encoders, s3_server, s3_prefix: str) -> None:
    from anyflow import storage

    src = _mp4_folder(tmp_path / "raw")
    summary = _run(str(src), tmp_path / "ds", encoders)
    assert summary["clips_read"] == 7 and summary["clips_written"] == 2 and summary["clips_skipped"] == 5
    assert summary["skipped"] == {"missing_caption": 1, "missing_video": 1, "too_short": 1, "undecodable": 1, "wrong_size": 1}
    assert summary["skipped_examples"]["undecodable"][0].startswith("broken.mp4")
    storage.publish(tmp_path / "ds", s3_prefix, kind="dataset", metrics=summary)
    local_ds = LatentDataset(str(tmp_path / "ds"), batch_size=1, seed=4)
    local = [next(local_ds) for _ in range(4)]
    remote = LatentDataset(s3_prefix, batch_size=1, seed=4, cache_dir=tmp_path / "cache")
    got = [next(remote) for _ in range(4)]  # two epochs of two clips, in the same order as locally
    assert sorted(b["keys"][0] for b in got[:2]) == ["ok_1.mp4", "ok_2.mp4"]
    for a, b in zip(local, got, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])
    ok1 = next(b for b in got if b["keys"] == ["ok_1.mp4"])
    assert ok1["captions"] == [(src / "ok_1.txt").read_text()]
    assert np.isfinite(ok1["latents"].numpy()).all() and ok1["latents"].shape == (1, 2, 4, 2, 2)


def test_strict_mode_names_the_bad_clip(tmp_path: Path, encoders) -> None:
    src = _mp4_folder(tmp_path / "raw")
    with pytest.raises(DataPrepError, match=r"'broken\.mp4' is unusable: undecodable"):
        _run(str(src), tmp_path / "ds", encoders, strict=True)


def test_nothing_usable_is_an_error_with_a_summary(tmp_path: Path, encoders) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    (src / "a.mp4").write_bytes(b"not a video")
    (src / "a.txt").write_text("caption")
    with pytest.raises(DataPrepError, match="no usable clips"):
        _run(str(src), tmp_path / "ds", encoders)
    assert json.loads((tmp_path / "ds" / "summary.json").read_text())["skipped"] == {"undecodable": 1}


def test_duplicates_and_source_skips_are_counted(tmp_path: Path, encoders, capsys: pytest.CaptureFixture[str]) -> None:
    from anyflow.data.sources import SkippedRecord, procedural_source

    a, b, c = procedural_source(3, seed=1)
    source = [a, SkippedRecord("meta-7", "bad_metadata", "not JSON"), a, b, c]
    summary = _run(source, tmp_path / "ds", encoders, progress=True, limit=4)
    assert summary["clips_read"] == 4 and summary["clips_written"] == 2  # c is past the limit
    assert summary["skipped"] == {"bad_metadata": 1, "duplicate_key": 1}
    assert summary["skipped_examples"] == {"bad_metadata": ["meta-7: not JSON"],
                                           "duplicate_key": [f"{a.key}: an earlier record has the same key"]}
    out = capsys.readouterr()
    assert "read 4, wrote 2" in out.out and "clips/s" in out.out and "prepare_data" in out.err  # summary line + tqdm bar
