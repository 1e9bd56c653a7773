"""anyflow.storage against a real S3 server (moto, 127.0.0.1) and local directories."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from anyflow import storage
from anyflow.storage import ArtifactError


def make_artifact_dir(root: Path, *, seed: int = 0, mb: float = 4.0) -> Path:
    """A checkpoint-like folder: a multi-MB safetensors file, a small one in a subfolder, a text file."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    save_file({"w": rng.standard_normal(int(mb * 2**20 / 4), dtype=np.float32)}, str(root / "model.safetensors"))
    (root / "ema").mkdir(exist_ok=True)
    save_file({"b": rng.standard_normal((3, 5), dtype=np.float32)}, str(root / "ema" / "ema.safetensors"))
    (root / "notes.txt").write_text(f"seed {seed}\n")
    return root


def stored(url: str, rel: str) -> str:
    """Where the artifact at ``url`` stores its file ``rel`` (S3 writers stage under their own prefix)."""
    return storage.join(url, storage.read_manifest(url)["files"][rel].get("object", rel))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=["local", "s3"])
def art_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A destination URL: a local folder or a fresh S3 prefix."""
    if request.param == "local":
        return str(tmp_path / "published")
    return request.getfixturevalue("s3_prefix")


def test_url_helpers(tmp_path: Path) -> None:
    assert storage.is_remote("s3://b/k") and not storage.is_remote(tmp_path) and not storage.is_remote("file:///x")
    assert storage.join("s3://b/a/", "c", "/d.json") == "s3://b/a/c/d.json"
    assert storage.join(tmp_path, "x", "y") == str(tmp_path / "x" / "y")
    storage.write_json_atomic(storage.join(tmp_path, "a", "b.json"), {"k": [1, 2]})
    assert storage.read_json(tmp_path / "a" / "b.json") == {"k": [1, 2]}
    assert [p for p in (tmp_path / "a").iterdir()] == [tmp_path / "a" / "b.json"]  # no temp file left
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        storage.read_json(tmp_path / "nope.json")


@pytest.mark.s3
def test_s3_url_helpers(s3_prefix: str, tmp_path: Path) -> None:
    url = storage.join(s3_prefix, "x", "doc.json")
    assert not storage.exists(url)
    storage.write_json_atomic(url, {"a": 1})
    assert storage.exists(url) and storage.exists(storage.join(s3_prefix, "x"))
    assert storage.read_json(url) == {"a": 1}
    assert storage.list_prefix(s3_prefix) == [url]
    with storage.open_url(url) as f:
        assert json.loads(f.read()) == {"a": 1}
    fs, path = storage.fs_and_path(url)
    assert fs.cat_file(path) == storage.read_bytes(url)
    (tmp_path / "f.bin").write_bytes(b"abc" * 1000)
    storage.copy_file(tmp_path / "f.bin", storage.join(s3_prefix, "f.bin"))
    storage.copy_file(storage.join(s3_prefix, "f.bin"), storage.join(s3_prefix, "g.bin"))
    storage.copy_file(storage.join(s3_prefix, "g.bin"), tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == b"abc" * 1000


@pytest.mark.s3
def test_round_trip_through_s3_readable_by_plain_boto3(s3_server, s3_prefix: str, tmp_path: Path) -> None:
    src = make_artifact_dir(tmp_path / "src")
    parent_dir = make_artifact_dir(tmp_path / "parent", seed=1, mb=0.1)
    parent = storage.join(s3_prefix, "parent")
    storage.publish(parent_dir, parent, kind="base")
    url = storage.join(s3_prefix, "ckpt")
    m = storage.publish(src, url, kind="teacher", parents=[parent], config={"lr": 1e-4},
                        metrics={"loss": 0.5}, extra={"step": 2})

    # the documented keys (each file at its manifest entry's "object"), read by a client that knows nothing
    # about anyflow
    bucket, key = url[5:].split("/", 1)
    client = s3_server.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=key + "/")["Contents"])
    rels = ["config.json", "ema/ema.safetensors", "model.safetensors", "notes.txt"]
    assert sorted(m["files"]) == rels
    assert keys == sorted([f"{key}/manifest.json", *(f"{key}/{m['files'][r]['object']}" for r in rels)])
    raw_manifest = client.get_object(Bucket=bucket, Key=f"{key}/manifest.json")["Body"].read()
    assert hashlib.sha256(raw_manifest).hexdigest() == storage.manifest_digest(url)
    assert json.loads(raw_manifest) == m
    for rel in ("model.safetensors", "ema/ema.safetensors", "notes.txt"):
        body = client.get_object(Bucket=bucket, Key=f"{key}/{m['files'][rel]['object']}")["Body"].read()
        assert body == (src / rel).read_bytes()
        assert m["files"][rel] == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                                   "object": m["files"][rel]["object"]}
    cfg_key = f"{key}/{m['files']['config.json']['object']}"
    assert json.loads(client.get_object(Bucket=bucket, Key=cfg_key)["Body"].read()) == {"lr": 1e-4}
    assert m["kind"] == "teacher" and m["metrics"] == {"loss": 0.5} and m["extra"] == {"step": 2}
    assert m["parents"] == [{"uri": parent, "manifest_sha256": storage.manifest_digest(parent), "kind": "base",
                             "content_sha256": storage.content_digest(parent)}]
    assert m["code_version"]["anyflow"] and m["schema_version"] == 1

    local = storage.fetch(url, cache_dir=tmp_path / "cache")
    assert local.name == storage.manifest_digest(url)
    for rel in ("model.safetensors", "ema/ema.safetensors", "notes.txt"):
        assert sha(local / rel) == sha(src / rel)
    np.testing.assert_array_equal(load_file(str(local / "model.safetensors"))["w"],
                                  load_file(str(src / "model.safetensors"))["w"])
    one = storage.fetch_file(url, "ema/ema.safetensors", cache_dir=tmp_path / "cache2")
    assert sha(one) == sha(src / "ema" / "ema.safetensors")
    again = storage.publish(local, storage.join(s3_prefix, "copy"), kind="teacher")  # cache internals excluded
    content = lambda files: {r: (e["size"], e["sha256"]) for r, e in files.items()}  # noqa: E731
    assert content(again["files"]) == content(m["files"])
    chain = storage.lineage(url)
    assert [(c["uri"], c["depth"], c["ok"]) for c in chain] == [(url, 0, None), (parent, 1, True)]


def test_publish_in_place_hashes_without_copying(tmp_path: Path) -> None:
    src = make_artifact_dir(tmp_path / "art", mb=0.5)
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*") if p.is_file()}
    m = storage.publish(src, src, kind="dataset")
    assert {p: p.stat().st_mtime_ns for p in before} == before  # files untouched
    assert m["files"]["model.safetensors"]["sha256"] == sha(src / "model.safetensors")
    assert storage.fetch(src) == src.absolute() and storage.verify(src) == m


def test_rerun_overwrites_cleanly_and_deletes_stale_files(art_url: str, tmp_path: Path) -> None:
    v1 = make_artifact_dir(tmp_path / "v1", seed=1, mb=0.2)
    storage.publish(v1, art_url, kind="x")
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "model.safetensors").write_bytes((v1 / "model.safetensors").read_bytes()[::-1])
    m2 = storage.publish(v2, art_url, kind="x")
    assert sorted(m2["files"]) == ["config.json", "model.safetensors"]
    rels = sorted(u[len(art_url.rstrip("/")) + 1:] for u in storage.list_prefix(art_url))
    assert rels == sorted(["manifest.json", *(e.get("object", r) for r, e in m2["files"].items())])
    assert storage.verify(art_url) == m2


@pytest.mark.parametrize("damage", ["flip", "missing_file", "missing_manifest", "truncated"])
def test_corruption_is_refused_naming_url_and_file(art_url: str, tmp_path: Path, damage: str) -> None:
    src = make_artifact_dir(tmp_path / "src", mb=1.0)
    storage.publish(src, art_url, kind="x")
    target = stored(art_url, "model.safetensors")
    data = bytearray(storage.read_bytes(target))
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        storage.write_bytes(target, bytes(data))
        expect = "sha256 mismatch"
    elif damage == "missing_file":
        storage.delete([target])
        expect = "missing"
    elif damage == "truncated":
        storage.write_bytes(target, bytes(data[: len(data) // 3]))
        expect = "truncated"
    else:
        target = storage.join(art_url, "manifest.json")
        storage.delete([target])
        expect = "manifest.json is missing"
    named = storage.join(art_url, "model.safetensors") if damage != "missing_manifest" else art_url
    for read in (storage.verify, lambda u: storage.fetch(u, cache_dir=tmp_path / "cache"),
                 lambda u: storage.fetch_file(u, "model.safetensors", cache_dir=tmp_path / "c2")):
        with pytest.raises(ArtifactError) as err:
            read(art_url)
        assert expect in str(err.value) and named in str(err.value)
    if damage != "missing_manifest":  # the undamaged file still verifies on its own
        assert storage.fetch_file(art_url, "notes.txt", cache_dir=tmp_path / "c3").read_text() == "seed 0\n"


def test_directory_without_manifest_or_with_foreign_json_is_not_an_artifact(tmp_path: Path) -> None:
    make_artifact_dir(tmp_path / "a", mb=0.1)
    with pytest.raises(ArtifactError, match=r"manifest.json is missing"):
        storage.read_manifest(tmp_path / "a")
    (tmp_path / "a" / "manifest.json").write_text('{"hello": 1}')
    with pytest.raises(ArtifactError, match=r"not an anyflow manifest"):
        storage.verify(tmp_path / "a")
    with pytest.raises(ArtifactError, match="parent"):
        storage.publish(tmp_path / "a", tmp_path / "b", kind="x", parents=[str(tmp_path / "parent")])


@pytest.mark.s3
def test_mirror_downloads_prefix_once(s3_prefix: str, tmp_path: Path) -> None:
    src = make_artifact_dir(tmp_path / "model", mb=0.5)
    for p in src.rglob("*"):
        if p.is_file():
            storage.copy_file(p, storage.join(s3_prefix, p.relative_to(src).as_posix()))
    first = storage.mirror(s3_prefix, cache_dir=tmp_path / "cache")
    assert sha(first / "model.safetensors") == sha(src / "model.safetensors")
    assert sha(first / "ema" / "ema.safetensors") == sha(src / "ema" / "ema.safetensors")
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert storage.mirror(s3_prefix, cache_dir=tmp_path / "cache") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    storage.write_bytes(storage.join(s3_prefix, "notes.txt"), b"changed")  # new listing -> new entry
    second = storage.mirror(s3_prefix, cache_dir=tmp_path / "cache")
    assert second != first and (second / "notes.txt").read_bytes() == b"changed"
    assert storage.mirror(src) == src.absolute()


def test_cli_show_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import argparse

    from anyflow.cli import artifacts

    parser = argparse.ArgumentParser()
    artifacts.add_cli(parser.add_subparsers())
    parent, child = tmp_path / "p", tmp_path / "c"
    storage.publish(make_artifact_dir(parent, mb=0.1), parent, kind="base")
    storage.publish(make_artifact_dir(tmp_path / "csrc", mb=0.1), child, kind="distill", parents=[str(parent)])
    args = parser.parse_args(["artifacts", "show", str(child)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "distill" in out and str(parent) in out and "[hash matches]" in out
    args = parser.parse_args(["artifacts", "verify", str(child)])
    assert args.func(args) == 0
    (child / "notes.txt").write_text("tampered")
    assert args.func(args) == 1
    assert "notes.txt" in capsys.readouterr().err


# --------------------------------------------------- concurrent writers, verified cache hits (issue 22 item 3)
def _s3_artifact_state(client: object, url: str) -> list[str]:
    """What is wrong with the artifact at ``url``, read with plain boto3 (independent of anyflow.storage)."""
    bucket, key = url.split("://", 1)[1].split("/", 1)
    m = json.loads(client.get_object(Bucket=bucket, Key=f"{key}/manifest.json")["Body"].read())
    bad = []
    for rel, e in m["files"].items():
        body = client.get_object(Bucket=bucket, Key=f"{key}/{e.get('object', rel)}")["Body"].read()
        if len(body) != e["size"] or hashlib.sha256(body).hexdigest() != e["sha256"]:
            bad.append(rel)
    return bad


@pytest.mark.s3
def test_two_concurrent_publishers_leave_one_complete_artifact(s3_server, s3_prefix: str, tmp_path: Path) -> None:
    import threading

    srcs = []
    for w in range(2):
        src = tmp_path / f"w{w}"
        src.mkdir()
        for i in range(6):
            (src / f"part{i}.bin").write_bytes(bytes([w]) * (300_000 + 1000 * i))
        srcs.append(src)
    broken = []
    for rnd in range(6):
        url = f"{s3_prefix}/round{rnd}"
        barrier, results, errors = threading.Barrier(2), [None, None], []

        def go(w: int, url: str = url, barrier: threading.Barrier = barrier, results: list = results,
               errors: list = errors) -> None:
            barrier.wait()
            try:
                results[w] = storage.publish(srcs[w], url, kind="x", extra={"writer": w})
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors  # both writers exit 0
        bad = _s3_artifact_state(s3_server.client(), url)
        if bad:
            broken.append((rnd, bad))
        else:
            live = storage.verify(url)
            assert results[0] == results[1] == live  # the loser returns the winner's artifact
            writer = live["extra"]["writer"]
            out = storage.fetch(url, cache_dir=tmp_path / "cache")
            assert all((out / f"part{i}.bin").read_bytes() == (srcs[writer] / f"part{i}.bin").read_bytes()
                       for i in range(6))
    assert broken == [], f"rounds left a broken artifact: {broken}"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupted_cache_hit_is_not_served(art_url: str, tmp_path: Path, s3_server, damage: str) -> None:
    from anyflow.stages import _cached_manifest

    src = make_artifact_dir(tmp_path / "src")
    m = storage.publish(src, art_url, kind="x", extra={"cache_key": "k1"})
    rel = "model.safetensors"

    def corrupt() -> None:
        if storage.is_remote(art_url):
            bucket, key = art_url.split("://", 1)[1].split("/", 1)
            obj = f"{key}/{m['files'][rel].get('object', rel)}"
            c = s3_server.client()
            data = bytearray(c.get_object(Bucket=bucket, Key=obj)["Body"].read())
        else:
            data = bytearray((Path(art_url) / rel).read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[:-10]
        if storage.is_remote(art_url):
            c.put_object(Bucket=bucket, Key=obj, Body=bytes(data))
        else:
            (Path(art_url) / rel).write_bytes(bytes(data))

    if damage == "truncate":  # a hit already verified in this process: the size is still checked
        assert _cached_manifest(art_url, "k1") == m
    corrupt()
    assert _cached_manifest(art_url, "k1") is None


def test_file_url_names_where_a_file_is_stored(s3_server, s3_prefix: str, tmp_path: Path) -> None:
    # On S3 a file lives under its publisher's staging prefix; the URL handed to a person (the report's) or to
    # a reader must be that object, read back here with plain boto3, not <artifact>/<name>.
    src = make_artifact_dir(tmp_path / "src", mb=0.1)
    url = storage.join(s3_prefix, "report")
    storage.publish(src, url, kind="report")
    where = storage.file_url(url, "notes.txt")
    bucket, key = where[5:].split("/", 1)
    assert s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read() == (src / "notes.txt").read_bytes()
    local = tmp_path / "local"
    storage.publish(src, local, kind="report")
    assert Path(storage.file_url(local, "notes.txt")).read_bytes() == (src / "notes.txt").read_bytes()
    with pytest.raises(storage.ArtifactError, match="not listed"):
        storage.file_url(url, "nothere.txt")
