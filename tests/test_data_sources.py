"""Raw clip sources: real mp4 files (written here with imageio-ffmpeg), sidecars, indexes, tars, S3."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from anyflow.data.procedural import make_clip
from anyflow.data.sources import RawClip, SkippedRecord, open_source, parse_procedural
from anyflow.data.video import ClipError, VideoSpec, decode_video, source_indices, write_video

SPEC = VideoSpec(frames=5, fps=8, height=32, width=32)


def _clip_frames(index: int, frames: int = 12, size: int = 32) -> np.ndarray:
    return make_clip(5, index, frames=frames, height=size, width=size).video


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """good (12 frames @ 16 fps ≥ the 9 source frames SPEC needs), short (3 frames), small (8x8), broken."""
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for name, video in [("good_a", _clip_frames(0)), ("good_b", _clip_frames(1)), ("good_c", _clip_frames(2)),
                        ("short", _clip_frames(3, frames=3)), ("small", _clip_frames(4)[:, ::4, ::4])]:
        write_video(root / f"{name}.mp4", video, fps=16)
        out[name] = root / f"{name}.mp4"
    good = out["good_a"].read_bytes()
    (root / "broken.mp4").write_bytes(good[: len(good) // 3][:64] + b"\x00garbage" * 50)
    out["broken"] = root / "broken.mp4"
    return out


def _folder(videos: dict[str, Path], root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("good_a", "good_b", "broken", "short", "small", "good_c"):
        (root / f"{name}.mp4").write_bytes(videos[name].read_bytes())
    (root / "good_a.txt").write_text("a red circle moving left\n")
    (root / "good_b.json").write_text(json.dumps({"captions": ["a blue square moving up", "second caption"]}))
    for name in ("broken", "short", "small"):
        (root / f"{name}.txt").write_text(f"caption of {name}")
    (root / "orphan.txt").write_text("a caption without its video")  # and good_c has no caption
    return root


def _check_folder_records(records: list, expect_keys: dict[str, str]) -> dict[str, torch.Tensor]:
    clips = {r.key: r for r in records if isinstance(r, RawClip)}
    skips = {r.key: r.reason for r in records if isinstance(r, SkippedRecord)}
    assert {k: c.caption for k, c in clips.items()} == expect_keys
    assert skips == {"good_c.mp4": "missing_caption", "orphan": "missing_video"}
    reasons, loaded = {}, {}
    for key, clip in clips.items():
        try:
            loaded[key] = clip.load(SPEC)
        except ClipError as e:
            assert e.key == key and key in str(e)
            reasons[key] = e.reason
    assert reasons == {"broken.mp4": "undecodable", "short.mp4": "too_short", "small.mp4": "wrong_size"}
    return loaded


FOLDER_CAPTIONS = {
    "good_a.mp4": "a red circle moving left", "good_b.mp4": "a blue square moving up",
    "broken.mp4": "caption of broken", "short.mp4": "caption of short", "small.mp4": "caption of small",
}


def test_decode_resamples_by_timestamp_and_resizes(tmp_path: Path) -> None:
    # Frame t is a flat grey of level 8·t (flat frames survive H.264 almost exactly).
    levels = 8 * np.arange(24) + 20
    video = np.broadcast_to(levels[:, None, None, None], (24, 32, 48, 3)).astype(np.uint8)
    write_video(tmp_path / "ramp.mp4", video, fps=24)
    spec = VideoSpec(frames=7, fps=10, height=16, width=24)
    x = decode_video(tmp_path / "ramp.mp4", spec)
    assert x.shape == (3, 7, 16, 24) and x.dtype == torch.float32
    want = [round(k / 10 * 24) for k in range(7)]  # nearest source frame to each target timestamp
    assert source_indices(7, 10, 24) == want == [0, 2, 5, 7, 10, 12, 14]
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)).numpy(), levels[want] / 127.5 - 1, atol=3 / 127.5)
    assert decode_video((tmp_path / "ramp.mp4").read_bytes(), spec).equal(x)
    with pytest.raises(ClipError, match="too_short"):
        decode_video(tmp_path / "ramp.mp4", VideoSpec(frames=12, fps=10, height=16, width=24))


def test_folder_source_yields_good_and_skips_bad_with_reasons(videos: dict[str, Path], tmp_path: Path) -> None:
    root = _folder(videos, tmp_path / "clips")
    loaded = _check_folder_records(list(open_source(str(root))), FOLDER_CAPTIONS)
    x = loaded["good_a.mp4"]
    assert x.shape == (3, 5, 32, 32) and -1 <= x.min() and x.max() <= 1
    # Decoded frames match the frames that were encoded (lossy codec: loose tolerance), at the resampled indices.
    ref = torch.from_numpy(_clip_frames(0)[source_indices(5, 8, 16)]).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert (x - ref).abs().mean() < 0.05


def test_index_sources_csv_and_jsonl(videos: dict[str, Path], tmp_path: Path) -> None:
    root = _folder(videos, tmp_path / "clips")
    (root / "index.csv").write_text(
        "video,caption\ngood_a.mp4,first\n" f"{root / 'good_b.mp4'},second\nshort.mp4,third\ngood_c.mp4,\nmissing.mp4,gone\n"
    )
    (root / "index.jsonl").write_text(
        '{"video": "good_a.mp4", "captions": ["one", "two"]}\nnot json\n{"caption": "no video"}\n{"video": "good_b.mp4", "caption": "b"}\n'
    )
    csv_records = list(open_source(str(root / "index.csv")))
    assert [(type(r).__name__, r.key) for r in csv_records] == [
        ("RawClip", "good_a.mp4"), ("RawClip", str(root / "good_b.mp4")), ("RawClip", "short.mp4"),
        ("SkippedRecord", "good_c.mp4"), ("RawClip", "missing.mp4")]
    assert csv_records[3].reason == "missing_caption"
    assert [r.caption for r in csv_records if isinstance(r, RawClip)] == ["first", "second", "third", "gone"]
    assert csv_records[0].load(SPEC).shape == (3, 5, 32, 32)
    with pytest.raises(ClipError, match="missing_video"):
        csv_records[4].load(SPEC)
    jsonl = list(open_source(str(root / "index.jsonl")))
    assert [(r.key, getattr(r, "caption", None) or r.reason) for r in jsonl] == [
        ("good_a.mp4", "one"), ("line 2", "bad_metadata"), ("line 3", "bad_metadata"), ("good_b.mp4", "b")]
    assert jsonl[3].load(SPEC).equal(csv_records[1].load(SPEC))


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar_source(videos: dict[str, Path], tmp_path: Path) -> None:
    good = videos["good_a"].read_bytes()
    shards = tmp_path / "wds"
    shards.mkdir()
    _tar(shards / "shard-000.tar", [
        ("clips/000.mp4", good), ("clips/000.json", json.dumps({"captions": ["first caption", "alt"]}).encode()),
        ("clips/001.mp4", videos["broken"].read_bytes()), ("clips/001.json", b'{"captions": ["b"]}'),
        ("clips/002.mp4", good), ("clips/002.json", b'{"url": "no caption here"}'),
    ])
    _tar(shards / "shard-001.tar", [("003.mp4", good), ("003.txt", b"a txt caption"), ("004.json", b'{"caption": "x"}')])
    records = list(open_source(str(shards)))
    summary = [(r.key, r.caption if isinstance(r, RawClip) else r.reason) for r in records]
    assert summary == [("clips/000", "first caption"), ("clips/001", "b"), ("clips/002", "missing_caption"),
                       ("003", "a txt caption"), ("004", "missing_video")]
    assert records[0].load(SPEC).equal(decode_video(videos["good_a"], SPEC))
    with pytest.raises(ClipError, match="undecodable"):
        records[1].load(SPEC)
    assert [r.key for r in open_source(str(shards / "shard-001.tar"))] == ["003", "004"]


def test_procedural_source_spec() -> None:
    records = list(open_source("procedural:n=3,seed=7"))
    assert [r.key for r in records] == ["procedural-7-000000", "procedural-7-000001", "procedural-7-000002"]
    x = records[1].load(VideoSpec(frames=5, fps=8, height=16, width=24))
    ref = make_clip(7, 1, frames=5, height=16, width=24)
    assert records[1].caption == ref.caption
    assert torch.equal(x, torch.from_numpy(ref.video).permute(3, 0, 1, 2).float() / 127.5 - 1)
    assert parse_procedural("procedural") == {"n": 32, "seed": 0}
    with pytest.raises(ValueError, match="colour=red"):
        parse_procedural("procedural:n=3,colour=red")


@pytest.mark.s3
def test_s3_prefix_source_matches_local(videos: dict[str, Path], tmp_path: Path, s3_server, s3_prefix: str) -> None:
    root = _folder(videos, tmp_path / "clips")
    client = s3_server.client()
    bucket, prefix = s3_prefix.removeprefix("s3://").split("/", 1)
    for path in sorted(root.iterdir()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/videos/{path.name}", Body=path.read_bytes())
    remote = _check_folder_records(list(open_source(f"{s3_prefix}/videos")), FOLDER_CAPTIONS)
    local = _check_folder_records(list(open_source(str(root))), FOLDER_CAPTIONS)
    assert remote.keys() == local.keys() and all(remote[k].equal(local[k]) for k in local)
    # A webdataset tar and a CSV index on S3 read through the same storage layer.
    _tar(tmp_path / "s.tar", [("k.mp4", videos["good_b"].read_bytes()), ("k.json", b'{"captions": ["c"]}')])
    client.put_object(Bucket=bucket, Key=f"{prefix}/wds/s.tar", Body=(tmp_path / "s.tar").read_bytes())
    [rec] = list(open_source(f"{s3_prefix}/wds"))
    assert rec.caption == "c" and rec.load(SPEC).equal(local["good_b.mp4"])
    client.put_object(Bucket=bucket, Key=f"{prefix}/videos/index.csv", Body=b"video,caption\ngood_b.mp4,hello\n")
    [row] = list(open_source(f"{s3_prefix}/videos/index.csv"))
    assert row.caption == "hello" and row.load(SPEC).equal(local["good_b.mp4"])


class _FailingStream(io.RawIOBase):
    """A tar shard that reads fine for ``good`` bytes, then fails like the store would, or ends early."""

    def __init__(self, data: bytes, good: int, exc: BaseException | None) -> None:
        self.data, self.good, self.exc, self.pos = data, good, exc, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.pos >= self.good:
            if self.exc is not None:
                raise self.exc
            return 0
        n = min(len(buf), self.good - self.pos)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_tar_shard_store_failure_propagates_while_truncation_is_skipped() -> None:
    # A network/store error mid-shard must reach the stage (KFP retries it; it is not bad input, so no
    # FAILED.json marker), while a genuinely truncated shard is a skipped record.
    from anyflow.data import sources
    from anyflow.storage import StorageError

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            payload = b"x" * 4096
            info = tarfile.TarInfo(f"clip{i}.mp4")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    cut = 512 + 4096 + 700  # inside the second member

    def read(exc):
        tar = tarfile.open(fileobj=io.BufferedReader(_FailingStream(data, cut, exc)), mode="r|*")
        return list(sources._tar_samples(tar, "s3://bucket/shard-0.tar"))

    for exc in (StorageError("GET s3://bucket/shard-0.tar: connection reset"), ConnectionResetError("reset")):
        with pytest.raises(type(exc)):
            read(exc)
    records = read(None)  # the stream simply ends: a truncated shard
    assert isinstance(records[-1], SkippedRecord) and "truncated or corrupt" in records[-1].detail
