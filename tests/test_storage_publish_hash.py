"""publish to S3 hashes each file while it uploads (issue 18: the write path's sha256 ran serially with the
transfer); the manifest entry is still the sha256 of the local bytes and fetch still verifies it."""

from __future__ import annotations

import hashlib
import os
import threading

from anyflow import _storage_s3, storage


def test_publish_hashes_while_uploading_and_manifest_is_exact(s3_prefix, tmp_path, monkeypatch):
    src = tmp_path / "ckpt"
    src.mkdir()
    data = os.urandom(3 * 2**20 + 17)
    (src / "model.safetensors").write_bytes(data)
    hashing, uploading = threading.Event(), threading.Event()
    overlapped = []
    real_hash, real_upload = storage.hash_file, _storage_s3.upload_file

    def hash_file(path, **kw):
        hashing.set()
        overlapped.append(uploading.wait(10))  # the upload of this file starts while it is being hashed
        return real_hash(path, **kw)

    def upload_file(path, url):
        uploading.set()
        hashing.wait(10)
        return real_upload(path, url)

    monkeypatch.setattr(storage, "hash_file", hash_file)
    monkeypatch.setattr(_storage_s3, "upload_file", upload_file)
    manifest = storage.publish(src, s3_prefix, kind="bench")
    assert overlapped == [True]
    entry = manifest["files"]["model.safetensors"]
    assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    got = storage.fetch(s3_prefix, cache_dir=tmp_path / "cache") / "model.safetensors"
    assert got.read_bytes() == data
