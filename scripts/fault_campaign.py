#!/usr/bin/env python
"""The reliability and security fault campaign of issue 22 (items 1-3 and 7), rerunnable by anyone.

    .venv/bin/python scripts/fault_campaign.py [--quick] [--seed N] [--json PATH]

Four sections, each a number of seeded trials against the real code (local folders, a moto S3 server in a
subprocess, the fault-injecting HTTP proxy of ``tests/s3server.py`` in front of it); nothing is patched
except where noted:

* ``hostile``: an artifact whose manifest names a file outside it (absolute path, ``../``), a symlink, a
  symlinked folder, a FIFO, or leaves a file unlisted; on S3 also hostile names in the manifest and hostile
  listing keys for ``mirror``. Every reader (verify, fetch, fetch_file, listed_file; read_manifest and
  mirror on S3) must refuse it with ArtifactError, within 20 s, writing nothing outside its cache.
* ``registry``: uncontended promotions (each expecting the live model it read) while the proxy answers a
  share of the registry's requests with 500/503/connection resets and a botocore hook drops the response of
  a share of the PUTs the server applied (a lost response). Each promotion must be applied exactly once:
  no false conflict, one history entry per promotion, the alias on the last one.
* ``race``: two writers publish different contents to one artifact URL at the same moment (local: two
  processes, with a third verifying the folder throughout; S3: two threads through the proxy with faults).
  The URL must end as exactly one writer's complete artifact, and no reader may accept a broken one.
* ``hang``: an S3 endpoint that accepts connections and never answers: boto3 reads, uploads, downloads and
  s3fs reads/listings must fail within the deadline (5 s here; bound 12 s, 30 s for an upload) naming the
  endpoint.

Per section it prints trials, faults injected, and the outcomes: ``refused`` (a clear error: ArtifactError,
StorageError, AliasConflict, OSError naming the endpoint), ``accepted`` (the call succeeded), ``tracebacks``
(any other exception, or a hang), and ``wrong`` (a hostile input accepted, a broken artifact served, a false
conflict or duplicate, a call past its bound). Exit status 0 when nothing is ``wrong`` and there are no
tracebacks, 1 otherwise. ``--quick`` runs a few trials per section (tests/test_fault_campaign.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the moto server and the fault proxy of the test suite

from s3server import FAKE_ENV, FaultProxy, MotoServer  # noqa: E402

from anyflow import registry, storage  # noqa: E402
from anyflow.registry import NO_ALIAS, AliasConflict  # noqa: E402
from anyflow.storage import ArtifactError, StorageError  # noqa: E402

PAYLOAD = b"import os  # planted by a hostile manifest\n"
SIZES = {
    "quick": {"hostile": 12, "registry": 8, "race_local": 6, "race_s3": 3, "hang": 1},
    "full": {"hostile": 200, "registry": 120, "race_local": 100, "race_s3": 30, "hang": 3},
}


class Section:
    """Counts of one section."""

    def __init__(self, name: str) -> None:
        self.name, self.trials, self.faults = name, 0, 0
        self.outcomes: Counter[str] = Counter()
        self.wrong: list[str] = []
        self.notes: dict[str, Any] = {}

    def summary(self) -> dict:
        return {
            "trials": self.trials,
            "faults_injected": self.faults,
            "refused": self.outcomes["refused"],
            "accepted": self.outcomes["accepted"],
            "tracebacks": self.outcomes["traceback"],
            "wrong": len(self.wrong),
            "wrong_examples": self.wrong[:5],
            **self.notes,
        }


def bounded(fn: Callable[[], Any], timeout: float = 20.0, fifos: tuple[Path, ...] = ()) -> tuple[str, Any]:
    """Run ``fn`` in a thread: ``("ok", result)``, ``("error", exc)`` or ``("hang", None)`` after ``timeout``."""
    box: dict[str, Any] = {}

    def go() -> None:
        try:
            box["ok"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for f in fifos:  # let a reader blocked on a FIFO go
            with contextlib.suppress(OSError):
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        return "hang", None
    return ("error", box["error"]) if "error" in box else ("ok", box.get("ok"))


def tree(root: Path, skip: Path | None = None) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if skip is None or not (p == skip or skip in p.parents):
                out.add(str(p.relative_to(root)))
    return out


def entry(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ------------------------------------------------------------------------------------------ hostile
LOCAL_CASES = ["absolute", "dotdot", "symlink", "symlinked-folder", "fifo", "unlisted", "device"]
S3_CASES = [
    "absolute",
    "dotdot",
    "dot",
    "empty-segment",
    "backslash",
    "nul",
    "listing-absolute",
    "listing-dotdot",
]


def hostile_local(sec: Section, work: Path, case: str) -> None:
    src, art, outside, cache = work / "src", work / "store" / "art", work / "outside", work / "cache"
    src.mkdir(parents=True)
    outside.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(100))
    storage.publish(src, art, kind="x")
    (outside / "secret.txt").write_bytes(PAYLOAD)
    m = json.loads((art / "manifest.json").read_text())
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
    elif case == "fifo":
        os.mkfifo(art / "pipe")
        name, ent, fifos = "pipe", entry(b""), (art / "pipe",)
    elif case == "device":
        (art / "dev").symlink_to("/dev/zero")
        name, ent = "dev", entry(b"")
    else:  # a file the manifest does not list, next to "files": {}
        (art / "model.json").write_text("{}")
        name, ent = "model.json", None
        m["files"] = {}
    if ent is not None:
        m["files"][name] = ent
    (art / "manifest.json").write_text(json.dumps(m))
    before = tree(work)
    readers = {
        "verify": lambda: storage.verify(art),
        "fetch": lambda: storage.fetch(art, cache_dir=cache),
        "listed_file": lambda: storage.listed_file(art, name),
    }
    if ent is not None:
        readers["fetch_file"] = lambda: storage.fetch_file(art, name, cache_dir=cache)
    sec.faults += 1
    for reader, fn in readers.items():
        sec.trials += 1
        tag = f"local {case} {reader}"
        classify_refusal(sec, tag, *bounded(fn, fifos=fifos))
    if tree(work) - {"cache"} != before:
        sec.wrong.append(f"local {case}: a reader wrote files outside its cache")


def classify_refusal(sec: Section, tag: str, status: str, value: Any) -> None:
    """For inputs that must be refused: ArtifactError is right, success is wrong, anything else a traceback."""
    if status == "hang":
        sec.outcomes["traceback"] += 1
        sec.wrong.append(f"{tag}: hung")
    elif status == "ok":
        sec.outcomes["accepted"] += 1
        sec.wrong.append(f"{tag}: accepted")
    elif isinstance(value, ArtifactError):
        sec.outcomes["refused"] += 1
    else:
        sec.outcomes["traceback"] += 1
        sec.wrong.append(f"{tag}: {type(value).__name__}: {value}")


def put_raw(s3: Any, url: str, data: bytes) -> None:
    bucket, key = url.split("://", 1)[1].split("/", 1)
    s3.put_object(Bucket=bucket, Key=key, Body=data)


def hostile_s3(sec: Section, work: Path, prefix: str, raw: Any, case: str) -> None:
    cache, planted = work / "cache", work / "planted"
    work.mkdir(parents=True, exist_ok=True)
    sec.faults += 1
    if case.startswith("listing-"):
        put_raw(raw, storage.join(prefix, "model_index.json"), b"{}")
        rel = str(planted / "evil.pth") if case == "listing-absolute" else "../../../planted/evil.pth"
        put_raw(raw, prefix + "/" + rel, PAYLOAD)
        before = tree(work)
        sec.trials += 1
        classify_refusal(sec, f"s3 {case} mirror", *bounded(lambda: storage.mirror(prefix, cache)))
    else:
        src = work / "src"
        src.mkdir(exist_ok=True)
        (src / "weights.bin").write_bytes(os.urandom(100))
        m = storage.publish(src, prefix, kind="x")
        name = {
            "absolute": str(planted / "evil.pth"),
            "dotdot": "../../../planted/evil.pth",
            "dot": "a/./evil.pth",
            "empty-segment": "a//evil.pth",
            "backslash": "..\\..\\..\\planted\\evil.pth",
            "nul": "evil.pth\x00.txt",
        }[case]
        if "\x00" not in name:
            put_raw(raw, prefix.rstrip("/") + "/" + name.strip("/"), PAYLOAD)
        m["files"] = {"weights.bin": m["files"]["weights.bin"], name: entry(PAYLOAD)}
        put_raw(raw, storage.join(prefix, "manifest.json"), json.dumps(m).encode())
        before = tree(work)
        for reader, fn in {
            "read_manifest": lambda: storage.read_manifest(prefix),
            "verify": lambda: storage.verify(prefix),
            "fetch": lambda: storage.fetch(prefix, cache_dir=cache),
            "fetch_file": lambda: storage.fetch_file(prefix, name, cache_dir=cache),
        }.items():
            sec.trials += 1
            classify_refusal(sec, f"s3 {case} {reader}", *bounded(fn))
    if planted.exists() or tree(work, skip=cache) != before - {"cache"}:
        sec.wrong.append(f"s3 {case}: files were written outside the cache")


# ----------------------------------------------------------------------------------------- registry
class LostResponses:
    """A botocore hook on anyflow's S3 client: the server applied the PUT, and the client sees a closed
    connection instead of the answer (a lost response), for a share ``rate`` of the registry's PUTs."""

    def __init__(self, rng: random.Random, rate: float) -> None:
        self.rng, self.rate, self.dropped = rng, rate, 0

    def key_of(self, params: Any, context: Any, **kw: Any) -> None:
        context["anyflow_key"] = params.get("Key", "")

    def __call__(self, http_response: Any, parsed: Any, context: Any, **kw: Any) -> None:
        from botocore.exceptions import ConnectionClosedError

        key = context.get("anyflow_key", "")
        if http_response.status_code < 300 and "/models/" in key and self.rng.random() < self.rate:
            self.dropped += 1
            raise ConnectionClosedError(endpoint_url=f"lost response of PUT {key}")


def registry_section(
    sec: Section, work: Path, prefix: str, proxy: FaultProxy, rng: random.Random, n: int
) -> None:
    from anyflow import _storage_s3 as s3

    arts = []
    for i in range(n):
        src = work / f"cand{i}"
        src.mkdir(parents=True)
        (src / "weights.safetensors").write_bytes(bytes([i % 256]) * 1000 + str(i).encode())
        arts.append(
            storage.publish(src, storage.join(prefix, "artifacts", f"cand{i}"), kind="generator")
            and storage.join(prefix, "artifacts", f"cand{i}")
        )
    lost = LostResponses(rng, 0.2)
    events = s3.client().meta.events
    events.register("before-parameter-build.s3.PutObject", lost.key_of)
    events.register("after-call.s3.PutObject", lost)
    proxy.clear()
    modes = ["500", "503", "reset"]
    proxy.inject(rng.choice(modes), 10**9, lambda method, path: "/models/" in path and rng.random() < 0.1)
    proxy.inject(rng.choice(modes), 10**9, lambda method, path: "/models/" in path and rng.random() < 0.05)
    promoted: list[str] = []
    try:
        for i, a in enumerate(arts):
            sec.trials += 1
            live = registry.promoted(prefix, "gen")
            status, value = bounded(
                lambda a=a, live=live, i=i: registry.promote(
                    prefix,
                    "gen",
                    a,
                    metrics={},
                    reason=f"p{i}",
                    expected_current=live["manifest_sha256"] if live else NO_ALIAS,
                ),
                timeout=120,
            )
            if status == "ok":
                sec.outcomes["accepted"] += 1
                promoted.append(a)
            elif isinstance(value, AliasConflict):
                sec.outcomes["refused"] += 1
                sec.wrong.append(f"promotion {i}: false conflict ({value})")
            elif isinstance(value, StorageError):
                sec.outcomes["refused"] += 1  # gave up after its retries: a clear error, not wrong by itself
            else:
                sec.outcomes["traceback"] += 1
                sec.wrong.append(f"promotion {i}: {status} {type(value).__name__}: {value}")
    finally:
        events.unregister("after-call.s3.PutObject", lost)
        events.unregister("before-parameter-build.s3.PutObject", lost.key_of)
        sec.faults += lost.dropped + proxy.injected
        sec.notes["lost_responses"] = lost.dropped
        sec.notes["proxy_faults"] = proxy.injected
        proxy.clear()
    hist = registry.history(prefix, "gen")
    got = [e["uri"] for e in hist if e["event"] == "promote"]
    if got != promoted:
        sec.wrong.append(
            f"history: {len(hist)} entries, promotes {len(got)} for {len(promoted)} promotions applied"
        )
    live = registry.promoted(prefix, "gen")
    if promoted and (live is None or live["uri"] != promoted[-1]):
        sec.wrong.append(f"alias on {live and live['uri']}, last promotion {promoted[-1]}")
    sec.notes["history_entries"] = len(hist)


# -------------------------------------------------------------------------------------------- races
def _contents(writer: int, trial: int) -> dict[str, bytes]:
    rnd = hashlib.sha256(f"writer-{writer}-{trial}".encode()).digest()
    files = {f"shards/part-{i}.bin": rnd * (2048 * (i + 1)) for i in range(3)}
    files[f"only-{writer}.bin"] = rnd * 512
    return files


def _listing(files: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    return {r: (len(b), hashlib.sha256(b).hexdigest()) for r, b in files.items()}


def _local_writer(writer: int, trial: int, src: Path, dst: Path, go: Any, out: Any) -> None:
    for rel, data in _contents(writer, trial).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    go.wait(30)
    try:
        storage.publish(src, dst, kind="dataset")
        out.put((writer, "accepted", ""))
    except ArtifactError as exc:
        out.put((writer, "refused", str(exc)))
    except Exception as exc:
        out.put((writer, "traceback", f"{type(exc).__name__}: {exc}"))


def _local_reader(dst: Path, trial: int, stop: Any, out: Any) -> None:
    ok, refused, broken = 0, 0, 0
    good = [_listing(_contents(w, trial)) for w in (0, 1)]
    while not stop.is_set():
        try:
            m = storage.verify(dst)
        except (ArtifactError, FileNotFoundError):
            refused += 1
            continue
        listing = {r: (e["size"], e["sha256"]) for r, e in m["files"].items() if r != "config.json"}
        ok += 1
        broken += listing not in good
    out.put((ok, refused, broken))


def judge_final(sec: Section, tag: str, url: str, trial: int) -> None:
    status, value = bounded(lambda: storage.verify(url), timeout=60)
    if status != "ok":
        sec.wrong.append(f"{tag}: the URL ends broken ({value})")
        return
    listing = {r: (e["size"], e["sha256"]) for r, e in value["files"].items() if r != "config.json"}
    if listing not in [_listing(_contents(w, trial)) for w in (0, 1)]:
        sec.wrong.append(f"{tag}: the URL ends with a mix of both writers")


def race_local(sec: Section, work: Path, trial: int) -> None:
    ctx = mp.get_context("fork")
    dst = work / "art"
    go, stop, out, seen = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
    writers = [
        ctx.Process(target=_local_writer, args=(w, trial, work / f"src{w}", dst, go, out)) for w in (0, 1)
    ]
    reader = ctx.Process(target=_local_reader, args=(dst, trial, stop, seen))
    for p in (*writers, reader):
        p.start()
    time.sleep(0.05)
    go.set()
    sec.faults += 1  # a concurrent writer
    for _ in writers:
        _, outcome, msg = out.get(timeout=120)
        sec.trials += 1
        sec.outcomes[outcome] += 1
        if outcome == "traceback":
            sec.wrong.append(f"local race {trial}: {msg}")
    for p in writers:
        p.join(30)
    stop.set()
    ok, refused, broken = seen.get(timeout=60)
    reader.join(30)
    sec.notes["reader_accepted"] = sec.notes.get("reader_accepted", 0) + ok
    sec.notes["reader_refused"] = sec.notes.get("reader_refused", 0) + refused
    if broken:
        sec.wrong.append(f"local race {trial}: the reader accepted {broken} broken artifacts")
    judge_final(sec, f"local race {trial}", str(dst), trial)
    if (dst / storage.STAGING).exists() and any((dst / storage.STAGING).iterdir()):
        sec.wrong.append(f"local race {trial}: a writer's staging folder was left behind")


def race_s3(sec: Section, work: Path, prefix: str, proxy: FaultProxy, rng: random.Random, trial: int) -> None:
    url = storage.join(prefix, f"race-{trial}")
    srcs = []
    for w in (0, 1):
        src = work / f"s3src{w}"
        for rel, data in _contents(w, trial).items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        srcs.append(src)
    proxy.clear()
    proxy.inject(rng.choice(["500", "503", "reset"]), 10**9, lambda method, path: rng.random() < 0.1)
    go = threading.Barrier(2)
    results: dict[int, tuple[str, Any]] = {}

    def write(w: int) -> None:
        go.wait(30)
        results[w] = bounded(lambda: storage.publish(srcs[w], url, kind="dataset"), timeout=180)

    threads = [threading.Thread(target=write, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    sec.faults += 1 + proxy.injected
    proxy.clear()
    for w, (status, value) in sorted(results.items()):
        sec.trials += 1
        if status == "ok":
            sec.outcomes["accepted"] += 1
        elif isinstance(value, (ArtifactError, StorageError)):
            sec.outcomes["refused"] += 1
        else:
            sec.outcomes["traceback"] += 1
            sec.wrong.append(f"s3 race {trial} writer {w}: {status} {type(value).__name__}: {value}")
    judge_final(sec, f"s3 race {trial}", url, trial)


# --------------------------------------------------------------------------------------------- hang
@contextlib.contextmanager
def silent_endpoint(lifetime_s: float) -> Iterator[str]:
    """A TCP server that accepts every connection and never sends a byte (stops by itself)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)
    conns: list[socket.socket] = []
    stop, end = threading.Event(), time.monotonic() + lifetime_s

    def serve() -> None:
        try:
            while not stop.is_set() and time.monotonic() < end:
                with contextlib.suppress(TimeoutError):
                    conns.append(srv.accept()[0])
        finally:
            for c in conns:
                c.close()
            srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join(5)


def hang_section(
    sec: Section, work: Path, rounds: int, bound_s: float = 12.0, upload_bound_s: float = 30.0
) -> None:
    """Each call must fail within ``bound_s`` (the 5 s deadline plus one silent attempt and slack for a loaded
    machine), an upload within ``upload_bound_s`` (botocore retries its requests itself: anyflow/_storage_s3.py),
    naming the endpoint."""
    saved = {
        k: os.environ.get(k)
        for k in ("ANYFLOW_S3_CONNECT_TIMEOUT", "ANYFLOW_S3_READ_TIMEOUT", "ANYFLOW_S3_DEADLINE")
    }
    os.environ.update(
        {"ANYFLOW_S3_CONNECT_TIMEOUT": "1", "ANYFLOW_S3_READ_TIMEOUT": "1", "ANYFLOW_S3_DEADLINE": "5"}
    )
    src = work / "small.bin"
    src.write_bytes(b"x" * 1024)
    calls = {
        "boto3 read": lambda: storage.read_bytes("s3://bucket/some/object.json"),
        "boto3 upload": lambda: storage.copy_file(src, "s3://bucket/some/upload.bin"),
        "boto3 download": lambda: storage.copy_file("s3://bucket/some/object.bin", work / "got.bin"),
        "s3fs open+read": lambda: storage.open_url("s3://bucket/videos/index.csv").read(),
        "s3fs find": lambda: storage.fs_and_path("s3://bucket/videos")[0].find("bucket/videos"),
    }
    worst, slowest = 0.0, {}
    try:
        with silent_endpoint(lifetime_s=upload_bound_s * 3 * len(calls) * rounds + 30) as url:
            storage.configure(s3_endpoint=url)
            for _ in range(rounds):
                for name, fn in calls.items():
                    sec.trials += 1
                    sec.faults += 1
                    t0 = time.monotonic()
                    limit = upload_bound_s if name == "boto3 upload" else bound_s
                    status, value = bounded(fn, timeout=upload_bound_s * 3)
                    took = time.monotonic() - t0
                    worst = max(worst, took)
                    slowest[name] = round(max(slowest.get(name, 0.0), took), 1)
                    if status == "ok":
                        sec.outcomes["accepted"] += 1
                        sec.wrong.append(f"{name}: succeeded against a silent endpoint")
                    elif status == "hang" or not isinstance(value, OSError):
                        sec.outcomes["traceback"] += 1
                        sec.wrong.append(f"{name}: {status} {type(value).__name__}: {value}")
                    else:
                        sec.outcomes["refused"] += 1
                        if took > limit or url not in str(value):
                            sec.wrong.append(f"{name}: {took:.1f} s, names the endpoint: {url in str(value)}")
    finally:
        storage.configure(s3_endpoint=None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    sec.notes["slowest_call_s"] = round(worst, 1)
    sec.notes["slowest_s_by_call"] = slowest


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--quick", action="store_true", help="a few trials per section (what the test suite runs)")
    p.add_argument("--seed", type=int, default=22, help="seed of the fault choices (default 22)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    args = p.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    rng = random.Random(args.seed)
    os.environ.update(FAKE_ENV)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    sections = {name: Section(name) for name in ("hostile", "registry", "race", "hang")}
    with tempfile.TemporaryDirectory(prefix="anyflow-campaign-") as tmp:
        work = Path(tmp)
        os.environ["ANYFLOW_CACHE_DIR"] = str(work / "cache")
        for i in range(size["hostile"]):  # local hostile manifests (no server needed)
            hostile_local(sections["hostile"], work / f"h{i}", LOCAL_CASES[i % len(LOCAL_CASES)])
        for i in range(size["race_local"]):  # forks before any server thread exists
            d = work / f"r{i}"
            d.mkdir()
            race_local(sections["race"], d, i)
        server = MotoServer().start()
        proxy = FaultProxy(server.endpoint)
        try:
            import boto3

            raw = boto3.client(
                "s3",
                endpoint_url=server.endpoint,
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
            raw.create_bucket(Bucket="campaign")
            os.environ["AWS_ENDPOINT_URL"] = server.endpoint
            for i in range(size["hostile"] // 2):
                case = S3_CASES[i % len(S3_CASES)]
                hostile_s3(sections["hostile"], work / f"hs{i}", f"s3://campaign/hostile-{i}", raw, case)
            storage.configure(s3_endpoint=proxy.endpoint)
            registry_section(
                sections["registry"], work / "reg", "s3://campaign/registry", proxy, rng, size["registry"]
            )
            for i in range(size["race_s3"]):
                d = work / f"rs{i}"
                d.mkdir()
                race_s3(sections["race"], d, "s3://campaign/races", proxy, rng, i)
        finally:
            storage.configure(s3_endpoint=None)
            os.environ.pop("AWS_ENDPOINT_URL", None)
            proxy.close()
            server.stop()
        hang_section(sections["hang"], work, size["hang"])
        shutil.rmtree(work, ignore_errors=True)
    figures = {name: s.summary() for name, s in sections.items()}
    figures["seconds"] = round(time.monotonic() - started, 1)
    figures["mode"] = "quick" if args.quick else "full"
    figures["seed"] = args.seed
    print(
        f"{'section':<10}{'trials':>8}{'faults':>8}{'refused':>9}{'accepted':>10}{'tracebacks':>12}{'wrong':>7}"
    )
    for name, s in sections.items():
        f = s.summary()
        print(
            f"{name:<10}{f['trials']:>8}{f['faults_injected']:>8}{f['refused']:>9}{f['accepted']:>10}"
            f"{f['tracebacks']:>12}{f['wrong']:>7}"
        )
        for k, v in s.notes.items():
            print(f"{'':<10}{k}: {v}")
        for w in s.wrong[:5]:
            print(f"{'':<10}WRONG: {w}")
    print(f"{figures['seconds']} s ({figures['mode']}, seed {args.seed})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    bad = sum(s.summary()["wrong"] + s.outcomes["traceback"] for s in sections.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
