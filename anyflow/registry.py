"""Model registry: a promoted alias per model name, its history, a lease, and the promotion gate.

Layout under a store root (local directory or ``s3://bucket/prefix``), all written via
:mod:`anyflow.storage`::

    <root>/models/<name>/promoted.json                      the live alias (see below)
    <root>/models/<name>/history/<UTC timestamp>-<seq>.json  one per promote / reject / rollback / conflict
    <root>/models/<name>/lease.json                         the lease of the run that may move the alias

``promoted.json`` = ``{"name", "uri", "manifest_sha256", "kind", "since", "metrics", "reason", "stack"}``;
``stack`` holds the earlier promoted entries (newest last, at most 50) so that :func:`rollback` is a
single compare-and-swap of the alias, like :func:`promote`.

Concurrency. Every alias change is one conditional write (S3 ``If-Match`` on the ETag read, or
``If-None-Match: *`` for the first promotion; an ``flock``-guarded rename locally), so two overlapping
runs cannot interleave a read-modify-write: the loser gets :class:`AliasConflict` and the alias holds
the winner's complete entry. ``expected_current`` lets a run also insist that the alias still points
at the model it evaluated against. On AWS S3 (and MinIO/Ceph versions with conditional writes) there
is no race window. On stores that ignore the conditional headers, two writers within one round-trip
of each other can both "win" (last write wins); use a :class:`Lease` or KFP's
``max_concurrency=1`` for the recurring run there. Moto (the test server) checks the condition and
stores in two steps, so the test server itself has a tiny window; the tests do not depend on it.

Retries are idempotent. A conditional PUT whose response is lost is retried by the transport and then
answered 412 although *our* write landed; a create-only history write likewise. So every alias change
carries a request id (``request``) in the written document and every history entry carries it in its
content and file name: after a 412 (or a transient failure that gave up) the registry reads back and
decides by content -- the alias (or an entry of its rollback stack) holding our request id means our
write landed -- so each promotion / rollback happens exactly once from the caller's view, with exactly
one history entry. A caller that retries a whole ``promote`` passes the same ``request_id``.

Version tags are content-based (S3 ETag = MD5 of the bytes; sha256 locally), so a write that restores
byte-identical content does not invalidate a tag — harmless here, because every alias and lease
document carries a fresh timestamp and identical bytes mean an identical state.

Leases use the same conditional writes. Expiry uses the writer's wall clock: keep ``ttl_s`` far above
clock skew, and ``renew()`` well within it. A holder that stalls past its expiry loses the lease
silently — its later ``renew()`` raises :class:`LeaseLost`, and its alias CAS still protects the alias.
``resume()`` lets another process with the same ``owner`` (the next KFP task of one run) take the lease
back as long as nobody else wrote it since; :mod:`anyflow.ops.lease` adds the heartbeat.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from anyflow import storage

NO_ALIAS = ""  # ``expected_current`` value that means "no model is promoted yet"
_STACK_MAX = 50


class RegistryError(Exception):
    """A registry operation was refused; the message says why and what to do."""


class AliasConflict(RegistryError):
    """The alias changed between read and write (another run promoted/rolled back first)."""


class LeaseHeld(RegistryError):
    """Another owner holds an unexpired lease."""


class LeaseLost(RegistryError):
    """Our lease expired and was taken (or released) by someone else."""


def _dir(root: str, name: str, *parts: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise RegistryError(f"model name {name!r} is invalid; use a plain name such as 'anyflow-t2v'.")
    return storage.join(root, "models", name, *parts)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def _read_alias(root: str, name: str) -> tuple[dict | None, str | None]:
    got = storage.read_bytes_etag(_dir(root, name, "promoted.json"))
    return (None, None) if got is None else (json.loads(got[0]), got[1])


def promoted(root: str, name: str) -> dict | None:
    """The live alias entry of ``name`` (without its rollback stack), or ``None``."""
    entry, _ = _read_alias(root, name)
    return None if entry is None else {k: v for k, v in entry.items() if k != "stack"}


def _new_request() -> str:
    return uuid.uuid4().hex


def _record(root: str, name: str, event: dict, request: str | None = None) -> dict:
    """Append one history entry with a create-only write, so no entry ever overwrites another.

    ``seq`` (count of entries seen + 1) orders entries that share a timestamp; two writers racing in
    the same instant may get the same seq, but different file names, and both entries are kept.
    The file name ends with ``-<event>-<request>.json``: an entry of this request that is already there
    (a retried write whose response was lost, or a retried call) is returned instead of written twice.
    """
    hdir = _dir(root, name, "history")
    request = request or _new_request()
    event = {"at": _now(), "name": name, **event, "request": request}
    suffix = f"-{event['event']}-{request}.json"

    def mine() -> dict | None:
        names = [u.rsplit("/", 1)[-1] for u in storage.list_prefix(hdir) if u.endswith(".json")]
        hit = next((n for n in names if n.endswith(suffix)), None)
        return None if hit is None else {**storage.read_json(storage.join(hdir, hit)), "file": hit}

    for _ in range(20):
        found = mine()
        if found is not None:
            return found
        seq = len([u for u in storage.list_prefix(hdir) if u.endswith(".json")]) + 1
        fname = f"{_stamp(time.time())}-{seq:06d}{suffix}"
        try:
            storage.write_bytes_if(storage.join(hdir, fname), _bytes({**event, "seq": seq}), if_none_match=True)
            return {**event, "seq": seq, "file": fname}
        except storage.PreconditionFailed:
            continue  # our own write answered late, or a name taken: look again
        except storage.StorageError:
            found = mine()  # gave up on transient errors: did the write land anyway?
            if found is None:
                raise
            return found
    raise RegistryError(f"{hdir}: could not add a history entry after 20 tries; check for a runaway writer.")


def _stamp(t: float) -> str:
    """``YYYYmmddTHHMMSS.ffffffZ`` of one clock reading: seconds and microseconds from the same ``t`` (two
    readings could straddle a second and sort an entry a second early), microseconds truncated (rounding
    0.9999996 would give .000000 of the same second)."""
    whole = math.floor(t)
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(whole)) + f".{min(int((t - whole) * 1e6), 999_999):06d}Z"


def history(root: str, name: str) -> list[dict]:
    """Every recorded event of ``name``, oldest first (each with its ``file`` name)."""
    out = []
    for url in storage.list_prefix(_dir(root, name, "history")):
        if url.endswith(".json"):
            out.append({**storage.read_json(url), "file": url.rsplit("/", 1)[-1]})
    return sorted(out, key=lambda e: (e["file"].split("-")[0], e.get("seq", 0)))


def _check_expected(root: str, name: str, current: dict | None, expected: str | None) -> None:
    if expected is None:
        return
    have = current["manifest_sha256"] if current else NO_ALIAS
    if have != expected:
        raise AliasConflict(
            f"{_dir(root, name, 'promoted.json')}: alias points at {have or 'nothing'}, expected "
            f"{expected or 'nothing'}; another run moved it — re-evaluate against the new alias."
        )


def _landed(entry: dict | None, request: str) -> bool:
    """Did the alias change of ``request`` land (it is live, or an entry of the rollback stack)?"""
    if entry is None:
        return False
    return entry.get("request") == request or any(e.get("request") == request for e in entry.get("stack", []))


def _swap(root: str, name: str, new: dict, etag: str | None) -> None:
    """One compare-and-swap of the alias; after a refusal or a give-up, read back and decide by content."""
    url = _dir(root, name, "promoted.json")
    try:
        storage.write_bytes_if(url, _bytes(new), if_match=etag, if_none_match=etag is None)
    except storage.StorageError as exc:  # PreconditionFailed included
        try:
            current, _ = _read_alias(root, name)
        except Exception:  # cannot tell: report the write's own error
            current = None
        if _landed(current, new["request"]):
            return  # our PUT landed; the 412 answered its retry
        if isinstance(exc, storage.PreconditionFailed):
            raise AliasConflict(f"{url}: the alias changed while we were updating it; another run moved it "
                                f"first — re-read it and retry.") from exc
        raise


def promote(root: str, name: str, uri: str, *, metrics: Mapping[str, Any], reason: str,
            expected_current: str | None = None, request_id: str | None = None) -> dict:
    """Point ``name`` at the artifact ``uri`` (verified first) with one compare-and-swap write.

    ``expected_current``: the ``manifest_sha256`` the caller believes is live (``NO_ALIAS`` for none);
    ``None`` skips that check (the write is still atomic against concurrent changes).
    ``request_id``: pass the same id when retrying a call whose outcome is unknown; a promotion that
    already landed is then returned (and recorded once) instead of being applied again.
    Raises :class:`AliasConflict` (recorded in the history as a ``conflict`` event) if it lost a race.
    """
    request = request_id or _new_request()
    manifest = storage.verify(uri)
    digest = storage.manifest_digest(uri)
    current, etag = _read_alias(root, name)
    if _landed(current, request):  # a retried call whose first attempt landed
        entry = current if current.get("request") == request else next(
            e for e in current["stack"] if e.get("request") == request)
        _record(root, name, {"event": "promote", "uri": entry["uri"], "manifest_sha256": entry["manifest_sha256"],
                             "metrics": entry.get("metrics", {}), "reason": entry.get("reason")}, request)
        return {k: v for k, v in entry.items() if k != "stack"}
    new = {"name": name, "uri": uri, "manifest_sha256": digest, "kind": manifest["kind"], "since": _now(),
           "metrics": dict(metrics), "reason": reason, "request": request, "stack": []}
    if current is not None:
        prev = {k: v for k, v in current.items() if k != "stack"}
        new["stack"] = ([*current.get("stack", []), prev])[-_STACK_MAX:]
    try:
        _check_expected(root, name, current, expected_current)
        _swap(root, name, new, etag)
    except AliasConflict as exc:
        _record(root, name, {"event": "conflict", "uri": uri, "manifest_sha256": digest,
                             "metrics": dict(metrics), "reason": f"{reason} — not promoted: {exc}"}, request)
        raise
    _record(root, name, {"event": "promote", "uri": uri, "manifest_sha256": digest, "metrics": dict(metrics),
                         "reason": reason, "replaced": current and current["manifest_sha256"]}, request)
    return {k: v for k, v in new.items() if k != "stack"}


def record_rejection(root: str, name: str, uri: str, *, metrics: Mapping[str, Any], reason: str) -> dict:
    """Record that candidate ``uri`` was not promoted, with the metrics that decided it."""
    try:
        digest = storage.manifest_digest(uri)
    except storage.ArtifactError:
        digest = None
    live = promoted(root, name)
    return _record(root, name, {"event": "reject", "uri": uri, "manifest_sha256": digest,
                                "metrics": dict(metrics), "reason": reason,
                                "promoted": live and live["manifest_sha256"]})


def rollback(root: str, name: str, *, reason: str = "manual rollback",
             expected_current: str | None = None, request_id: str | None = None) -> dict:
    """Restore the previously promoted entry (one compare-and-swap); returns the new live entry.
    ``request_id`` as in :func:`promote`."""
    request = request_id or _new_request()
    current, etag = _read_alias(root, name)
    if current is not None and current.get("request") == request:  # a retried call whose first attempt landed
        _record(root, name, {"event": "rollback", "uri": current["uri"], "manifest_sha256": current["manifest_sha256"],
                             "metrics": current.get("metrics", {}), "reason": reason}, request)
        return {k: v for k, v in current.items() if k != "stack"}
    if current is None or not current.get("stack"):
        raise RegistryError(f"{_dir(root, name, 'promoted.json')}: nothing to roll back to "
                            f"(no earlier promotion of {name!r}).")
    _check_expected(root, name, current, expected_current)
    target = current["stack"][-1]
    if storage.manifest_digest(target["uri"]) != target["manifest_sha256"]:
        raise RegistryError(f"{target['uri']}: the artifact changed since it was promoted (manifest sha256 "
                            f"differs); promote a verified artifact instead of rolling back.")
    new = {**target, "since": _now(), "reason": f"rollback: {reason}", "request": request,
           "stack": current["stack"][:-1]}
    _swap(root, name, new, etag)
    _record(root, name, {"event": "rollback", "uri": target["uri"], "manifest_sha256": target["manifest_sha256"],
                         "metrics": target.get("metrics", {}), "reason": reason,
                         "replaced": current["manifest_sha256"]}, request)
    return {k: v for k, v in new.items() if k != "stack"}


def list_models(root: str) -> list[str]:
    """Names of every model with an alias or a history under ``root``."""
    base = storage.join(root, "models")
    names = set()
    for url in storage.list_prefix(base):
        rest = url[len(base):].lstrip("/").replace(os.sep, "/")
        if "/" in rest:
            names.add(rest.split("/", 1)[0])
    return sorted(names)


class Lease:
    """An expiring lock at ``<root>/models/<name>/lease.json`` (see the module docstring for races).

    ``with Lease(root, name, ttl_s=900):`` acquires (waiting up to ``wait_s``) and releases.
    """

    def __init__(self, root: str, name: str, *, owner: str | None = None, ttl_s: float = 900.0,
                 wait_s: float = 0.0, poll_s: float = 1.0):
        self.url = _dir(root, name, "lease.json")
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_s, self.wait_s, self.poll_s = ttl_s, wait_s, poll_s
        self._etag: str | None = None

    def _body(self, ttl: float, released: bool = False) -> bytes:
        now = time.time()
        return _bytes({"owner": self.owner, "acquired_at": now, "expires_at": now + ttl, "released": released})

    def holder(self) -> dict | None:
        """The current lease document, or ``None``."""
        got = storage.read_bytes_etag(self.url)
        return None if got is None else json.loads(got[0])

    def acquire(self, *, wait_s: float | None = None) -> bool:
        """Take the lease if it is free, expired, released or ours; wait up to ``wait_s`` seconds."""
        deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
        while True:
            got = storage.read_bytes_etag(self.url)
            doc = None if got is None else json.loads(got[0])
            free = doc is None or doc.get("released") or doc["expires_at"] <= time.time() or doc["owner"] == self.owner
            if free:
                try:
                    self._etag = storage.write_bytes_if(self.url, self._body(self.ttl_s),
                                                        if_match=got and got[1], if_none_match=got is None)
                    return True
                except storage.PreconditionFailed:
                    continue  # someone else moved it: look again
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)

    def renew(self) -> None:
        """Extend our lease by ``ttl_s``; :class:`LeaseLost` if it is no longer ours (a 412 that answers
        our own retried write, whose first response was lost, is recognised by the bytes read back)."""
        body = self._body(self.ttl_s)
        try:
            self._etag = storage.write_bytes_if(self.url, body, if_match=self._etag or "none")
        except storage.PreconditionFailed as exc:
            try:
                got = storage.read_bytes_etag(self.url)
            except Exception:
                got = None
            if got is not None and got[0] == body:
                self._etag = got[1]
                return
            raise LeaseLost(self._lost(self._holder_or_none())) from exc

    def resume(self) -> None:
        """Take back *our* lease in a new process (another pod of the same run, same ``owner``).

        Succeeds while the lease document still names this owner — even if it expired or was
        released, nobody else took it in between — and extends it by ``ttl_s``; raises
        :class:`LeaseLost` naming the holder if another owner wrote it or it was deleted.
        """
        for _ in range(20):
            got = storage.read_bytes_etag(self.url)
            doc = None if got is None else json.loads(got[0])
            if got is None or doc.get("owner") != self.owner:
                raise LeaseLost(self._lost(doc))
            try:
                self._etag = storage.write_bytes_if(self.url, self._body(self.ttl_s), if_match=got[1])
                return
            except storage.PreconditionFailed:
                continue  # moved between read and write: look again
        raise LeaseLost(f"{self.url}: could not take back the lease of {self.owner} after 20 tries; "
                        f"another writer keeps changing it.")

    def _holder_or_none(self) -> dict | None:
        try:
            return self.holder()
        except Exception:  # only for the message: never mask the LeaseLost
            return None

    def _lost(self, doc: dict | None) -> str:
        if doc is None:
            now_held = "the lease file is gone"
        else:
            until = time.strftime("%H:%M:%S", time.gmtime(doc.get("expires_at", 0)))
            state = "released" if doc.get("released") else f"until {until} UTC"
            now_held = f"it is now held by {doc.get('owner')} ({state})"
        return (f"{self.url}: {self.owner} lost the lease — {now_held}. This run stalled past its TTL "
                f"(ttl_s={self.ttl_s:g}) or resumed after it expired and another run took over; it must stop "
                f"and must not promote.")

    def release(self) -> None:
        """Give the lease up (a no-op if it is no longer ours)."""
        try:
            storage.write_bytes_if(self.url, self._body(0, released=True), if_match=self._etag or "none")
        except storage.PreconditionFailed:
            pass
        self._etag = None

    def __enter__(self) -> Lease:
        if not self.acquire():
            h = self.holder() or {}
            raise LeaseHeld(f"{self.url}: held by {h.get('owner')} until "
                            f"{time.strftime('%H:%M:%S', time.gmtime(h.get('expires_at', 0)))} UTC; "
                            f"wait for that run or let the lease expire.")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def gate(candidate_metrics: Mapping[Any, Mapping[str, float]], promoted_metrics: Mapping[Any, Mapping[str, float]] | None,
         *, metrics: Sequence[tuple[str, bool]], margin: float | Mapping[str, float]) -> tuple[bool, list[str]]:
    """Is the candidate not worse than the promoted model by more than ``margin``, at **every** NFE?

    Metrics are ``{nfe: {metric: value}}`` (NFE keys may be ints or strings). ``metrics`` lists
    ``(name, higher_is_better)``; ``margin`` is an absolute tolerance, one for all or per metric.
    Returns ``(ok, reasons)``: ``reasons`` has one line per failed check (or one summary line if ok).
    A missing NFE/metric in the candidate, or a non-finite value, fails.
    """
    if not promoted_metrics:
        return True, ["no promoted model yet: the candidate is promoted by default"]
    cand = {str(k): v for k, v in candidate_metrics.items()}
    prom = {str(k): v for k, v in promoted_metrics.items()}
    reasons: list[str] = []
    checks = 0
    for nfe in sorted(prom, key=lambda s: (len(s), s)):
        base = prom[nfe]
        for metric, higher in metrics:
            tol = margin[metric] if isinstance(margin, Mapping) else margin
            if metric not in base:
                continue  # the promoted model was not scored on it: nothing to compare against
            checks += 1
            got = cand.get(nfe, {}).get(metric)
            if got is None or not math.isfinite(float(got)):
                reasons.append(f"NFE {nfe}: {metric} missing or not finite in the candidate ({got})")
                continue
            ref = float(base[metric])
            worse = (ref - float(got)) if higher else (float(got) - ref)
            if worse > tol:
                arrow = "higher" if higher else "lower"
                reasons.append(f"NFE {nfe}: {metric} {float(got):.4g} vs promoted {ref:.4g} "
                               f"(worse by {worse:.4g} > margin {tol:g}; {arrow} is better)")
    if reasons:
        return False, reasons
    if checks == 0:
        names = ", ".join(m for m, _ in metrics)
        return False, [f"none of the gate metrics ({names}) is in the promoted model's metrics; "
                       f"re-evaluate the promoted model on them"]
    return True, [f"all {checks} checks passed (every NFE within margin)"]
