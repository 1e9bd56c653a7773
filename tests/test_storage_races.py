"""Concurrent writers of one local artifact folder, and cache keys that depend on content only (issue 22, item 3
leftovers: local publish, and ``created_at`` in the keys).

Two processes publish different contents to one local folder at the same moment, many times over, while a third
process keeps verifying the folder: no reader ever accepts a mixed artifact, the folder ends as exactly one
writer's complete artifact, each writer is told what stands there, and no staging folder is left behind.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from anyflow import storage

CTX = mp.get_context("fork")


def _contents(writer: int) -> dict[str, bytes]:
    """Each writer: some files of the same names with other bytes, and one file of its own."""
    rnd = hashlib.sha256(f"writer-{writer}".encode()).digest()
    files = {f"shards/part-{i}.bin": rnd * (2048 * (i + 1)) for i in range(3)}
    files[f"only-{writer}.bin"] = rnd * 512
    return files


def _expected(writer: int) -> dict[str, tuple[int, str]]:
    return {rel: (len(b), hashlib.sha256(b).hexdigest()) for rel, b in _contents(writer).items()}


def _writer(writer: int, src: Path, dst: Path, go: mp.Event, out: mp.Queue) -> None:
    for rel, data in _contents(writer).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    go.wait(30)
    try:
        m = storage.publish(src, dst, kind="dataset", config={"writer": writer})
        out.put((writer, {r: (e["size"], e["sha256"]) for r, e in m["files"].items()}))
    except Exception as exc:  # the test reports it
        out.put((writer, f"{type(exc).__name__}: {exc}"))


def _reader(dst: Path, stop: mp.Event, out: mp.Queue) -> None:
    accepted, refused, bad = 0, 0, []
    while not stop.is_set():
        try:
            m = storage.verify(dst)
        except (storage.ArtifactError, FileNotFoundError):
            refused += 1
            continue
        files = {r: (e["size"], e["sha256"]) for r, e in m["files"].items() if r != "config.json"}
        if files not in (_expected(0), _expected(1)):
            bad.append(sorted(files))
        accepted += 1
    out.put((accepted, refused, bad))


def race(root: Path, trial: int) -> dict:
    """One race of two writers and a reader on ``root/art-<trial>``; returns what each saw."""
    dst = root / f"art-{trial}"
    go, stop, out, seen = CTX.Event(), CTX.Event(), CTX.Queue(), CTX.Queue()
    writers = [CTX.Process(target=_writer, args=(w, root / f"src-{trial}-{w}", dst, go, out)) for w in (0, 1)]
    reader = CTX.Process(target=_reader, args=(dst, stop, seen))
    for p in (*writers, reader):
        p.start()
    time.sleep(0.05)
    go.set()
    results = dict(out.get(timeout=60) for _ in writers)
    for p in writers:
        p.join(30)
    stop.set()
    accepted, refused, bad = seen.get(timeout=60)
    reader.join(30)
    return {"dst": dst, "results": results, "accepted": accepted, "refused": refused, "bad": bad}


def test_two_local_writers_race_and_one_complete_artifact_stands(tmp_path: Path) -> None:
    trials, served_broken, final_broken, told_wrong = 30, [], [], []
    reads = 0
    for trial in range(trials):
        r = race(tmp_path, trial)
        reads += r["accepted"]
        served_broken += r["bad"]
        try:
            final = storage.verify(r["dst"])
        except storage.ArtifactError as exc:
            final_broken.append(str(exc))
            continue
        files = {k: (e["size"], e["sha256"]) for k, e in final["files"].items()}
        content = {k: v for k, v in files.items() if k != "config.json"}
        if content not in (_expected(0), _expected(1)):
            final_broken.append(f"trial {trial}: mixed content {sorted(content)}")
        for w, got in r["results"].items():
            own = {k: v for k, v in got.items() if k != "config.json"} if isinstance(got, dict) else None
            # each writer returns the artifact that stood when it finished: what stands now, or its own (committed
            # first, then replaced by a writer that started after that commit: on a loaded machine they need not overlap)
            if got != files and own != _expected(w):
                told_wrong.append(f"trial {trial} writer {w}: {got if isinstance(got, str) else sorted(got)}")
        assert not (r["dst"] / storage.STAGING).exists() or not any((r["dst"] / storage.STAGING).iterdir()), (
            f"trial {trial}: a writer's staging folder was left behind"
        )
    assert (served_broken, final_broken, told_wrong) == ([], [], []), (
        f"{len(final_broken)}/{trials} races left a broken artifact, readers accepted {len(served_broken)} mixed "
        f"ones, {len(told_wrong)} writers were told another artifact than the one that stands: "
        f"{(final_broken + told_wrong + [str(b) for b in served_broken])[:4]}"
    )
    assert reads > 0, "the reader never saw a complete artifact: the race was not observed"


def test_a_killed_local_writers_staging_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    """A writer SIGKILLed while staging leaves ``.anyflow-staging/<writer>/``; the next publish of that folder
    removes it (its lock died with the process), and the folder verifies."""
    src, dst = tmp_path / "src", tmp_path / "art"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 4096)
    ready = CTX.Event()

    def stuck() -> None:
        with storage.local_staging(dst) as stage:
            (stage / "half.bin").write_bytes(b"h" * 1024)
            ready.set()
            time.sleep(60)

    p = CTX.Process(target=stuck)
    p.start()
    assert ready.wait(30)
    live = list((dst / storage.STAGING).iterdir())
    storage.publish(src, dst, kind="dataset")  # a live writer's staging is never removed
    assert list((dst / storage.STAGING).iterdir()) == live
    storage.verify(dst)  # nor does it make the artifact unverifiable
    os.kill(p.pid, 9)
    p.join(10)
    storage.publish(src, dst, kind="dataset")
    assert list((dst / storage.STAGING).iterdir()) == []
    assert set(storage.verify(dst)["files"]) == {"a.bin", "config.json"}


# ------------------------------------------------------------------- cache keys depend on content only
def _dataset(root: Path, payload: bytes) -> Path:
    (root / "shards").mkdir(parents=True, exist_ok=True)
    (root / "shards" / "shard-00000.safetensors").write_bytes(payload)
    return root


@pytest.mark.parametrize("where", ["local", "s3"])
def test_republished_identical_content_keeps_the_downstream_key(
    where: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same dataset published again later (another ``created_at``; on S3 also another writer's staging
    objects) gives train_teacher the same key; one changed byte gives another. Before, the key hashed the input's
    manifest bytes, so every re-publish changed every downstream key."""
    from anyflow.stages import _resolve

    url = request.getfixturevalue("s3_prefix") + "/data" if where == "s3" else str(tmp_path / "data")
    src = _dataset(tmp_path / "src", b"\x01" * 4096)

    def key() -> str:
        return _resolve("train_teacher", "tiny", None, {"dataset": url}, 1)[3]

    monkeypatch.setattr(storage.time, "gmtime", lambda *a: time.struct_time((2026, 1, 1, 0, 0, 0, 3, 1, 0)))
    storage.publish(src, url, kind="dataset", config={"n": 1})
    first, first_manifest = key(), storage.manifest_digest(url)
    monkeypatch.setattr(
        storage.time, "gmtime", lambda *a: time.struct_time((2026, 6, 1, 12, 0, 0, 0, 152, 0))
    )
    storage.publish(src, url, kind="dataset", config={"n": 1})
    assert storage.manifest_digest(url) != first_manifest  # control: the manifest did change (created_at)
    assert key() == first, "re-publishing identical content changed the downstream cache key"
    _dataset(src, b"\x01" * 4095 + b"\x02")
    storage.publish(src, url, kind="dataset", config={"n": 1})
    assert key() != first, "a changed file must change the downstream key"
