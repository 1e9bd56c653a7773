"""Partitioned, incremental prepare_data (anyflow/data/partitions.py): equality with the unpartitioned run,
re-encoding only the partitions new clips land in, a failing partition named and the others cached, the reader
following the index's references (verified)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from anyflow import storage
from anyflow.config import ConfigError, StageInputError, apply_overrides, get_preset
from anyflow.data.partitions import PARTITION_STAGE, PartitionsFailed, plan_partitions, prepare_partitioned
from anyflow.data.procedural import describe
from anyflow.data.shards import DatasetError, LatentDataset
from anyflow.models.tiny import build_tiny_text_encoder, build_tiny_vae
from anyflow.models.vae import VideoVAE
from anyflow.stages import run_stage

GEOM = {"data.frames": 5, "data.height": 16, "data.width": 16, "data.samples_per_shard": 3}


class Encoders:
    """Tiny VAE + text encoder that count the clips they encode (and can fail on one caption)."""

    def __init__(self, fail_caption: str | None = None) -> None:
        self.vae, self.text = VideoVAE(build_tiny_vae(seed=0)), build_tiny_text_encoder(seed=0)
        self.clips, self.loads, self.fail_caption = 0, 0, fail_caption

    def load(self):
        self.loads += 1

        def video(x: torch.Tensor) -> torch.Tensor:
            self.clips += x.shape[0]
            return self.vae.encode(x)

        def text(captions: list[str]) -> torch.Tensor:
            if self.fail_caption in captions:
                raise RuntimeError("simulated encoder failure (CUDA error)")
            return self.text.encode(captions)

        return video, text


def _cfg(source: str, size: int, **extra):
    return apply_overrides(
        get_preset("tiny"), {**GEOM, "data.source": source, "data.partition_size": size, **extra}
    )


def _read_all(url: str) -> dict:
    n = LatentDataset(url, batch_size=1, seed=0, shuffle=False).len_samples
    ds = LatentDataset(url, batch_size=n, seed=0, shuffle=False)
    return {**next(ds), "negative": ds.negative_embedding()}


def _partition_dirs(store: Path) -> set[str]:
    root = store / "artifacts" / PARTITION_STAGE
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def test_partitions_are_arrival_ordered_runs() -> None:
    parts = plan_partitions("procedural:n=10,seed=3", 4)
    assert [[k for k, _ in p.items] for p in parts] == [
        [f"procedural-3-{i:06d}" for i in range(lo, min(lo + 4, 10))] for lo in (0, 4, 8)
    ]
    grown = plan_partitions("procedural:n=13,seed=3", 4)
    # appended clips change only the last partition and add new ones
    assert [p.fingerprint for p in grown[:2]] == [p.fingerprint for p in parts[:2]]
    assert grown[2].fingerprint != parts[2].fingerprint and len(grown) == 4
    assert len(plan_partitions("procedural:n=10,seed=3", 0)) == 1


def test_index_partitions_follow_row_order(tmp_path: Path) -> None:
    rows = [{"video": f"clips/{name}.mp4", "caption": name} for name in ("zeta", "alpha", "mid", "beta")]
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    parts = plan_partitions(str(tmp_path / "index.jsonl"), 3)
    assert [[k for k, _ in p.items] for p in parts] == [
        ["clips/zeta.mp4", "clips/alpha.mp4", "clips/mid.mp4"],
        ["clips/beta.mp4"],
    ]
    with open(tmp_path / "index.jsonl", "a") as f:  # a row appended: only the last partition changes
        f.write(json.dumps({"video": "clips/aardvark.mp4", "caption": "new"}) + "\n")
    grown = plan_partitions(str(tmp_path / "index.jsonl"), 3)
    assert grown[0].fingerprint == parts[0].fingerprint and grown[1].fingerprint != parts[1].fingerprint


@pytest.mark.slow
def test_three_partitions_equal_one_partition_sample_for_sample(tmp_path: Path) -> None:
    store, source = tmp_path / "store", "procedural:n=9,seed=1"
    geom = {**GEOM, "data.samples_per_shard": 2, "data.source": source}
    one = run_stage("prepare_data", store=str(store), overrides=geom, progress=False)
    a = _read_all(one.uri)
    assert a["keys"] == [f"procedural-1-{i:06d}" for i in range(9)]
    # size 4: partitions [0, 4), [4, 8), [8, 9) encode the same VAE batches (of 4) as the one-partition run: bit for
    # bit. Size 3: [0, 3), [3, 6), [6, 9) are other batches; a CPU convolution's summation order depends on the
    # batch it runs in, so the latents agree to float32 rounding only (the text encoder is per caption: exact).
    for size, exact in ((4, True), (3, False)):
        three = run_stage(
            "prepare_data", store=str(store), overrides={**geom, "data.partition_size": size}, progress=False
        )
        assert three.uri != one.uri
        b = _read_all(three.uri)
        assert b["keys"] == a["keys"] and b["captions"] == a["captions"]  # order: partition, then record
        assert torch.equal(b["text"], a["text"]) and torch.equal(b["negative"], a["negative"])
        if exact:
            assert torch.equal(b["latents"], a["latents"])
        else:
            torch.testing.assert_close(b["latents"], a["latents"])  # torch's float32 tolerances (rtol 1.3e-6, atol 1e-5)
        # the dataset references its 3 partition artifacts (manifest parents), it does not copy their shards
        manifest = storage.read_manifest(three.uri)
        parents = [p["uri"] for p in manifest["parents"]]
        assert len(parents) == 3 and all(f"/{PARTITION_STAGE}/" in p for p in parents)
        assert not [f for f in manifest["files"] if f.startswith("shard-")]
        assert (
            three.metrics["partitions"],
            three.metrics["partitions_encoded"],
            three.metrics["clips_written"],
        ) == (3, 3, 9)
        index = json.loads(storage.fetch_file(three.uri, "index.json").read_text())
        counts = [[2, 2], [2, 2], [1]] if size == 4 else [[2, 1]] * 3
        assert [s["num_samples"] for s in index["shards"]] == [n for c in counts for n in c]
        assert [s["artifact"] for s in index["shards"]] == [
            p for p, c in zip(parents, counts, strict=True) for _ in c
        ]


def test_adding_clips_reencodes_only_the_partitions_they_land_in(tmp_path: Path) -> None:
    store, enc = tmp_path / "store", Encoders()
    summary, urls = prepare_partitioned(
        "procedural:n=10,seed=2",
        _cfg("procedural:n=10,seed=2", 4),
        str(store),
        tmp_path / "ds1",
        load_encoders=enc.load,
    )
    assert (enc.clips, summary["partitions_encoded"], len(_partition_dirs(store))) == (10, 3, 3)
    # 2 new clips (10, 11) land in the last partition [8, 12): 4 clips re-encoded, partitions 0 and 1 cached
    enc2 = Encoders()
    summary2, urls2 = prepare_partitioned(
        "procedural:n=12,seed=2",
        _cfg("procedural:n=12,seed=2", 4),
        str(store),
        tmp_path / "ds2",
        load_encoders=enc2.load,
    )
    assert (enc2.clips, summary2["partitions_encoded"], summary2["partitions_cached"]) == (4, 1, 2)
    assert urls2[:2] == urls[:2] and urls2[2] != urls[2]
    assert len(_partition_dirs(store)) == 4
    # 5 more (12..16): partition 2 is full already, so only the new partitions 3 [12, 16) and 4 [16, 17)
    enc3 = Encoders()
    summary3, _ = prepare_partitioned(
        "procedural:n=17,seed=2",
        _cfg("procedural:n=17,seed=2", 4),
        str(store),
        tmp_path / "ds3",
        load_encoders=enc3.load,
    )
    assert (enc3.clips, summary3["partitions_encoded"], summary3["partitions_cached"]) == (5, 2, 3)
    # nothing new: no partition encoded, and no model loaded at all
    enc4 = Encoders()
    summary4, _ = prepare_partitioned(
        "procedural:n=17,seed=2",
        _cfg("procedural:n=17,seed=2", 4),
        str(store),
        tmp_path / "ds4",
        load_encoders=enc4.load,
    )
    assert (enc4.clips, enc4.loads, summary4["partitions_encoded"]) == (0, 0, 0)
    assert _read_all(str(tmp_path / "ds4"))["keys"] == [f"procedural-2-{i:06d}" for i in range(17)]


def test_a_failing_partition_fails_the_run_by_name_and_the_others_stay_cached(tmp_path: Path) -> None:
    store, source = tmp_path / "store", "procedural:n=10,seed=4"
    bad = Encoders(fail_caption=describe(4, 5)[0])  # clip 5 is in partition 1 = [4, 8)
    with pytest.raises(
        PartitionsFailed,
        match=r"1 of 3 partitions failed -- part-00001 \(4 items, "
        r"procedural-4-000004 \.\. procedural-4-000007\): RuntimeError: simulated",
    ):
        prepare_partitioned(source, _cfg(source, 4), str(store), tmp_path / "ds", load_encoders=bad.load)
    assert len(_partition_dirs(store)) == 2 and not (tmp_path / "ds" / "index.json").exists()
    good = Encoders()
    summary, _ = prepare_partitioned(
        source, _cfg(source, 4), str(store), tmp_path / "ds", load_encoders=good.load
    )
    assert (good.clips, summary["partitions_encoded"], summary["partitions_cached"]) == (4, 1, 2)


def test_reader_checks_the_referenced_partition_manifest(tmp_path: Path) -> None:
    store, source = tmp_path / "store", "procedural:n=5,seed=0"
    prepare_partitioned(source, _cfg(source, 3), str(store), tmp_path / "ds", load_encoders=Encoders().load)
    assert len(_read_all(str(tmp_path / "ds"))["keys"]) == 5
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    index["shards"][-1]["manifest_sha256"] = "0" * 64  # the dataset was built over another partition manifest
    (tmp_path / "ds" / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match=r"partition artifact .*prepare_partition/.* has manifest sha256"):
        _read_all(str(tmp_path / "ds"))
    shutil.rmtree(index["shards"][0]["artifact"])  # a partition that is gone: named, not a crash
    index["shards"][-1]["manifest_sha256"] = index["partitions"][-1]["manifest_sha256"]
    (tmp_path / "ds" / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match=r"cannot read shard-00000.safetensors of the partition artifact"):
        _read_all(str(tmp_path / "ds"))


def test_partition_size_is_a_checked_setting_and_needs_a_store(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.partition_size"):
        apply_overrides(get_preset("tiny"), {"data.partition_size": -1})
    with pytest.raises(StageInputError, match=r"data.partition_size=4 needs a store"):
        run_stage(
            "prepare_data", out=str(tmp_path / "out"), overrides={"data.partition_size": 4}, progress=False
        )


@pytest.mark.slow
def test_redistill_window_encodes_only_the_partitions_holding_new_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anyflow.ops.redistill import prepare_window
    from anyflow.ops.window import plan_window
    from anyflow.stages import common

    real, clips = common.load_models, []

    def counting(cfg):  # the stage's own encoders, counting the clips the VAE encodes
        base = real(cfg)
        encode = base.vae.encode
        base.vae.encode = lambda x: (clips.append(x.shape[0]), encode(x))[1]
        return base

    monkeypatch.setattr(common, "load_models", counting)
    store, parts = str(tmp_path / "store"), {**GEOM, "data.partition_size": 4}
    w1 = plan_window("procedural:n=8,seed=5", None)
    prepare_window(w1, store, preset="tiny", overrides=parts)
    assert sum(clips) == 8 and len(_partition_dirs(tmp_path / "store")) == 2
    # next generation: clips 8, 9 are new (partition [8, 12)), 3 replay items come from partitions [0, 4), [4, 8)
    w2 = plan_window("procedural:n=10,seed=5", w1, replay_ratio=1.5)
    assert w2.new == ["procedural-5-000008", "procedural-5-000009"] and len(w2.replay) == 3
    clips.clear()
    d2 = prepare_window(w2, store, preset="tiny", overrides=parts)
    assert sum(clips) == 2 and len(_partition_dirs(tmp_path / "store")) == 3  # only the new items' partition
    got = _read_all(d2)
    assert got["keys"] == w2.selected
    # reference: the same window prepared without partitions (all 5 selected clips encoded in one run)
    ref = _read_all(prepare_window(w2, store, preset="tiny", overrides=GEOM))
    assert ref["keys"] == got["keys"] and ref["captions"] == got["captions"]
    assert torch.equal(got["text"], ref["text"]) and torch.equal(got["negative"], ref["negative"])
    torch.testing.assert_close(got["latents"], ref["latents"])  # other VAE batches: float32 tolerances
    assert {p["uri"] for p in storage.read_manifest(d2)["parents"]} <= {
        str(p) for p in (tmp_path / "store" / "artifacts" / PARTITION_STAGE).iterdir()
    }


def test_bad_input_in_partitions_is_exit_2_naming_them(tmp_path: Path) -> None:
    from anyflow.data.partitions import PartitionsBadInput
    from anyflow.errors import classify_failure

    rows = [{"video": "a.mp4", "caption": "a"}, {"video": "b.mp4"}, {"video": "c.mp4", "caption": "c"}]
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = str(tmp_path / "index.jsonl")
    cfg = _cfg(source, 2, **{"data.strict": True})  # partitions [a, b] and [c]; no video exists
    with pytest.raises(
        PartitionsBadInput,
        match=r"2 of 2 partitions failed -- part-00000 \(2 items, a.mp4 \.\. "
        r"b.mp4\): DataPrepError: clip 'a.mp4' is unusable: missing_video.*part-00001",
    ) as err:
        prepare_partitioned(
            source, cfg, str(tmp_path / "store"), tmp_path / "ds", load_encoders=Encoders().load
        )
    assert classify_failure(err.value)[0] == 2


_KILLED_ENCODER = """
import sys, time
from pathlib import Path
from anyflow.config import apply_overrides, get_preset
from anyflow.data.partitions import encode_partition, plan_partitions

source, store, marker = sys.argv[1:4]
cfg = apply_overrides(get_preset("tiny"), {**GEOM, "data.source": source, "data.partition_size": 4})

def hang(*_):
    Path(marker).touch()
    time.sleep(600)

encode_partition(source, plan_partitions(source, 4)[0], cfg, store, load_encoders=lambda: (hang, hang))
"""


def test_a_killed_encoders_staging_is_removed_by_the_next_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """encode_partition stages in anyflow._storage_io.private_dir under the prepare_partition work folder: an
    encoder killed with SIGKILL (a pod's OOM kill) leaves its folder, and the next encoder removes it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from anyflow.data.partitions import encode_partition

    work, store, source = tmp_path / "work", tmp_path / "store", "procedural:n=8,seed=2"
    monkeypatch.setenv("ANYFLOW_WORK_DIR", str(work))
    marker = tmp_path / "encoding"
    script = f"GEOM = {GEOM!r}\n" + _KILLED_ENCODER
    child = subprocess.Popen(
        [sys.executable, "-c", script, source, str(store), str(marker)],
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the encoder never started (exit {child.poll()})"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    leaked = list((work / PARTITION_STAGE).glob("partition-*"))
    # the dead encoder's folder, left behind
    assert len(leaked) == 1 and (leaked[0] / ".lock").is_file(), leaked
    cfg = _cfg(source, 4)
    url, cached = encode_partition(
        source, plan_partitions(source, 4)[0], cfg, str(store), load_encoders=Encoders().load
    )
    assert not cached and storage.read_manifest(url)["kind"] == "dataset_partition"
    assert not leaked[0].exists() and not list((work / PARTITION_STAGE).iterdir())
    # its manifest metrics: the scalar fields of its summary.json (counts and the source) plus the run's timing
    # (kept out of summary.json), as the prepare_data stage and the re-distillation window publish theirs (one
    # filter, anyflow.data.prepare.summary_metrics)
    summary = json.loads(storage.fetch_file(url, "summary.json").read_bytes())
    scalars = {k: v for k, v in summary.items() if type(v) in (int, float, str)}
    metrics = storage.read_manifest(url)["metrics"]
    assert {k: metrics.get(k) for k in scalars} == scalars
    assert set(metrics) - set(scalars) == {"seconds", "clips_per_s"}
    assert scalars["clips_written"] == 4 and "source" in scalars
