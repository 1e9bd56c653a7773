"""The storage boundary: the only module of ``anyflow`` that opens URLs (local paths or ``s3://``).

Artifacts (DESIGN.md "Stages and artifacts") are directories at a URL: safetensors tensors,
``config.json`` and ``manifest.json``. The manifest is the commit record:

* ``publish`` is safe under concurrent writers of one URL, on S3 and locally: each writer stages its files
  under its own ``<url>/.anyflow-staging/<writer>/`` and commits with a conditional manifest write against
  the manifest it found when it started (S3: ``If-Match`` / ``If-None-Match``, :func:`_publish_remote`;
  locally: the files are renamed into place and the manifest written under an exclusive ``flock``,
  :func:`_publish_local`). A writer that loses returns the winner's verified manifest. Uploads are streamed
  (multipart and concurrent above ``ANYFLOW_S3_MULTIPART_THRESHOLD``); ``manifest.json`` is written last. A
  writer killed at any point leaves the previous artifact or a folder without a manifest, which every
  reader refuses. A rerun overwrites cleanly: the manifest lists exactly the artifact's files, and files
  under the URL that it does not list (stale files from an earlier publish) are deleted *after* the
  manifest is written. Readers only ever look at listed files.
* Readers (``read_manifest``, ``verify``, ``fetch``, ``fetch_file``) check sizes and sha256 of every
  file they hand out and raise :class:`ArtifactError` naming the URL and the file otherwise.
* ``fetch`` downloads a remote artifact into a local cache keyed by the manifest's sha256; files
  already present with the right hash are not downloaded again, and a half-downloaded ``.part`` file
  resumes with a ranged GET.
* ``fetch_ranges`` reads only some byte ranges of one listed file (ranged GETs on S3) and checks them against a
  sha256 the caller trusts (``anyflow.data.shards``: a row's digest in the dataset's verified ``index.json``), so
  a training rank moves only the rows it reads; verified ranges are cached under their digest.
  ``bytes_received`` counts every body byte this process received from S3.

S3 settings come from the standard AWS environment plus ``AWS_ENDPOINT_URL`` / ``ANYFLOW_S3_ENDPOINT``
/ :func:`configure`; retries and error messages are described in :mod:`anyflow._storage_s3`.
The cache root is ``cache_dir`` or ``$ANYFLOW_CACHE_DIR`` or ``~/.cache/anyflow``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from anyflow import _storage_s3 as s3
from anyflow._storage_io import (
    ArtifactError,
    cache_lock,
    check_name,
    code_version,
    download_verified,
    hash_file,
    hash_inside,
    local_path,
    local_write_atomic,
    open_inside,
    private_dir,
)
from anyflow._storage_s3 import PreconditionFailed, StorageError

__all__ = [
    "ArtifactError",
    "PreconditionFailed",
    "StorageError",
    "bytes_received",
    "check_name",
    "configure",
    "content_digest",
    "copy_file",
    "delete",
    "exists",
    "fetch",
    "fetch_file",
    "fetch_ranges",
    "file_url",
    "fs_and_path",
    "is_remote",
    "join",
    "lineage",
    "list_prefix",
    "listed_file",
    "manifest_digest",
    "mirror",
    "open_url",
    "publish",
    "read_bytes",
    "read_json",
    "read_manifest",
    "verify",
    "verify_cached",
    "verify_sizes",
    "write_bytes",
    "write_json_atomic",
]

MANIFEST = "manifest.json"
CONFIG = "config.json"
SCHEMA = "anyflow.artifact"
SCHEMA_VERSION = 1
_WORKERS = 4


# --------------------------------------------------------------------------------------- URLs
def configure(*, s3_endpoint: str | None = None) -> None:
    """Override the S3 endpoint (the CLI's ``--s3-endpoint``); ``None`` restores the environment's."""
    s3.configure(s3_endpoint=s3_endpoint)


def is_remote(url: str | os.PathLike) -> bool:
    """True for ``scheme://`` URLs other than ``file://``."""
    u = str(url)
    return "://" in u and not u.startswith("file://")


def join(url: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a URL (``/`` for remote URLs, ``os.path.join`` for local ones)."""
    if not is_remote(url):
        return str(Path(local_path(url), *parts))
    out = str(url).rstrip("/")
    for p in parts:
        if p.strip("/"):
            out += "/" + p.strip("/")
    return out


def fs_and_path(url: str | os.PathLike) -> tuple[Any, str]:
    """An fsspec filesystem (s3fs for ``s3://``) and the path inside it, configured like this module."""
    import fsspec

    u = str(url)
    if not is_remote(u):
        return fsspec.filesystem("file"), str(local_path(u))
    if u.startswith(("s3://", "s3a://")):
        import s3fs

        ep, t = s3.endpoint(), s3.timeouts()
        config: dict[str, Any] = {"connect_timeout": t["connect"], "read_timeout": t["read"],
                                  "retries": {"total_max_attempts": 1}}  # s3fs retries (below), not botocore too
        if ep:
            config["s3"] = {"addressing_style": "path"}
        fs = s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": ep} if ep else {},
            config_kwargs=config,
            use_listings_cache=False,
        )
        fs.retries = _s3fs_attempts(t)
        return fs, u.split("://", 1)[1]
    return fsspec.core.url_to_fs(u)


def _s3fs_attempts(t: dict[str, float]) -> int:
    """How many attempts s3fs may make per request so that a silent endpoint is given up within the deadline
    (``ANYFLOW_S3_DEADLINE``): each attempt may last connect + read timeout, plus s3fs's own pause after it
    (0.1 s × 1.7^i, capped at 15 s); at least one attempt."""
    n, spent = 0, 0.0
    while n < s3.attempts():
        nxt = spent + t["connect"] + t["read"] + min(1.7**n * 0.1, 15)
        if n and nxt > t["deadline"]:
            break
        n, spent = n + 1, nxt
    return n


def open_url(url: str | os.PathLike, mode: str = "rb") -> IO:
    """Open a URL as a file object (local writes create parent directories)."""
    if not is_remote(url):
        p = local_path(url)
        if any(c in mode for c in "wax"):
            p.parent.mkdir(parents=True, exist_ok=True)
        return open(p, mode)
    fs, path = fs_and_path(url)
    return fs.open(path, mode)


def exists(url: str | os.PathLike) -> bool:
    """True if the URL names a file/object or a non-empty prefix."""
    if not is_remote(url):
        return local_path(url).exists()
    u = str(url)
    return s3.head(u) is not None or bool(s3.list_objects(u, limit=1))


def _internal(name: str) -> bool:
    """Our own lock and temp files (``.x.lock``, ``.x.tmp-1234abcd``): never listed or published."""
    return name.startswith(".") and (name.endswith(".lock") or ".tmp-" in name)


def list_prefix(url: str | os.PathLike) -> list[str]:
    """Full URLs of every file under a prefix/directory (recursive, sorted); ``[]`` if none."""
    if not is_remote(url):
        root = local_path(url)
        if not root.is_dir():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file() and not _internal(p.name))
    return sorted(join(url, o["key"]) for o in s3.list_objects(str(url)))


def read_bytes(url: str | os.PathLike) -> bytes:
    """Whole contents of a small file/object; ``FileNotFoundError`` naming the URL if absent."""
    if not is_remote(url):
        try:
            return local_path(url).read_bytes()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{url} does not exist.") from exc
    got = s3.get_bytes(str(url))
    if got is None:
        raise FileNotFoundError(f"{url} does not exist.")
    return got[0]


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Write a small file/object atomically (temp file + rename locally; one PUT on S3)."""
    if is_remote(url):
        s3.put_bytes(str(url), data)
    else:
        local_write_atomic(local_path(url), data)


def read_json(url: str | os.PathLike) -> Any:
    """Parse a JSON file/object; errors name the URL."""
    raw = read_bytes(url)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{url} is not valid JSON ({exc}); rewrite or delete it.") from exc


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def write_json_atomic(url: str | os.PathLike, obj: Any) -> None:
    """Write JSON so that readers see either the old or the new document, never a mix."""
    write_bytes(url, _dumps(obj))


def delete(urls: Sequence[str]) -> None:
    """Delete files/objects (missing ones are ignored)."""
    remote = [u for u in urls if is_remote(u)]
    if remote:
        s3.delete(remote)
    for u in urls:
        if not is_remote(u):
            local_path(u).unlink(missing_ok=True)


def copy_file(src_url: str | os.PathLike, dst_url: str | os.PathLike) -> None:
    """Copy one file between any two URLs (streamed; server-side on S3 -> S3)."""
    src, dst = str(src_url), str(dst_url)
    if is_remote(src) and is_remote(dst):
        s3.copy(src, dst)
    elif is_remote(dst):
        s3.upload_file(local_path(src), dst)
    elif is_remote(src):
        out = local_path(dst)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            for chunk in s3.iter_chunks(src):
                f.write(chunk)
        os.replace(tmp, out)
    else:
        out = local_path(dst)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        shutil.copyfile(local_path(src), tmp)
        os.replace(tmp, out)


# ---------------------------------------------------------------------------------- artifacts
def _local_files(root: Path) -> list[str]:
    """Relative POSIX paths of the files to publish (no manifest, no temp files)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if (p.is_file() and rel != MANIFEST and not _internal(p.name) and p.name != ".anyflow-complete"
                and rel.split("/", 1)[0] != STAGING):
            out.append(rel)
    return out


def publish(
    local_dir: str | os.PathLike,
    url: str | os.PathLike,
    *,
    kind: str,
    parents: Sequence[str] = (),
    config: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Publish ``local_dir`` as an artifact at ``url`` and return its manifest (see module docstring).

    ``config`` (if given) becomes ``config.json``; otherwise ``local_dir/config.json`` is used, or ``{}``.
    ``parents`` are artifact URLs recorded with their manifest sha256, kind and :func:`content_digest`
    (``{"uri", "manifest_sha256", "kind", "content_sha256"}``; they must be valid artifacts).
    """
    src, dst = local_path(local_dir), str(url)
    if not src.is_dir():
        raise FileNotFoundError(f"publish: local directory {src} does not exist; write the artifact files first.")
    in_place = not is_remote(dst) and local_path(dst).resolve() == src.resolve()
    parent_refs = [_parent_ref(p) for p in parents]
    if is_remote(dst):
        return _publish_remote(src, dst, kind=kind, parent_refs=parent_refs, config=config, metrics=metrics,
                               extra=extra)
    return _publish_local(src, local_path(dst), in_place=in_place, kind=kind, parent_refs=parent_refs,
                          config=config, metrics=metrics, extra=extra)


def _parent_ref(url: str | os.PathLike) -> dict:
    """A parent's entry in a manifest: its URL, manifest sha256 (integrity: :func:`lineage`'s ``ok``), kind and
    content digest (:func:`content_digest`: "the same bytes?", e.g. the re-distillation teacher check), from one
    read of its manifest."""
    raw = _manifest_bytes(url)
    m = _parse_manifest(url, raw)
    return {"uri": str(url), "manifest_sha256": hashlib.sha256(raw).hexdigest(), "kind": m["kind"],
            "content_sha256": _content_digest_of(m)}


STAGING = ".anyflow-staging"
_STALE_STAGING_S = 24 * 3600.0


@contextlib.contextmanager
def local_staging(url: str | os.PathLike) -> Iterator[Path]:
    """A private staging folder for one writer of the local artifact ``url``: ``<url>/.anyflow-staging/<writer>/``,
    locked while in use and removed afterwards (:func:`anyflow._storage_io.private_dir`: staging folders whose
    writer died, SIGKILL included, are removed when the next writer starts). Write the artifact's files there
    and :func:`publish` it to ``url``: its files are then moved into place, not copied."""
    with private_dir(local_path(url) / STAGING, "w-") as stage:
        yield stage


def _publish_local(src: Path, dst: Path, *, in_place: bool, kind: str, parent_refs: list, config: dict | None,
                   metrics: dict | None, extra: dict | None) -> dict:
    """Publish to a local folder, safe under concurrent writers of one folder (two processes, two pods on a
    shared volume: the local counterpart of :func:`_publish_remote`).

    The writer stages every file in its own locked folder ``<dst>/.anyflow-staging/<writer>/`` (or ``src`` itself
    when ``src`` is such a folder of ``dst``, from :func:`local_staging`), having noted the manifest it found when
    it started. The commit then runs under an exclusive ``flock`` of the folder's manifest: if the manifest
    changed meanwhile, another writer committed first -- this writer drops its staging and returns the winner's
    manifest, verified (or raises ArtifactError naming the file if it does not verify); otherwise it removes the
    manifest (no reader accepts the folder from here), renames its files into place, writes the manifest
    atomically and deletes files the manifest does not list. A writer killed at any point leaves the old
    artifact, or a folder without a manifest, never a manifest over other files.
    """
    dst.mkdir(parents=True, exist_ok=True)
    man = dst / MANIFEST
    prev = read_bytes_etag(man)
    rels = [r for r in _local_files(src) if not (config is not None and r == CONFIG)]
    config_bytes = _dumps(config) if config is not None else None
    if config is None and CONFIG not in rels:
        config_bytes = _dumps({})
    own = not in_place and src.resolve().parent == (dst / STAGING).resolve()
    with contextlib.ExitStack() as stack:
        stage = dst if in_place else src if own else stack.enter_context(local_staging(dst))

        def put(rel: str) -> tuple[str, dict]:
            entry = hash_file(src / rel)
            if stage is not src and not in_place:
                out = stage / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, out)
            return rel, entry

        with ThreadPoolExecutor(_WORKERS) as pool:
            files = dict(pool.map(put, rels))
        if config_bytes is not None:
            local_write_atomic(stage / CONFIG, config_bytes)
            files[CONFIG] = {"size": len(config_bytes), "sha256": hashlib.sha256(config_bytes).hexdigest()}
        manifest = _manifest_doc(kind, files, parent_refs, metrics, extra)
        with cache_lock(man):
            cur = read_bytes_etag(man)
            if (cur and cur[1]) != (prev and prev[1]):
                return verify(dst)  # another writer committed first: its complete artifact stands
            man.unlink(missing_ok=True)  # from here on, no reader accepts the folder
            if not in_place:
                for rel in files:
                    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(stage / rel, dst / rel)
            local_write_atomic(man, _dumps(manifest))
            for rel in _local_files(dst):
                if rel not in files and not (in_place and ".tmp-" in rel):  # never the caller's own temp files
                    (dst / rel).unlink(missing_ok=True)
    return manifest




def _manifest_doc(kind: str, files: dict, parent_refs: list, metrics: dict | None, extra: dict | None) -> dict:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "files": dict(sorted(files.items())),
        "parents": parent_refs,
        "metrics": metrics or {},
        "extra": extra or {},
    }


def _publish_remote(src: Path, dst: str, *, kind: str, parent_refs: list, config: dict | None,
                    metrics: dict | None, extra: dict | None) -> dict:
    """Publish to S3, safe under concurrent writers of one URL.

    Each writer uploads under its own staging prefix (``<url>/.anyflow-staging/<writer>/``) and lists
    there, per file, the stored ``object``; the manifest is then written with one conditional PUT
    against the manifest it found when it started (``If-Match``, or ``If-None-Match: *``). A writer that
    loses (someone committed in between) deletes its staged objects and returns the winner's verified
    manifest, so the URL always holds one complete artifact, the old one until the swap. The winner
    deletes the objects of the manifest it replaced, files of the older flat layout and staging
    prefixes abandoned for over a day -- never another live writer's staging.
    """
    s3.check_bucket(dst)
    prev = s3.get_bytes(join(dst, MANIFEST))
    stage = f"{STAGING}/{uuid.uuid4().hex[:16]}"
    rels = [r for r in _local_files(src) if not (config is not None and r == CONFIG)]
    config_bytes = _dumps(config) if config is not None else None
    if config is None and CONFIG not in rels:
        config_bytes = _dumps({})

    def put(rel: str) -> tuple[str, dict]:
        # The manifest's size + sha256 of the local file are computed in a thread of their own while the upload
        # streams the same file (hashlib releases the GIL): the same entry as hashing first, without adding the
        # hashing time to the upload's (benchmarks/bench_storage.py measures publish against a plain upload).
        with ThreadPoolExecutor(1) as hasher:
            entry = hasher.submit(hash_file, src / rel)
            s3.upload_file(src / rel, join(dst, stage, rel))
            return rel, {**entry.result(), "object": f"{stage}/{rel}"}

    with ThreadPoolExecutor(_WORKERS) as pool:
        files = dict(pool.map(put, rels))
    if config_bytes is not None:
        s3.put_bytes(join(dst, stage, CONFIG), config_bytes)
        files[CONFIG] = {"size": len(config_bytes), "sha256": hashlib.sha256(config_bytes).hexdigest(),
                         "object": f"{stage}/{CONFIG}"}
    manifest = _manifest_doc(kind, files, parent_refs, metrics, extra)
    mine = {_object(r, e) for r, e in files.items()}
    try:
        write_bytes_if(join(dst, MANIFEST), _dumps(manifest), if_match=prev and prev[1], if_none_match=prev is None)
    except PreconditionFailed:
        delete([join(dst, o) for o in mine])
        return verify(dst)  # another writer committed first: its complete artifact stands
    replaced: set[str] = set()
    if prev is not None:
        try:
            replaced = {_object(r, e) for r, e in _parse_manifest(dst, prev[0])["files"].items()}
        except ArtifactError:
            pass
    now = time.time()
    stale = []
    for o in s3.list_objects(dst):
        k = o["key"]
        if k == MANIFEST or k in mine:
            continue
        if not k.startswith(STAGING + "/") or k in replaced or k.startswith(stage + "/"):
            stale.append(join(dst, k))
        elif o.get("modified") is not None and now - o["modified"].timestamp() > _STALE_STAGING_S:
            stale.append(join(dst, k))
    delete(stale)
    return manifest


def _rel(root: str, url: str) -> str:
    if is_remote(root):
        return url[len(root.rstrip("/")) + 1:]
    return Path(url).relative_to(local_path(root)).as_posix()


def _manifest_bytes(url: str | os.PathLike) -> bytes:
    try:
        return read_bytes(join(url, MANIFEST))
    except FileNotFoundError as exc:
        if not is_remote(url) and not local_path(url).exists():  # a mistyped path: no "re-run the stage" hint
            raise ArtifactError(f"{url} does not exist (an artifact is a folder holding {MANIFEST}); check the path.") from exc
        raise ArtifactError(
            f"{url} is not an artifact: {MANIFEST} is missing (its writer did not finish, or this is "
            f"not an artifact URL); re-run the stage that publishes it."
        ) from exc


def _parse_manifest(url: str | os.PathLike, raw: bytes) -> dict:
    try:
        m = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{join(url, MANIFEST)} is not UTF-8 JSON (byte {exc.start}); re-publish the artifact.") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{join(url, MANIFEST)} is not valid JSON ({exc}); re-publish the artifact.") from exc
    if not isinstance(m, dict) or m.get("schema") != SCHEMA or "files" not in m:
        raise ArtifactError(f"{join(url, MANIFEST)} is not an anyflow manifest (schema field); re-publish it.")
    if not isinstance(m.get("schema_version", 0), int) or isinstance(m.get("schema_version"), bool):
        raise ArtifactError(f"{join(url, MANIFEST)}: 'schema_version' must be an integer; re-publish the artifact.")
    if m.get("schema_version", 0) > SCHEMA_VERSION:
        raise ArtifactError(
            f"{join(url, MANIFEST)} has schema_version {m['schema_version']}, newer than this anyflow "
            f"understands ({SCHEMA_VERSION}); upgrade anyflow."
        )
    if not isinstance(m["files"], dict):
        raise ArtifactError(f"{join(url, MANIFEST)}: 'files' must be an object of name -> entry; re-publish it.")
    for rel, entry in m["files"].items():
        check_name(url, rel)
        size = entry.get("size") if isinstance(entry, dict) else None
        if (not isinstance(size, int) or isinstance(size, bool) or size < 0
                or not isinstance(entry.get("sha256"), str)):
            raise ArtifactError(f"{join(url, MANIFEST)}: the entry of {rel!r} needs an integer size and a "
                                f"sha256; re-publish the artifact.")
        if "object" in entry:
            check_name(url, entry["object"], what=f"stored object of {rel!r}")
    return m


def _object(rel: str, entry: dict) -> str:
    """Where a listed file is stored, relative to the artifact URL (a writer's staging prefix on S3)."""
    return entry.get("object", rel)


def read_manifest(url: str | os.PathLike) -> dict:
    """The parsed manifest of the artifact at ``url`` (ArtifactError if missing or invalid)."""
    return _parse_manifest(url, _manifest_bytes(url))


def manifest_digest(url: str | os.PathLike) -> str:
    """sha256 of the artifact's ``manifest.json`` bytes: the artifact's identity."""
    raw = _manifest_bytes(url)
    _parse_manifest(url, raw)
    return hashlib.sha256(raw).hexdigest()


def manifest_with_digests(url: str | os.PathLike) -> tuple[dict, str, str]:
    """``(manifest, manifest_digest, content_digest)`` of the artifact at ``url`` from one read of its manifest
    (a stage record needs all three; three reads are three GETs on S3, and a re-publish between them would mix
    two manifests)."""
    raw = _manifest_bytes(url)
    manifest = _parse_manifest(url, raw)
    return manifest, hashlib.sha256(raw).hexdigest(), _content_digest_of(manifest)


def content_digest(url: str | os.PathLike) -> str:
    """sha256 of what the artifact holds: its kind and every listed file's name, size and sha256 (canonical JSON).

    Unlike :func:`manifest_digest` it leaves out how the artifact was published -- ``created_at``, the code
    version, metrics, an S3 file's staging ``object`` -- so the same content published again, at another time or
    by another writer, has the same digest. Stage cache keys use it (anyflow.stages.cache_key), so re-publishing
    identical content keeps every downstream key; a changed file (``config.json`` included) changes it."""
    return _content_digest_of(read_manifest(url))


def _content_digest_of(m: dict) -> str:
    """:func:`content_digest` of a parsed manifest."""
    doc = {"kind": m.get("kind"), "files": {r: [e["size"], e["sha256"]] for r, e in sorted(m["files"].items())}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_entry(url: str, rel: str, entry: dict, got: dict) -> None:
    file_url = join(url, rel)
    if got["size"] < entry["size"]:
        raise ArtifactError(f"{file_url}: file is truncated ({got['size']} of {entry['size']} bytes); "
                            f"re-publish the artifact.")
    if got["size"] != entry["size"]:
        raise ArtifactError(f"{file_url}: size mismatch ({got['size']} bytes, manifest says "
                            f"{entry['size']}); re-publish the artifact.")
    if got["sha256"] != entry["sha256"]:
        raise ArtifactError(f"{file_url}: sha256 mismatch (got {got['sha256'][:16]}…, manifest says "
                            f"{entry['sha256'][:16]}…); the file is corrupt, re-publish the artifact.")


def _hash_listed(art_url: str, obj: str) -> dict:
    """Size + sha256 of a (validated) stored name of an artifact, streamed; FileNotFoundError if absent.
    Local files must be regular files reached without symlinks (:func:`open_inside`)."""
    if not is_remote(art_url):
        return hash_inside(local_path(art_url), obj, art_url)
    url = join(art_url, obj)
    if s3.head(url) is None:
        raise FileNotFoundError(url)
    h, n = hashlib.sha256(), 0
    for chunk in s3.iter_chunks(url):
        h.update(chunk)
        n += len(chunk)
    return {"size": n, "sha256": h.hexdigest()}


def _unlisted_local(root: Path, files: dict) -> list[str]:
    """Entries of a local artifact folder that its manifest does not list (our own lock/temp files aside)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root) and STAGING in dirnames:  # writers' private staging (:func:`_publish_local`)
            dirnames.remove(STAGING)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != MANIFEST and not _internal(name) and rel not in files:
                out.append(rel)
    return sorted(out)


def verify(url: str | os.PathLike) -> dict:
    """Re-hash every file of the artifact; return the manifest or raise ArtifactError naming the file.

    A local artifact folder must hold exactly the listed files (regular files, no symlinks): whatever
    reads the folder then reads only what the manifest lists."""
    return _verify(str(url), read_manifest(url))


_VERIFIED: set[tuple[str, str]] = set()


def verify_cached(url: str | os.PathLike) -> dict:
    """The check of a cache hit: every listed file's size each time, and its sha256 the first time this
    process sees this manifest at this URL. Returns the manifest or raises ArtifactError."""
    u = str(url)
    raw = _manifest_bytes(u)
    manifest = _parse_manifest(u, raw)
    seen = (u, hashlib.sha256(raw).hexdigest())
    if seen not in _VERIFIED:
        _verify(u, manifest)
        _VERIFIED.add(seen)
        return manifest
    return _check_sizes(u, manifest)


def verify_sizes(url: str | os.PathLike) -> dict:
    """The manifest of a complete artifact: every listed file present with its listed size (one listing for S3),
    no content hashed. For artifacts whose readers check every byte they use anyway (a dataset partition: ranged
    rows against ``row_sha256``, whole files through :func:`fetch_file`), where hashing them all on each cache
    check would read the whole dataset. Raises ArtifactError."""
    u = str(url)
    return _check_sizes(u, _parse_manifest(u, _manifest_bytes(u)))


def _check_sizes(u: str, manifest: dict) -> dict:
    if is_remote(u):
        sizes = {o["key"]: o["size"] for o in s3.list_objects(u)}
    for rel, entry in manifest["files"].items():
        obj = _object(rel, entry)
        if is_remote(u):
            size = sizes.get(obj)
        else:
            try:
                with open_inside(local_path(u), obj, u) as f:
                    size = os.fstat(f.fileno()).st_size
            except FileNotFoundError:
                size = None
        if size is None:
            raise ArtifactError(f"{join(u, rel)}: file listed in the manifest is missing; re-publish the artifact.")
        if size != entry["size"]:
            raise ArtifactError(f"{join(u, rel)}: size mismatch ({size} bytes, manifest says {entry['size']}); "
                                f"re-publish the artifact.")
    return manifest


def _verify(u: str, manifest: dict) -> dict:
    def check(item: tuple[str, dict]) -> None:
        rel, entry = item
        try:
            got = _hash_listed(u, _object(rel, entry))
        except FileNotFoundError as exc:
            raise ArtifactError(f"{join(u, rel)}: file listed in the manifest is missing; "
                                f"re-publish the artifact.") from exc
        _check_entry(u, rel, entry, got)

    with ThreadPoolExecutor(_WORKERS) as pool:
        list(pool.map(check, manifest["files"].items()))
    if not is_remote(u):
        extra = _unlisted_local(local_path(u), manifest["files"])
        if extra:
            raise ArtifactError(f"{join(u, extra[0])}: the artifact folder holds {len(extra)} file(s) its manifest "
                                f"does not list ({', '.join(extra[:5])}); the artifact is refused -- re-publish it.")
    return manifest


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    root = cache_dir or os.environ.get("ANYFLOW_CACHE_DIR") or Path.home() / ".cache" / "anyflow"
    return Path(root)


def _remote_artifact(url: str, cache_dir: str | os.PathLike | None) -> tuple[dict, Path, bytes]:
    raw = _manifest_bytes(url)
    manifest = _parse_manifest(url, raw)
    target = _cache_root(cache_dir) / "artifacts" / hashlib.sha256(raw).hexdigest()
    target.mkdir(parents=True, exist_ok=True)
    return manifest, target, raw


def fetch(url: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, recheck: bool = False,
          files: Sequence[str] | Callable[[Mapping[str, dict]], Sequence[str]] | None = None) -> Path:
    """A verified local directory holding the artifact (local URLs are verified in place).

    Every downloaded file is hash-checked before it enters the cache; a complete cache entry is then
    trusted on its sizes, unless ``recheck`` re-hashes it (repairing any file that changed). ``files``: download
    only these listed files (a name the manifest does not list is an ArtifactError), or those a function of the
    manifest's ``files`` picks (one manifest read for a reader that chooses by what is listed); the folder then
    holds them and the manifest, and :func:`listed_file` refuses the others as missing.
    """
    u = str(url)
    if not is_remote(u):
        manifest = verify(u)
        _unlisted(u, manifest, files(manifest["files"]) if callable(files) else files)
        return local_path(u)
    manifest, target, raw = _remote_artifact(u, cache_dir)
    if callable(files):
        files = list(files(manifest["files"]))
    _unlisted(u, manifest, files)
    wanted = manifest["files"] if files is None else {rel: manifest["files"][rel] for rel in files}
    done = target / ".anyflow-complete"
    with cache_lock(target):
        if not recheck and (done.exists() or files is not None) and all(
                (target / r).is_file() and (target / r).stat().st_size == e["size"] for r, e in wanted.items()):
            if files is not None and not (target / MANIFEST).is_file():
                local_write_atomic(target / MANIFEST, raw)
            return target

        def get(item: tuple[str, dict]) -> None:
            rel, entry = item
            download_verified(join(u, _object(rel, entry)), target / rel, entry, s3.iter_chunks, _check_entry, u, rel)

        with ThreadPoolExecutor(_WORKERS) as pool:
            list(pool.map(get, wanted.items()))
        local_write_atomic(target / MANIFEST, raw)
        if files is None:
            done.touch()
    return target


def _unlisted(url: str, manifest: dict, files: Sequence[str] | None) -> None:
    """ArtifactError naming the first of ``files`` that the manifest does not list."""
    for rel in files or ():
        if rel not in manifest["files"]:
            raise ArtifactError(f"{join(url, rel)}: file is not listed in the artifact's manifest "
                                f"(listed: {', '.join(list(manifest['files'])[:8]) or 'nothing'}).")


def fetch_file(url: str | os.PathLike, relpath: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """One file of an artifact as a verified local path (downloaded into the artifact cache if remote)."""
    u = str(url)
    manifest = read_manifest(u) if not is_remote(u) else None
    if manifest is None:
        manifest, target, _ = _remote_artifact(u, cache_dir)
    entry = manifest["files"].get(relpath)
    if entry is None:
        raise ArtifactError(f"{join(u, relpath)}: file is not listed in the artifact's manifest; "
                            f"check the file name (listed: {', '.join(list(manifest['files'])[:8])}).")
    if not is_remote(u):
        try:
            got = hash_inside(local_path(u), relpath, u)
        except FileNotFoundError as exc:
            raise ArtifactError(f"{join(u, relpath)}: file listed in the manifest is missing; "
                                f"re-publish the artifact.") from exc
        _check_entry(u, relpath, entry, got)
        return local_path(join(u, relpath))
    with cache_lock(target):
        download_verified(join(u, _object(relpath, entry)), target / relpath, entry, s3.iter_chunks, _check_entry,
                          u, relpath)
    return target / relpath


def bytes_received() -> int:
    """Bytes of object bodies this process has received from S3 so far (every GET: whole files, ranges,
    manifests, retries); local reads and cache hits count nothing. A counter for benchmarks and tests."""
    return s3.received()


def fetch_ranges(url: str | os.PathLike, relpath: str, ranges: Sequence[tuple[int, int]], sha256: str, *,
                 manifest: dict | None = None, cache_dir: str | os.PathLike | None = None) -> bytes:
    """The bytes of ``ranges`` (``(start, length)`` pairs) of the listed file ``relpath`` of the artifact at
    ``url``, concatenated and checked against ``sha256`` -- a digest the caller trusts, because the file's own
    manifest entry covers the whole file only (``anyflow.data.shards`` keeps one per row in its hash-checked
    ``index.json``).

    Remote: one ranged GET per range, and the checked bytes are kept in the cache under their digest
    (``<cache>/ranges/<sha256[:2]>/<sha256>``; a cached copy is re-hashed on every read, and one that does not
    match is fetched again), so bytes read once by a process on this machine are not transferred again. Local:
    read in place (no cache). ``manifest``: the artifact's manifest if the caller has it (saves a GET). Raises
    ArtifactError naming the file and the ranges when a range lies outside the listed size or the bytes do not
    match ``sha256``."""
    u = str(url)
    m = manifest if manifest is not None and "files" in manifest else read_manifest(u)
    entry = m["files"].get(relpath)
    if entry is None:
        raise ArtifactError(f"{join(u, relpath)}: file is not listed in the artifact's manifest.")
    spans = ", ".join(f"{a}-{a + n - 1}" for a, n in ranges[:4]) + (", ..." if len(ranges) > 4 else "")
    for a, n in ranges:
        if a < 0 or n < 0 or a + n > entry["size"]:
            raise ArtifactError(f"{join(u, relpath)}: bytes {a}-{a + n - 1} lie outside the file "
                                f"({entry['size']} bytes in the manifest).")
    cached = None
    if is_remote(u):
        cached = _cache_root(cache_dir) / "ranges" / sha256[:2] / sha256
        with contextlib.suppress(OSError):
            data = cached.read_bytes()
            if hashlib.sha256(data).hexdigest() == sha256:
                return data
            cached.unlink(missing_ok=True)
        obj = join(u, _object(relpath, entry))
        data = b"".join(s3.get_range(obj, a, n) for a, n in ranges)
    else:
        with open_inside(local_path(u), relpath, u) as f:
            parts = []
            for a, n in ranges:
                f.seek(a)
                parts.append(f.read(n))
        data = b"".join(parts)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ArtifactError(f"{join(u, relpath)}: bytes {spans} have sha256 {got[:16]}…, but {sha256[:16]}… was "
                            f"recorded for them; the file is corrupt or was replaced.")
    if cached is not None:  # best effort: the bytes are checked already; a full or broken cache only costs a GET
        tmp = cached.with_name(f".{cached.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, cached)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            _warn_cache_once(str(cached.parent.parent), f"anyflow: cannot keep fetched rows in "
                             f"{cached.parent.parent}: {exc}; reading on without the row cache.")
    return data


_cache_warned: set[str] = set()


def _warn_cache_once(root: str, message: str) -> None:
    """One stderr line per cache folder (not one per row)."""
    if root not in _cache_warned:
        _cache_warned.add(root)
        print(message, file=sys.stderr)


def file_url(url: str | os.PathLike, relpath: str, *, manifest: dict | None = None) -> str:
    """The URL where the file ``relpath`` of the artifact at ``url`` is stored, to open or hand to a person.

    On S3 a file lives under its publisher's staging prefix (the manifest's ``object``), not at
    ``url/relpath``; readers of the bytes use :func:`fetch_file`, which also verifies them. ``manifest``: the
    artifact's manifest when the caller has it already. A file the manifest does not list is an ArtifactError.
    """
    u = str(url)
    m = manifest if manifest is not None and "files" in manifest else read_manifest(u)
    entry = m["files"].get(relpath)
    if entry is None:
        raise ArtifactError(f"{join(u, relpath)}: file is not listed in the artifact's manifest.")
    return join(u, _object(relpath, entry))


def listed_file(root: str | os.PathLike, relpath: str) -> Path:
    """``root/relpath`` where ``root`` is a folder returned by :func:`fetch`, if its manifest lists the file.

    How stages open the files of a fetched artifact: a name that the manifest does not list (or that
    would leave the folder), a symlink, FIFO or device, or a size that differs raises ArtifactError
    naming the artifact and the file (the hashes were checked by :func:`fetch`).
    """
    base = local_path(root)
    manifest = _parse_manifest(base, _manifest_bytes(base))
    entry = manifest["files"].get(relpath)
    if entry is None:
        check_name(base, relpath, what="requested file")
        raise ArtifactError(f"{join(base, relpath)}: file is not listed in the artifact's manifest "
                            f"(listed: {', '.join(list(manifest['files'])[:8]) or 'nothing'}).")
    try:
        with open_inside(base, relpath, base) as f:
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError as exc:
        raise ArtifactError(f"{join(base, relpath)}: file listed in the manifest is missing; "
                            f"re-publish the artifact.") from exc
    if size != entry["size"]:
        raise ArtifactError(f"{join(base, relpath)}: size mismatch ({size} bytes, manifest says {entry['size']}); "
                            f"re-publish the artifact.")
    return base / relpath


def mirror(url: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, etag_md5: bool = True) -> Path:
    """Download a whole non-artifact prefix (e.g. a diffusers model folder) once into the local cache.

    The cache key is sha256 of the URL + the listing (keys, sizes, ETags), so a changed source is
    downloaded again; an interrupted mirror resumes (``.part`` files, ranged GETs). Every file's size
    is checked, and its MD5 against a single-part ETag when ``etag_md5`` (turn it off for buckets with
    SSE-KMS/SSE-C, whose ETags are not MD5s). Local paths are returned as is.
    """
    u = str(url)
    if not is_remote(u):
        return local_path(u)
    listing = sorted((check_name(u, o["key"], what="S3 listing key"), o["size"], o["etag"])
                     for o in s3.list_objects(u) if not (o["key"].endswith("/") and o["size"] == 0))  # folder markers
    if not listing:
        raise FileNotFoundError(f"{u}: no objects under this prefix; check the URL.")
    key = hashlib.sha256(json.dumps([u.rstrip("/"), listing]).encode()).hexdigest()
    target = _cache_root(cache_dir) / "mirror" / key
    target.mkdir(parents=True, exist_ok=True)
    done = target / ".anyflow-complete"
    with cache_lock(target):
        if done.exists():
            return target

        def get(item: tuple[str, int, str]) -> None:
            rel, size, etag = item
            md5 = etag.strip('"') if etag_md5 and etag and "-" not in etag else None  # single-part ETag = MD5
            entry = {"size": size, "md5": md5}
            download_verified(join(u, rel), target / rel, entry, s3.iter_chunks, _check_entry, u, rel)

        with ThreadPoolExecutor(_WORKERS) as pool:
            list(pool.map(get, listing))
        done.touch()
    return target


def lineage(url: str | os.PathLike) -> list[dict]:
    """The artifact's manifest and its parents' chain, breadth-first.

    Each item: ``{"uri", "depth", "manifest_sha256", "manifest", "recorded_sha256", "recorded_content_sha256",
    "ok"}`` where ``ok`` says whether the parent's current manifest hash equals the one its child recorded
    (``None`` for the root); a parent that is gone has ``manifest = None`` and ``ok = False``.
    ``recorded_content_sha256`` is the parent's :func:`content_digest` as its child recorded it (``None`` for the
    root and for manifests published before parents carried it).
    """
    out: list[dict] = []
    queue: list[tuple[str, int, str | None, str | None]] = [(str(url), 0, None, None)]
    seen: set[str] = set()
    while queue:
        uri, depth, recorded, recorded_content = queue.pop(0)
        if uri in seen:
            continue
        seen.add(uri)
        try:
            raw = _manifest_bytes(uri)
            m, digest = _parse_manifest(uri, raw), hashlib.sha256(raw).hexdigest()
        except (ArtifactError, StorageError):
            if depth == 0:
                raise
            m, digest = None, None
        ok = None if recorded is None else digest == recorded
        out.append({"uri": uri, "depth": depth, "manifest_sha256": digest, "manifest": m,
                    "recorded_sha256": recorded, "recorded_content_sha256": recorded_content, "ok": ok})
        for p in (m or {}).get("parents", []):
            queue.append((p["uri"], depth + 1, p.get("manifest_sha256"), p.get("content_sha256")))
    return out


# ------------------------------------------------------------------------ conditional writes
def read_bytes_etag(url: str | os.PathLike) -> tuple[bytes, str] | None:
    """Contents and a version tag (S3 ETag; sha256 locally), or ``None`` if the file is absent."""
    if is_remote(url):
        return s3.get_bytes(str(url))
    p = local_path(url)
    if not p.is_file():
        return None
    data = p.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def write_bytes_if(url: str | os.PathLike, data: bytes, *, if_match: str | None = None,
                   if_none_match: bool = False) -> str:
    """Compare-and-swap write: succeeds only if the current version tag is ``if_match`` (or, with
    ``if_none_match``, if the file does not exist); raises :class:`PreconditionFailed` otherwise.

    On S3 this is one conditional PUT (``If-Match`` / ``If-None-Match: *``), atomic on AWS S3 and on
    stores that implement conditional writes. Locally an ``flock`` serialises check and rename.
    """
    if is_remote(url):
        try:
            return s3.put_bytes(str(url), data, if_match=if_match, if_none_match=if_none_match)
        except FileNotFoundError as exc:  # If-Match on a deleted object: S3 answers 404
            raise PreconditionFailed(f"{url} was deleted under us (conditional write refused).") from exc
    p = local_path(url)
    p.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(p):
        cur = read_bytes_etag(p)
        if (if_none_match and cur is not None) or (if_match and (cur is None or cur[1] != if_match)):
            raise PreconditionFailed(f"{url} changed under us (conditional write refused).")
        local_write_atomic(p, data)
    return hashlib.sha256(data).hexdigest()
