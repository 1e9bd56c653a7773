"""S3 transport for :mod:`anyflow.storage` (private: nothing else imports this module).

boto3 does the S3 work of the artifact path because it lets us tune multipart transfers, issue ranged
GETs for resumable downloads, send conditional writes (``If-Match`` / ``If-None-Match``) and classify
errors ourselves. botocore's own retries are switched off (``total_max_attempts=1``) so that one retry
policy, :func:`call`, decides what is transient (5xx, throttling, connection resets, timeouts — retried
with exponential backoff) and what is permanent (403, missing bucket, bad keys — raised at once as a
:class:`StorageError` that says what to fix).

Settings come from the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``AWS_DEFAULT_REGION``, ...) plus the endpoint: ``configure(s3_endpoint=...)`` (the CLI's
``--s3-endpoint``) > ``ANYFLOW_S3_ENDPOINT`` > ``AWS_ENDPOINT_URL_S3`` > ``AWS_ENDPOINT_URL``.
Retry knobs: ``ANYFLOW_S3_RETRIES`` (attempts, default 8) and ``ANYFLOW_S3_RETRY_BASE`` (first
backoff in seconds, default 0.25; doubled per attempt, capped at 20 s, with jitter).

Timeouts, so that an endpoint that accepts connections and never answers cannot stall a call for minutes:

* ``ANYFLOW_S3_CONNECT_TIMEOUT`` (default 10 s): to open a connection;
* ``ANYFLOW_S3_READ_TIMEOUT`` (default 30 s): the longest silence while waiting for the next bytes of a
  response -- silence, not duration, so a slow but moving multi-GB transfer never trips it;
* ``ANYFLOW_S3_DEADLINE`` (default 120 s): the time one call may go without progress, retries included.
  A retry starts only if one silent request (connect + read timeout) would still end by the deadline, so a
  call to a silent endpoint gives up within the deadline. Uploads and copies are the exception by one attempt:
  botocore retries each of their requests itself (:data:`TRANSFER_ATTEMPTS`, so that one failed part does not
  restart a multi-GB upload), so their first attempt alone may last about 4 × (read timeout + 3 s).
  Downloads count the deadline from the last bytes received, so a long download that stalls is still
  retried; uploads and copies count it from the call's start (an upload that outlasts the deadline and then
  fails after botocore's own retries is not restarted here: raise the deadline for very large files).

A call that gives up raises :class:`StorageError` naming the URL, the endpoint and these settings.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_settings: dict[str, Any] = {"endpoint": None}
_clients: dict[tuple, Any] = {}
_lock = threading.Lock()
_received = [0]  # bytes of object bodies received by this process (:func:`received`)
_received_lock = threading.Lock()


def _count(n: int) -> None:
    with _received_lock:
        _received[0] += n


def received() -> int:
    """Bytes of object bodies this process has received from S3 so far: every GET counts what it read (whole
    objects, ranges, manifests, retried parts), so the counter is what moved over the wire minus headers."""
    with _received_lock:
        return _received[0]

TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "RequestTimeout", "RequestTimeoutException", "BadGateway", "GatewayTimeout", "503", "500", "502", "504",
}
PERMANENT_HINTS = {
    "AccessDenied": "check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket policy",
    "403": "check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket policy",
    "Forbidden": "check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket policy",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID (the key is unknown to this endpoint)",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY (the signature did not match)",
    "ExpiredToken": "refresh the session credentials (AWS_SESSION_TOKEN has expired)",
    "InvalidToken": "refresh the session credentials (AWS_SESSION_TOKEN is invalid)",
    "NoSuchBucket": "create the bucket or fix the bucket name in the URL / the endpoint (AWS_ENDPOINT_URL)",
    "AllAccessDisabled": "the bucket is disabled; use another bucket",
    "InvalidBucketName": "fix the bucket name in the URL",
}


class StorageError(OSError):
    """A storage request failed for good; the message names the URL and what to fix."""


class PreconditionFailed(StorageError):
    """A conditional write lost its race (the object changed or already exists)."""


def configure(*, s3_endpoint: str | None = None) -> None:
    """Set the S3 endpoint override (``None`` falls back to the environment)."""
    _settings["endpoint"] = s3_endpoint or None


def endpoint() -> str | None:
    """The S3 endpoint URL in effect, or ``None`` for AWS's default."""
    return (
        _settings["endpoint"]
        or os.environ.get("ANYFLOW_S3_ENDPOINT")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


TRANSFER_ATTEMPTS = 4  # botocore's own attempts per request of the transfer client (multipart parts)
_TIMEOUTS = {"connect": ("ANYFLOW_S3_CONNECT_TIMEOUT", 10.0), "read": ("ANYFLOW_S3_READ_TIMEOUT", 30.0),
             "deadline": ("ANYFLOW_S3_DEADLINE", 120.0)}


def timeouts() -> dict[str, float]:
    """``{"connect", "read", "deadline"}`` in seconds from the environment (see the module docstring)."""
    out = {}
    for name, (var, default) in _TIMEOUTS.items():
        raw = os.environ.get(var, "").strip()
        try:
            value = float(raw) if raw else default
        except ValueError:
            value = float("nan")
        if not 0 < value < float("inf"):
            raise StorageError(f"{var}={raw!r} is not a positive number of seconds (default {default:g}).")
        out[name] = value
    return out


def _env_key() -> tuple:
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "AWS_DEFAULT_REGION", "AWS_REGION")
    t = timeouts()
    return (endpoint(), *(os.environ.get(n) for n in names), t["connect"], t["read"])


def client(*, transfer: bool = False) -> Any:
    """A boto3 S3 client for the current settings (cached per endpoint + credentials).

    The ``transfer`` client (multipart uploads and copies) lets botocore retry each part itself
    (standard mode, :data:`TRANSFER_ATTEMPTS` attempts), so one failed part does not restart a multi-GB upload.
    Connect and read timeouts: :func:`timeouts`.
    """
    key = (*_env_key(), transfer)
    with _lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            ep, t = endpoint(), timeouts()
            cfg = Config(
                retries={"total_max_attempts": TRANSFER_ATTEMPTS if transfer else 1, "mode": "standard"},  # else: call()
                connect_timeout=t["connect"],
                read_timeout=t["read"],
                max_pool_connections=32,
                s3={"addressing_style": "path"} if ep else {},
                # S3-compatible stores (MinIO, Ceph, moto) differ in their support of the newer
                # default CRC checksums; we hash every file ourselves, so only send them when required.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=ep, region_name=region, config=cfg)
        return _clients[key]


def split(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


def _wraps_by_context(exc: BaseException) -> bool:
    """boto3's transfer errors re-raise the botocore error inside ``except`` without ``from``."""
    try:
        from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (S3UploadFailedError, S3TransferFailedError)) and not exc.__suppress_context__


def _cause(exc: BaseException) -> BaseException:
    """The botocore error behind a wrapper: an explicit ``__cause__`` (``raise ... from``), or the
    ``__context__`` of boto3's transfer wrappers only. Any other exception raised while another was being
    handled (a connection error inside an ``except ClientError`` block) is itself the error: following its
    context would classify a transient failure by the unrelated error before it."""
    seen = 0
    while getattr(exc, "response", None) is None and seen < 5:
        nxt = exc.__cause__ or (exc.__context__ if _wraps_by_context(exc) else None)
        if nxt is None:
            break
        exc, seen = nxt, seen + 1
    return exc


def _code(exc: BaseException) -> str | None:
    exc = _cause(exc)
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error", {})
        code = err.get("Code")
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(code or status or "")
    return None


def classify(exc: BaseException) -> str:
    """``"transient"``, ``"permanent"``, ``"missing"``, ``"precondition"`` or ``"other"``."""
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )
    from botocore.exceptions import (
        HTTPClientError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    code = _code(exc)
    if code is not None:
        exc = _cause(exc)
        if code in ("NoSuchKey", "404", "NotFound"):
            return "missing"
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return "precondition"
        if code in PERMANENT_HINTS:
            return "permanent"
        if code in TRANSIENT_CODES or code.startswith("5"):
            return "transient"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)  # type: ignore[attr-defined]
        return "transient" if status >= 500 or status == 429 else "other"
    transient = (BotoConnectionError, HTTPClientError, IncompleteReadError, ReadTimeoutError,
                 ResponseStreamingError, ConnectionError, socket.timeout, TimeoutError)
    if isinstance(exc, transient):
        return "transient"
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error

        if isinstance(exc, Urllib3Error):
            return "transient"
    except ImportError:  # pragma: no cover
        pass
    return "other"


def permanent_error(url: str, exc: BaseException) -> StorageError:
    code = _code(exc) or type(exc).__name__
    hint = PERMANENT_HINTS.get(code, "check the URL and the credentials")
    if code in ("NoSuchBucket", "InvalidBucketName"):
        what = f"bucket {split(url)[0]!r} does not exist at endpoint {endpoint() or 'AWS S3'}"
    else:
        what = f"S3 refused the request ({code})"
    return StorageError(f"{url}: {what}; {hint}.")


def _sleep_for(attempt: int) -> float:
    base = float(os.environ.get("ANYFLOW_S3_RETRY_BASE", "0.25"))
    return min(base * 2**attempt, 20.0) * (0.5 + random.random() / 2)


def attempts() -> int:
    return max(1, int(os.environ.get("ANYFLOW_S3_RETRIES", "8")))


class Progress:
    """When a call last made progress (:func:`call`'s deadline counts from it): its start, then the last bytes
    a download received (``touch``). Uploads report no progress: boto3's transfer callbacks count bytes handed
    to a socket (even to an endpoint that never answers), not bytes the endpoint took."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


def _gave_up(url: str, last: BaseException | None, tries: int, started: float, t: dict[str, float]) -> StorageError:
    return StorageError(
        f"{url}: S3 request failed {tries} time{'s' if tries != 1 else ''} with transient errors in {time.monotonic() - started:.0f} s "
        f"(last: {last!r}); check that the endpoint {endpoint() or 'AWS S3'} is reachable and healthy, then retry "
        f"(timeouts: ANYFLOW_S3_CONNECT_TIMEOUT={t['connect']:g} s, ANYFLOW_S3_READ_TIMEOUT={t['read']:g} s, "
        f"ANYFLOW_S3_DEADLINE={t['deadline']:g} s)."
    )


def call(url: str, fn: Callable[[], T], *, missing_ok: bool = False, progress: Progress | None = None) -> T | None:
    """Run ``fn`` with retries on transient errors; translate the rest into clear errors.

    Returns ``None`` for a missing key when ``missing_ok``; raises ``FileNotFoundError`` otherwise. A retry
    starts only if one silent request (connect + read timeout) would still end before the deadline, counted
    from ``progress.last`` (default: the call's start); see the module docstring.
    """
    t = timeouts()
    started = time.monotonic()
    progress = progress or Progress()
    worst = t["connect"] + t["read"]
    last: BaseException | None = None
    tries = 0
    for attempt in range(attempts()):
        try:
            tries += 1
            return fn()
        except Exception as exc:
            kind = classify(exc)
            if kind == "missing":
                if missing_ok:
                    return None
                raise FileNotFoundError(f"{url} does not exist.") from exc
            if kind == "precondition":
                raise PreconditionFailed(f"{url} changed under us (conditional write refused).") from exc
            if kind == "permanent":
                raise permanent_error(url, exc) from exc
            if kind != "transient":
                raise
            last = exc
            if attempt + 1 < attempts():
                pause = _sleep_for(attempt)
                if time.monotonic() + pause + worst > progress.last + t["deadline"]:
                    break  # a silent next attempt would end past the deadline
                time.sleep(pause)
    raise _gave_up(url, last, tries, started, t) from last


def check_bucket(url: str) -> None:
    """Fail fast with a clear message when the bucket is missing or not ours."""
    bucket, _ = split(url)
    try:
        call(url, lambda: client().head_bucket(Bucket=bucket))
    except FileNotFoundError as exc:  # HEAD has no body: a 404 here means "no such bucket"
        raise StorageError(
            f"{url}: bucket {bucket!r} does not exist at endpoint {endpoint() or 'AWS S3'}; "
            f"{PERMANENT_HINTS['NoSuchBucket']}."
        ) from exc


def head(url: str) -> dict | None:
    """``{"size", "etag"}`` of an object, or ``None`` if it does not exist."""
    bucket, key = split(url)
    r = call(url, lambda: client().head_object(Bucket=bucket, Key=key), missing_ok=True)
    return None if r is None else {"size": r["ContentLength"], "etag": r["ETag"]}


def get_bytes(url: str) -> tuple[bytes, str] | None:
    """Object bytes and ETag, or ``None`` if it does not exist."""
    bucket, key = split(url)

    def go() -> tuple[bytes, str]:
        r = client().get_object(Bucket=bucket, Key=key)
        data = r["Body"].read()
        _count(len(data))
        return data, r["ETag"]

    return call(url, go, missing_ok=True)


def put_bytes(url: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
    """Write an object (optionally conditionally); returns the new ETag."""
    bucket, key = split(url)
    kw: dict[str, Any] = {}
    if if_match:
        kw["IfMatch"] = if_match
    if if_none_match:
        kw["IfNoneMatch"] = "*"
    r = call(url, lambda: client().put_object(Bucket=bucket, Key=key, Body=data, **kw))
    return r["ETag"]


def transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    mib = 1024 * 1024
    return TransferConfig(
        multipart_threshold=int(os.environ.get("ANYFLOW_S3_MULTIPART_THRESHOLD", str(64 * mib))),
        multipart_chunksize=int(os.environ.get("ANYFLOW_S3_MULTIPART_CHUNKSIZE", str(16 * mib))),
        max_concurrency=int(os.environ.get("ANYFLOW_S3_CONCURRENCY", "8")),
        use_threads=True,
    )


def upload_file(path: Path, url: str) -> None:
    """Streamed upload of a local file (multipart + concurrent above the threshold), with retries."""
    bucket, key = split(url)
    call(url, lambda: client(transfer=True).upload_file(str(path), bucket, key, Config=transfer_config()))


def iter_chunks(url: str, *, start: int = 0, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Stream an object's bytes from ``start``; a connection lost mid-body resumes with a ranged GET."""
    bucket, key = split(url)
    pos, failures = start, 0
    moved = Progress()  # the deadline counts from the last bytes received
    while True:
        kw = {"Range": f"bytes={pos}-"} if pos else {}
        body = call(url, lambda kw=kw: client().get_object(Bucket=bucket, Key=key, **kw)["Body"], progress=moved)
        try:
            while True:
                data = body.read(chunk)
                if not data:
                    return
                pos += len(data)
                _count(len(data))
                failures = 0
                moved.touch()
                yield data
        except Exception as exc:
            if classify(exc) != "transient" or failures + 1 >= attempts():
                raise StorageError(f"{url}: reading the object failed at byte {pos} ({exc!r}).") from exc
            t = timeouts()
            pause = _sleep_for(failures)
            if time.monotonic() + pause + t["connect"] + t["read"] > moved.last + t["deadline"]:
                raise StorageError(f"{url}: reading the object stalled at byte {pos} ({exc!r}); check that the "
                                   f"endpoint {endpoint() or 'AWS S3'} is healthy (ANYFLOW_S3_DEADLINE="
                                   f"{t['deadline']:g} s).") from exc
            failures += 1
            time.sleep(pause)


def get_range(url: str, start: int, length: int) -> bytes:
    """Bytes ``[start, start + length)`` of an object: one ranged GET (``Range: bytes=a-b``), retried as a whole
    by :func:`call` on transient errors (a range is small next to a whole object); ``FileNotFoundError`` if the
    object is gone, :class:`StorageError` if the store answers with fewer bytes (the object is shorter)."""
    bucket, key = split(url)
    if length <= 0:
        return b""

    def go() -> bytes:
        body = client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")["Body"]
        data = body.read()
        _count(len(data))
        return data

    def shorter(got: int) -> StorageError:
        return StorageError(f"{url}: asked for bytes {start}-{start + length - 1} and got {got} bytes; the object is "
                            f"shorter than the manifest says -- re-publish the artifact.")

    try:
        data = call(url, go)
    except Exception as exc:  # 416 InvalidRange: the object ends before `start` (the whole range past its end)
        if _code(exc) in ("InvalidRange", "416"):
            raise shorter(0) from exc
        raise
    if data is None or len(data) != length:
        raise shorter(0 if data is None else len(data))
    return data


def list_objects(url: str, *, limit: int | None = None) -> list[dict]:
    """Objects under a prefix (all, or the first ``limit``): ``{"key", "size", "etag"}`` (relative keys)."""
    bucket, prefix = split(url)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    out: list[dict] = []

    def page(token: str | None) -> dict:
        kw: dict[str, Any] = {"ContinuationToken": token} if token else {}
        if limit:
            kw["MaxKeys"] = limit
        return client().list_objects_v2(Bucket=bucket, Prefix=prefix, **kw)

    token = None
    while True:
        r = call(url, lambda token=token: page(token))
        for o in r.get("Contents", []):
            out.append({"key": o["Key"][len(prefix):], "size": o["Size"], "etag": o.get("ETag", ""),
                        "modified": o.get("LastModified")})
        if not r.get("IsTruncated") or (limit and len(out) >= limit):
            return out
        token = r["NextContinuationToken"]


def delete(urls: list[str]) -> None:
    """Delete objects (batched; missing ones are fine)."""
    by_bucket: dict[str, list[str]] = {}
    for u in urls:
        b, k = split(u)
        by_bucket.setdefault(b, []).append(k)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            call(f"s3://{bucket}/", lambda batch=batch, bucket=bucket: client().delete_objects(
                Bucket=bucket, Delete={"Objects": batch, "Quiet": True}))


def copy(src: str, dst: str) -> None:
    """Server-side copy (multipart for big objects)."""
    sb, sk = split(src)
    db, dk = split(dst)
    call(dst, lambda: client(transfer=True).copy({"Bucket": sb, "Key": sk}, db, dk, Config=transfer_config()))
