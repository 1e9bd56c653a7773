"""Local-file helpers of :mod:`anyflow.storage` (private): hashing, atomic writes, cache locks and the
verified, resumable download of one file. Nothing here opens a remote URL itself."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20


class ArtifactError(Exception):
    """An artifact was refused; the message names the URL, the file and what to do."""


def check_name(art_url: str | os.PathLike, rel: Any, *, what: str = "file name in the manifest") -> str:
    """``rel`` if it is a safe name of a file *inside* an artifact, else :class:`ArtifactError` naming both.

    The one check every reader applies to a name that came from storage (manifest entries, S3 listing
    keys): a non-empty relative POSIX path of plain segments -- no leading ``/``, no ``.`` / ``..`` or
    empty segments, no backslash, no NUL -- so that ``root / rel`` can never leave ``root``.
    """
    why = None
    if not isinstance(rel, str) or not rel:
        why = "is empty or not a string"
    elif "\x00" in rel:
        why = "contains a NUL byte"
    elif "\\" in rel:
        why = "contains a backslash"
    elif rel.startswith("/"):
        why = "is an absolute path"
    elif any(seg in ("", ".", "..") for seg in rel.split("/")):
        why = "has an empty, '.' or '..' segment"
    if why:
        raise ArtifactError(f"{art_url}: {what} {rel!r} {why}; only relative paths inside the artifact are "
                            f"allowed, so the artifact is refused (corrupt or hostile) -- re-publish it.")
    return rel


def open_inside(root: Path, rel: str, art_url: str | os.PathLike) -> IO[bytes]:
    """Open ``root/rel`` for reading if it is a regular file reached without any symbolic link.

    ``rel`` must have passed :func:`check_name`. A symlink (anywhere on the path), FIFO, device or
    folder raises :class:`ArtifactError` naming the artifact and the file; opening never blocks (a FIFO
    is opened non-blocking and refused); a missing file raises ``FileNotFoundError``.
    """
    path = Path(root) / rel
    if os.path.lexists(path) and os.path.realpath(path) != os.path.join(os.path.realpath(root), rel):
        raise ArtifactError(f"{art_url}: {rel} is a symbolic link or lies under one; artifact files must be "
                            f"regular files inside the artifact -- the artifact is refused, re-publish it.")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ArtifactError(f"{art_url}: {rel} cannot be opened as a regular file ({exc.strerror}); the "
                            f"artifact is refused, re-publish it.") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a folder" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise ArtifactError(f"{art_url}: {rel} is {kind}, not a regular file; the artifact is refused, "
                            f"re-publish it.")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def hash_inside(root: Path, rel: str, art_url: str | os.PathLike) -> dict:
    """``{"size", "sha256"}`` of ``root/rel`` opened with :func:`open_inside`."""
    with open_inside(root, rel, art_url) as f:
        h, _, n = _hash_stream(f, False)
    return {"size": n, "sha256": h.hexdigest()}


def local_path(url: str | os.PathLike) -> Path:
    """A local URL (plain path or ``file://``) as an absolute ``Path``."""
    u = str(url)
    if u.startswith("file://"):
        u = u[len("file://"):]
    return Path(u).expanduser().absolute()


def hash_file(path: Path, *, md5: bool = False) -> dict:
    """``{"size", "sha256"}`` (and ``"md5"`` on request) of a local file, streamed."""
    h, m, n = _hash_prefix(path, md5)
    out = {"size": n, "sha256": h.hexdigest()}
    if m is not None:
        out["md5"] = m.hexdigest()
    return out


def local_write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp name beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` beside ``path`` (one downloader per cache entry across processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


_STALE_UNLOCKED_S = 60.0  # a private folder with no lock file yet: a writer killed right after creating it


@contextlib.contextmanager
def private_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder ``parent/<prefix><random>`` for one writer, held with an exclusive ``flock`` on its ``.lock``
    while the block runs and removed at its end. Folders of ``parent`` with this prefix whose writer is gone
    (lock free: the kernel drops it when a process dies, SIGKILL included) are removed first -- never a live
    writer's. The lock file is locked under a temporary name and then renamed to ``.lock``, so a cleaner never
    finds an unlocked ``.lock`` of a live writer."""
    parent.mkdir(parents=True, exist_ok=True)
    clean_dead(parent, prefix)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    pending = work / f".lock.tmp-{uuid.uuid4().hex[:8]}"
    fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(pending, work / ".lock")
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(fd)


def clean_dead(parent: Path, prefix: str) -> list[Path]:
    """Remove the :func:`private_dir` folders under ``parent`` whose writer is gone; returns them."""
    removed = []
    for run in parent.glob(f"{prefix}*"):
        try:
            fd = os.open(run / ".lock", os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if run.is_dir() and time.time() - run.lstat().st_mtime > _STALE_UNLOCKED_S:
                    shutil.rmtree(run, ignore_errors=True)
                    removed.append(run)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer
        finally:
            os.close(fd)
        shutil.rmtree(run, ignore_errors=True)
        removed.append(run)
    return removed


@functools.cache
def _git_sha() -> str | None:
    if os.environ.get("ANYFLOW_GIT_SHA"):
        return os.environ["ANYFLOW_GIT_SHA"]
    git = Path(__file__).resolve().parents[1] / ".git"
    try:
        if git.is_file():  # worktree / submodule: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(" ", 1)[1]
        common = git / "commondir"
        roots = [git] + ([(git / common.read_text().strip()).resolve()] if common.is_file() else [])
        for root in roots:
            if (root / ref).is_file():
                return (root / ref).read_text().strip()
            packed = root / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0]
    except OSError:
        return None
    return None


def code_version() -> dict:
    """``{"anyflow": __version__, "git_sha": sha or None}`` (``ANYFLOW_GIT_SHA`` overrides)."""
    from anyflow import __version__

    return {"anyflow": __version__, "git_sha": _git_sha()}


def _hash_stream(f: IO[bytes], md5: bool) -> tuple[Any, Any, int]:
    h, m, n = hashlib.sha256(), hashlib.md5() if md5 else None, 0
    while chunk := f.read(_CHUNK):
        h.update(chunk)
        if m is not None:
            m.update(chunk)
        n += len(chunk)
    return h, m, n


def _hash_prefix(path: Path, md5: bool) -> tuple[Any, Any, int]:
    with open(path, "rb") as f:
        return _hash_stream(f, md5)


def _matches(got: dict, entry: dict) -> bool:
    if got["size"] != entry["size"]:
        return False
    if entry.get("sha256") and got["sha256"] != entry["sha256"]:
        return False
    return not (entry.get("md5") and got.get("md5") != entry["md5"])


def download_verified(
    file_url: str,
    dest: Path,
    entry: dict,
    iter_chunks: Callable[..., Iterator[bytes]],
    check_entry: Callable[[str, str, dict, dict], None],
    art_url: str,
    rel: str,
) -> None:
    """Make ``dest`` hold the verified bytes of ``file_url`` (``entry``: size + sha256 and/or md5).

    A complete, matching ``dest`` is kept (nothing downloaded). Otherwise the bytes are streamed into
    ``dest.part``; an existing shorter ``.part`` is resumed with a ranged GET (its prefix is hashed, not
    re-downloaded). A resumed file that does not verify is downloaded once more from scratch; a fresh
    download that does not verify raises :class:`ArtifactError` naming the URL and the file.
    """
    md5 = bool(entry.get("md5"))
    if dest.is_file():
        if dest.stat().st_size == entry["size"] and _matches(hash_file(dest, md5=md5), entry):
            return
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for fresh in (False, True):
        if fresh or (part.exists() and part.stat().st_size > entry["size"]):
            part.unlink(missing_ok=True)
        h, m, start = _hash_prefix(part, md5) if part.exists() else (hashlib.sha256(),
                                                                    hashlib.md5() if md5 else None, 0)
        n = start
        if start < entry["size"] or entry["size"] == 0:
            try:
                with open(part, "ab") as f:
                    for chunk in iter_chunks(file_url, start=start):
                        f.write(chunk)
                        h.update(chunk)
                        if m is not None:
                            m.update(chunk)
                        n += len(chunk)
            except FileNotFoundError as exc:
                where = "" if file_url.endswith("/" + rel) else f" (stored at {file_url})"
                raise ArtifactError(f"{str(art_url).rstrip('/')}/{rel}: file listed in the manifest is missing{where}; "
                                    f"re-publish the artifact.") from exc
        got = {"size": n, "sha256": h.hexdigest(), **({"md5": m.hexdigest()} if m is not None else {})}
        if _matches(got, entry):
            os.replace(part, dest)
            return
        if start == 0 or fresh:
            part.unlink(missing_ok=True)
            if "sha256" in entry:
                check_entry(art_url, rel, entry, got)
            raise ArtifactError(f"{file_url}: downloaded bytes do not match the listing (size {n} vs "
                                f"{entry['size']}, md5); the source changed while mirroring, retry.")
