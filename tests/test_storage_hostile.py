"""Hostile manifests and S3 listings (issue 22, item 1): names that leave the artifact, symlinks, FIFOs.

Every check looks at the filesystem itself (what exists outside the cache / artifact folder), not at
what anyflow.storage reports. Readers: ``read_manifest``/``verify``/``fetch``/``fetch_file``/``mirror``
and the stage reader ``read_checkpoint`` (which opens a fetched artifact's files through its manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from anyflow import storage
from anyflow.storage import ArtifactError

PAYLOAD = b"import os  # planted by a hostile manifest\n"


def entry(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def tree(root: Path, skip: Path | None = None) -> set[str]:
    """Every path under ``root`` (files, folders, links), except under ``skip``: the filesystem's own view."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if skip is None or not (p == skip or skip in p.parents):
                out.add(str(p.relative_to(root)))
    return out


def bounded(fn: Callable[[], Any], *, fifos: tuple[Path, ...] = (), timeout: float = 20.0) -> BaseException | None:
    """Run ``fn`` in a thread; return what it raised. A reader stuck on a FIFO is unblocked, then failed."""
    box: dict[str, BaseException] = {}

    def go() -> None:
        try:
            fn()
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for f in fifos:  # a writer end lets the blocked open() return, so the process can exit
            os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail(f"the reader hung for {timeout:g} s (blocked on a FIFO)")
    return box.get("exc")


def rewrite_files(art: Path, files: dict) -> None:
    m = json.loads((art / "manifest.json").read_text())
    m["files"] = files
    (art / "manifest.json").write_text(json.dumps(m))


def local_artifact(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"w" * 100)
    art = tmp_path / "store" / "art"
    storage.publish(src, art, kind="x")
    return art


# ------------------------------------------------------------------------------------ local store
LOCAL_CASES = ["absolute", "dotdot", "symlink", "symlinked-folder", "fifo"]


@pytest.mark.parametrize("case", LOCAL_CASES)
def test_local_hostile_manifest_is_refused(tmp_path: Path, case: str) -> None:
    art = local_artifact(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(PAYLOAD)  # e.g. /etc/hostname: valid bytes, wrong place
    fifos: tuple[Path, ...] = ()
    if case == "absolute":
        name, ent = str(outside / "secret.txt"), entry(PAYLOAD)
    elif case == "dotdot":
        name, ent = "../../outside/secret.txt", entry(PAYLOAD)
    elif case == "symlink":
        (art / "link.txt").symlink_to(outside / "secret.txt")
        name, ent = "link.txt", entry(PAYLOAD)
    elif case == "symlinked-folder":
        (art / "sub").symlink_to(outside, target_is_directory=True)
        name, ent = "sub/secret.txt", entry(PAYLOAD)
    else:
        os.mkfifo(art / "pipe")
        name, ent, fifos = "pipe", entry(b""), (art / "pipe",)
    rewrite_files(art, {**storage.read_manifest(art)["files"], name: ent})
    before = tree(tmp_path)
    readers = {
        "verify": lambda: storage.verify(art),
        "fetch": lambda: storage.fetch(art, cache_dir=tmp_path / "cache"),
        "fetch_file": lambda: storage.fetch_file(art, name, cache_dir=tmp_path / "cache"),
        "listed_file": lambda: storage.listed_file(art, name),
    }
    for reader, fn in readers.items():
        exc = bounded(fn, fifos=fifos)
        assert isinstance(exc, ArtifactError), f"{reader} accepted {case} name {name!r}: {exc!r}"
        msg = str(exc)
        assert str(art) in msg and (name in msg or os.path.basename(name) in msg), f"{reader}: {msg}"
    assert tree(tmp_path) - {"cache"} == before, "a reader wrote files"


def test_unlisted_files_do_not_verify(tmp_path: Path) -> None:
    """``"files": {}`` must not verify a folder whose reader then opens files the manifest does not list."""
    art = local_artifact(tmp_path)
    (art / "model.json").write_text("{}")
    rewrite_files(art, {})
    for fn in (lambda: storage.verify(art), lambda: storage.fetch(art), lambda: storage.listed_file(art, "model.json")):
        with pytest.raises(ArtifactError, match=re.escape(str(art))):
            fn()


def test_stage_reader_opens_only_listed_files(tmp_path: Path) -> None:
    """read_checkpoint: model.json (listed, hashed) names an adapter file outside the artifact -> refused."""
    from safetensors.numpy import save_file

    from anyflow.config import StageInputError, get_preset
    from anyflow.stages.common import read_checkpoint

    preset = get_preset("tiny")
    evil = tmp_path / "evil"
    evil.mkdir()
    import numpy as np

    save_file({"x": np.zeros(2, np.float32)}, str(evil / "generator.safetensors"))
    src = tmp_path / "ck"
    src.mkdir()
    meta = {"kind": "generator", "variant": preset.variant, "base": preset.model.base,
            "lora": {"rank": preset.model.lora_rank, "alpha": preset.model.lora_alpha},
            "adapters": {"generator": {"role": "generator", "file": "../../evil/generator.safetensors"}}}
    (src / "model.json").write_text(json.dumps(meta))
    url = tmp_path / "store" / "ck"
    storage.publish(src, url, kind="generator")
    storage.verify(url)  # the manifest itself is fine: the hostile name is inside model.json
    with pytest.raises(StageInputError, match=r"generator.safetensors"):
        read_checkpoint(str(url), preset, role="generator", need=("generator",))

    rewrite_files(url, {})  # "files": {} -> model.json is not listed: not a checkpoint
    with pytest.raises(StageInputError, match=re.escape(str(url))):
        read_checkpoint(str(url), preset, role="generator", need=("generator",))


# ------------------------------------------------------------------------------------ S3 (moto)
S3_CASES = {
    "absolute": lambda tmp: str(tmp / "planted" / "evil.pth"),
    "dotdot": lambda tmp: "../../../planted/evil.pth",  # from <cache>/artifacts/<sha>/ to <tmp>/planted
    "dot": lambda tmp: "a/./evil.pth",
    "empty-segment": lambda tmp: "a//evil.pth",
    "backslash": lambda tmp: "..\\..\\..\\planted\\evil.pth",
    "nul": lambda tmp: "evil.pth\x00.txt",
}


def _put(s3_server: Any, url: str, data: bytes) -> None:
    bucket, key = url.split("://", 1)[1].split("/", 1)
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data)


@pytest.mark.s3
@pytest.mark.parametrize("case", list(S3_CASES))
def test_s3_hostile_manifest_is_refused_and_nothing_is_written_outside_the_cache(
        s3_server: Any, s3_prefix: str, tmp_path: Path, case: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"w" * 100)
    m = storage.publish(src, s3_prefix, kind="x")
    name = S3_CASES[case](tmp_path)
    if "\x00" not in name:  # the object the unchecked join would download (S3 keys may hold '..', '//', '\\')
        _put(s3_server, s3_prefix.rstrip("/") + "/" + name.strip("/"), PAYLOAD)
    m["files"] = {"weights.bin": m["files"]["weights.bin"], name: entry(PAYLOAD)}
    _put(s3_server, storage.join(s3_prefix, "manifest.json"), json.dumps(m).encode())
    cache = tmp_path / "cache"
    before = tree(tmp_path)
    for reader, fn in {"read_manifest": lambda: storage.read_manifest(s3_prefix),
                       "verify": lambda: storage.verify(s3_prefix),
                       "fetch": lambda: storage.fetch(s3_prefix, cache_dir=cache),
                       "fetch_file": lambda: storage.fetch_file(s3_prefix, name, cache_dir=cache)}.items():
        exc = bounded(fn)
        assert isinstance(exc, ArtifactError), f"{reader} accepted {case} name {name!r}: {exc!r}"
        assert s3_prefix in str(exc) and repr(name) in str(exc), f"{reader}: {exc}"
    assert not (tmp_path / "planted").exists()
    assert tree(tmp_path, skip=cache) == before - {"cache"}, "files were written outside the cache folder"
    written = [p for p in tree(cache) if (cache / p).is_file() and not p.endswith(".lock")]
    assert written == [], f"nothing of a refused artifact enters the cache: {written}"


@pytest.mark.s3
@pytest.mark.parametrize("case", ["absolute", "dotdot"])
def test_s3_hostile_listing_key_is_refused_by_mirror(s3_server: Any, s3_prefix: str, tmp_path: Path,
                                                    case: str) -> None:
    _put(s3_server, storage.join(s3_prefix, "model_index.json"), b"{}")
    if case == "absolute":  # listing key "<prefix>//tmp/.../evil.pth" -> relative name "/tmp/.../evil.pth"
        rel = str(tmp_path / "planted" / "evil.pth")
        _put(s3_server, s3_prefix + "/" + rel, PAYLOAD)
        _put(s3_server, storage.join(s3_prefix, rel), PAYLOAD)  # what the unchecked join then GETs
    else:  # from <cache>/mirror/<key>/ up to <tmp>/planted
        rel = "../../../planted/evil.pth"
        _put(s3_server, s3_prefix + "/" + rel, PAYLOAD)
    cache = tmp_path / "cache"
    before = tree(tmp_path)
    exc = bounded(lambda: storage.mirror(s3_prefix, cache))
    assert isinstance(exc, ArtifactError), f"mirror accepted listing key {rel!r}: {exc!r}"
    assert s3_prefix in str(exc) and repr(rel) in str(exc)
    assert not (tmp_path / "planted").exists()
    assert tree(tmp_path, skip=cache) == before - {"cache"}, "files were written outside the cache folder"
