"""New videos under the same source give a new dataset: the data source's listing is part of prepare_data's
key (the store cache), and the pipelines hand the same digest to the prepare_data task (KFP's cache)."""

from __future__ import annotations

from pathlib import Path

from anyflow.data.procedural import make_clip
from anyflow.data.video import write_video
from anyflow.stages import run_stage


def _clip(folder: Path, name: str, seed: int) -> None:
    clip = make_clip(4, seed, frames=9, height=32, width=32)
    write_video(folder / f"{name}.mp4", clip.video, fps=16)
    (folder / f"{name}.txt").write_text(clip.caption)


def test_new_videos_under_the_same_source_make_a_new_dataset(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        _clip(videos, f"clip{i}", i)
    store = str(tmp_path / "store")
    overrides = {"data.source": str(videos)}
    first = run_stage("prepare_data", store=store, overrides=overrides, progress=False)
    again = run_stage("prepare_data", store=store, overrides=overrides, progress=False)
    assert not first.cached and again.cached and again.uri == first.uri  # unchanged source: the cache holds

    _clip(videos, "clip3", 3)  # a new video arrives under the same source setting
    grown = run_stage("prepare_data", store=store, overrides=overrides, progress=False)
    assert not grown.cached and grown.uri != first.uri
    # independent count: the encoded datasets' own summaries
    assert (first.metrics["clips_written"], grown.metrics["clips_written"]) == (3, 4)


def test_procedural_keys_do_not_list_anything(tmp_path: Path) -> None:
    from anyflow.config import get_preset
    from anyflow.stages.prepare_data import source_digest

    assert source_digest(get_preset("tiny")) is None  # made from its spec alone: keys from before stay valid


def test_the_fingerprint_task_changes_with_the_source(tmp_path: Path) -> None:
    import json

    from components.source_fingerprint.component import source_fingerprint

    videos = tmp_path / "videos"
    videos.mkdir()
    _clip(videos, "a", 0)
    common = json.dumps({"data.height": 32})
    extra = json.dumps({"data.source": str(videos)})  # the fine-tuning branch's own source, over the run's
    first = source_fingerprint("tiny", common, extra).digest
    assert len(first) == 64 and first == source_fingerprint("tiny", common, extra).digest
    _clip(videos, "b", 1)
    assert source_fingerprint("tiny", common, extra).digest != first
    assert source_fingerprint("tiny", common).digest == ""  # the tiny preset's procedural source lists nothing
    # no partitions to plan: data.partition_size is 0 (and, below, there is no store)
    assert source_fingerprint("tiny", common, extra, store=str(tmp_path / "store")).Output == []
    parts = json.dumps({"data.source": str(videos), "data.partition_size": 1})
    assert source_fingerprint("tiny", common, parts).Output == []
    planned = source_fingerprint("tiny", common, parts, store=str(tmp_path / "store")).Output
    assert [p.split(":")[0] for p in planned] == ["0", "1"]  # a.mp4, b.mp4: one partition each, none cached
