"""Transient and permanent S3 faults, the fetch cache, and a writer killed mid-upload.

A fault-injecting HTTP proxy (tests/s3server.py) sits between anyflow.storage and the moto server:
it answers 500/503/403, resets connections, or cuts a response body in half, for the requests we pick.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from s3server import FaultProxy

from anyflow import storage
from anyflow.storage import StorageError

pytestmark = pytest.mark.s3
MB = 2**20
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def proxy(s3_server) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_server.endpoint)
    yield p
    p.close()


@pytest.fixture
def via_proxy(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """Route anyflow.storage through the proxy; small multipart parts so big files go multipart."""
    monkeypatch.setenv("ANYFLOW_S3_MULTIPART_THRESHOLD", str(5 * MB))
    monkeypatch.setenv("ANYFLOW_S3_MULTIPART_CHUNKSIZE", str(5 * MB))
    proxy.clear()
    storage.configure(s3_endpoint=proxy.endpoint)
    yield proxy
    storage.configure(s3_endpoint=None)
    proxy.clear()


def make_src(root: Path, mb: float = 12.0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "model.safetensors").write_bytes(rng.bytes(int(mb * MB)))
    (root / "ema.safetensors").write_bytes(rng.bytes(300_000))
    (root / "notes.txt").write_text(f"seed {seed}")
    return root


def same_bytes(a: Path, b: Path) -> bool:
    return hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


@pytest.mark.parametrize("mode", ["500", "503", "reset"])
def test_transient_faults_are_retried_and_bytes_match(via_proxy: FaultProxy, s3_prefix: str, tmp_path: Path,
                                                      mode: str) -> None:
    src = make_src(tmp_path / "src")
    # fail two multipart part uploads and the first two downloads of the big file
    via_proxy.inject(mode, 2, lambda m, p: m == "PUT" and "model.safetensors" in p and "partNumber" in p)
    via_proxy.inject(mode, 2, lambda m, p: m == "GET" and "model.safetensors" in p)
    via_proxy.inject(mode, 1, lambda m, p: m == "PUT" and p.endswith("manifest.json"))
    m = storage.publish(src, s3_prefix, kind="x")
    out = storage.fetch(s3_prefix, cache_dir=tmp_path / "cache")
    assert via_proxy.injected == 5
    for rel in ("model.safetensors", "ema.safetensors", "notes.txt"):
        assert same_bytes(out / rel, src / rel)
    assert storage.verify(s3_prefix) == m


def test_body_cut_mid_transfer_resumes_with_a_ranged_get(via_proxy: FaultProxy, s3_prefix: str,
                                                         tmp_path: Path) -> None:
    src = make_src(tmp_path / "src", mb=6)
    storage.publish(src, s3_prefix, kind="x")
    via_proxy.clear()
    via_proxy.inject("truncate", 1, lambda m, p: m == "GET" and "model.safetensors" in p)
    out = storage.fetch(s3_prefix, cache_dir=tmp_path / "cache")
    assert same_bytes(out / "model.safetensors", src / "model.safetensors")
    gets = via_proxy.requests("GET", "model.safetensors")
    assert gets[0][2] is None and gets[-1][2] is not None and gets[-1][2].startswith("bytes=")
    assert int(gets[-1][2][6:-1]) > 0  # resumed from where the cut happened, not from zero


def test_permanent_errors_fail_fast_with_a_fix(via_proxy: FaultProxy, s3_prefix: str, tmp_path: Path) -> None:
    src = make_src(tmp_path / "src", mb=0.1)
    via_proxy.inject("403", 100)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"AccessDenied.*credentials") as err:
        storage.read_manifest(s3_prefix)
    assert s3_prefix in str(err.value) and time.monotonic() - t0 < 2.0
    assert len(via_proxy.requests()) == 1  # not retried
    via_proxy.clear()
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-anyflow' does not exist.*create the bucket"):
        storage.publish(src, "s3://no-such-bucket-anyflow/x", kind="x")
    with pytest.raises(StorageError, match=r"does not exist"):
        storage.read_manifest("s3://no-such-bucket-anyflow/x")
    assert len(via_proxy.requests()) == 2


def test_unreachable_endpoint_gives_up_with_a_clear_message(monkeypatch: pytest.MonkeyPatch, s3_server) -> None:
    from s3server import free_port

    monkeypatch.setenv("ANYFLOW_S3_RETRIES", "2")
    storage.configure(s3_endpoint=f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(StorageError, match=r"2 times.*reachable"):
            storage.read_manifest(f"s3://{s3_server.bucket}/x")
    finally:
        storage.configure(s3_endpoint=None)


def test_fetch_cache_downloads_once_and_resumes_a_partial_cache(via_proxy: FaultProxy, s3_prefix: str,
                                                                tmp_path: Path) -> None:
    src = make_src(tmp_path / "src", mb=3)
    storage.publish(src, s3_prefix, kind="x")
    cache = tmp_path / "cache"
    via_proxy.clear()
    first = storage.fetch(s3_prefix, cache_dir=cache)
    data_gets = lambda: [r for r in via_proxy.requests("GET") if not r[1].endswith("manifest.json")]  # noqa: E731
    assert len(data_gets()) == 4  # model, ema, notes, config
    via_proxy.clear()
    assert storage.fetch(s3_prefix, cache_dir=cache) == first
    assert data_gets() == []  # second fetch: only the manifest is read

    # a node killed mid-download: notes.txt never arrived, model.safetensors is a third done
    (first / "notes.txt").unlink()
    model = first / "model.safetensors"
    part = model.with_name(model.name + ".part")
    part.write_bytes(model.read_bytes()[: MB])
    model.unlink()
    via_proxy.clear()
    again = storage.fetch(s3_prefix, cache_dir=cache)
    assert again == first
    assert sorted(r[1].rsplit("/", 1)[-1] for r in data_gets()) == ["model.safetensors", "notes.txt"]
    assert via_proxy.requests("GET", "model.safetensors")[0][2] == f"bytes={MB}-"
    for rel in ("model.safetensors", "ema.safetensors", "notes.txt"):
        assert same_bytes(again / rel, src / rel)
    assert not part.exists()

    # a cached file damaged in place (same size) is trusted by default, repaired by recheck=True
    damaged = bytearray((again / "ema.safetensors").read_bytes())
    damaged[7] ^= 0xFF
    (again / "ema.safetensors").write_bytes(bytes(damaged))
    assert not same_bytes(storage.fetch(s3_prefix, cache_dir=cache) / "ema.safetensors", src / "ema.safetensors")
    assert same_bytes(storage.fetch(s3_prefix, cache_dir=cache, recheck=True) / "ema.safetensors",
                      src / "ema.safetensors")

    # a corrupt partial download is detected and downloaded again from scratch
    model.unlink()
    part.write_bytes(b"\0" * MB)
    assert same_bytes(storage.fetch(s3_prefix, cache_dir=cache) / "model.safetensors", src / "model.safetensors")


WRITER = textwrap.dedent("""
    import sys
    from anyflow import storage
    storage.publish(sys.argv[1], sys.argv[2], kind="checkpoint")
    print("PUBLISHED", flush=True)
""")


def test_writer_killed_mid_upload_leaves_no_accepted_artifact(via_proxy: FaultProxy, s3_prefix: str,
                                                              tmp_path: Path) -> None:
    old = make_src(tmp_path / "v1", mb=0.5, seed=1)
    storage.publish(old, s3_prefix, kind="checkpoint")
    new = make_src(tmp_path / "v2", mb=16, seed=2)
    env = {**os.environ, "AWS_ENDPOINT_URL": via_proxy.endpoint, "PYTHONPATH": str(REPO),
           "ANYFLOW_S3_CONCURRENCY": "2"}
    via_proxy.clear()
    via_proxy.delay = 0.25  # slow every request so that the kill lands mid-upload
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(new), s3_prefix], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len([r for r in via_proxy.requests("PUT") if "model.safetensors" in r[1]]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    via_proxy.delay = 0.0
    assert proc.returncode == -signal.SIGKILL and b"PUBLISHED" not in proc.stdout.read()
    # the killed writer staged under its own prefix and never committed: the old artifact is intact
    out = storage.fetch(s3_prefix, cache_dir=tmp_path / "c-old")
    assert storage.verify(s3_prefix)["files"]["model.safetensors"]["size"] == (old / "model.safetensors").stat().st_size
    assert all(same_bytes(out / rel, old / rel) for rel in ("model.safetensors", "ema.safetensors", "notes.txt"))

    m = storage.publish(new, s3_prefix, kind="checkpoint")  # the rerun
    out = storage.fetch(s3_prefix, cache_dir=tmp_path / "c")
    assert storage.verify(s3_prefix) == m
    for rel in ("model.safetensors", "ema.safetensors", "notes.txt"):
        assert same_bytes(out / rel, new / rel)
