"""The S3 endpoint a storage benchmark talks to: a moto server started on 127.0.0.1 (tests/s3server.py), or the
one given with ``--endpoint``; its bucket is created if missing."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def s3_endpoint(endpoint: str | None, bucket: str) -> Iterator[str]:
    """Yield a description of the endpoint ("moto server on loopback, URL" or "endpoint URL") with
    ``AWS_ENDPOINT_URL`` set to it and ``bucket`` present; a server started here is stopped at the end."""
    server = None
    if endpoint is None:
        sys.path.insert(0, str(REPO / "tests"))
        from s3server import FAKE_ENV, MotoServer

        server = MotoServer().start()
        os.environ.update(FAKE_ENV)
        endpoint = server.endpoint
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        from anyflow import _storage_s3

        client = _storage_s3.client()
        try:
            client.head_bucket(Bucket=bucket)
        except Exception:
            client.create_bucket(Bucket=bucket)
        yield f"moto server on loopback, {endpoint}" if server is not None else f"endpoint {endpoint}"
    finally:
        if server is not None:
            server.stop()
