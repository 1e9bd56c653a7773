"""Hangs and leaks (issue 22, item 7).

* an S3 endpoint that accepts connections and never answers: every call ends within its deadline and names the
  endpoint (a local TCP server on 127.0.0.1 that accepts and stays silent, and stops by itself);
* an index row naming another scheme or a place outside the index's folder is never fetched;
* a training stage killed with SIGKILL leaves no checkpoint copy behind once it is rerun;
* pruned checkpoint folders of a local store are removed, not left empty;
* the KFP token can come from a file (``--existing-token-file``), so it is not visible in ``ps``.

A FIFO listed in a manifest (the issue's "a FIFO hangs verify") is covered by tests/test_storage_hostile.py
(``test_local_hostile_manifest_is_refused[fifo]``: verify, fetch, fetch_file and listed_file, bounded).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from s3server import FAKE_ENV

from anyflow import storage

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ a silent S3 endpoint
@contextlib.contextmanager
def silent_endpoint(lifetime_s: float = 40.0) -> Iterator[tuple[str, list[socket.socket]]]:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte. It stops by itself after
    ``lifetime_s`` (so a client without timeouts is released, and fails, instead of hanging the test run)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)
    conns: list[socket.socket] = []
    stop = threading.Event()
    end = time.monotonic() + lifetime_s

    def serve() -> None:
        try:
            while not stop.is_set() and time.monotonic() < end:
                try:
                    conns.append(srv.accept()[0])
                except TimeoutError:
                    continue
        finally:
            for c in conns:
                c.close()
            srv.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}", conns
    finally:
        stop.set()
        thread.join(5)


@pytest.fixture
def silent_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[socket.socket]]]:
    for k, v in FAKE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ANYFLOW_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("ANYFLOW_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("ANYFLOW_S3_DEADLINE", "5")
    with silent_endpoint() as (url, conns):
        storage.configure(s3_endpoint=url)
        try:
            yield url, conns
        finally:
            storage.configure(s3_endpoint=None)


BOUND_S = 30.0  # "does not hang": the deadline is 5 s; before the fix one call took 8 × 60 s


def test_silent_s3_endpoint_fails_within_the_deadline_and_names_it(silent_s3, tmp_path: Path) -> None:
    url, conns = silent_s3
    src = tmp_path / "small.bin"
    src.write_bytes(b"x" * 1024)
    calls = {
        "read": lambda: storage.read_bytes("s3://bucket/some/object.json"),
        "upload": lambda: storage.copy_file(src, "s3://bucket/some/upload.bin"),  # the multipart-capable client
        "download": lambda: storage.copy_file("s3://bucket/some/object.bin", tmp_path / "got.bin"),
    }
    for name, fn in calls.items():
        before = len(conns)
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            fn()
        took = time.monotonic() - t0
        assert took < BOUND_S, f"{name}: a silent endpoint stalled the call for {took:.0f} s"
        assert len(conns) > before, f"{name}: never reached the endpoint"  # it really waited on a silent server
        assert url in str(info.value), f"{name}: the error does not name the endpoint: {info.value}"
    assert not (tmp_path / "got.bin").exists()


def test_bad_timeout_setting_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in FAKE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ANYFLOW_S3_READ_TIMEOUT", "soon")
    with pytest.raises(OSError, match="ANYFLOW_S3_READ_TIMEOUT"):
        storage.read_bytes("s3://bucket/x.json")
