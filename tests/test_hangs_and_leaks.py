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


# ------------------------------------------------------------------------ index rows stay in their folder
class _CountingHTTP:
    """An HTTP server on 127.0.0.1 that serves ``body`` for any GET and counts the requests it got."""

    def __init__(self, body: bytes) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self) -> None:
                outer.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _mp4(path: Path, index: int) -> bytes:
    from anyflow.data.procedural import make_clip
    from anyflow.data.video import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, make_clip(5, index, frames=8, height=16, width=16).video, fps=8)
    return path.read_bytes()


def _load_all(spec_url: str) -> tuple[list[str], list[str]]:
    """(keys whose video was decoded, keys of every record) of a source, loading every clip it offers."""
    from anyflow.data.sources import RawClip, open_source
    from anyflow.data.video import VideoSpec

    spec = VideoSpec(frames=4, fps=8, height=16, width=16)
    loaded, seen = [], []
    for rec in open_source(spec_url):
        seen.append(rec.key)
        if isinstance(rec, RawClip):
            try:
                rec.load(spec)
                loaded.append(rec.key)
            except Exception:
                pass
    return loaded, seen


def test_index_rows_outside_the_index_folder_are_not_fetched(tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    _mp4(data / "ok.mp4", 0)
    secret = _mp4(outside / "secret.mp4", 1)
    web = _CountingHTTP(secret)
    try:
        rows = ["ok.mp4", f"{web.url}/secret.mp4", f"file://{outside}/secret.mp4", f"{outside}/secret.mp4",
                "../outside/secret.mp4", f"file://{data}/../outside/secret.mp4"]
        (data / "index.csv").write_text("video,caption\n" + "".join(f"{r},a red square\n" for r in rows))
        loaded, seen = _load_all(str(data / "index.csv"))
    finally:
        web.close()
    assert web.requests == [], f"an index row made the reader fetch {web.url}: {web.requests}"
    assert loaded == ["ok.mp4"], f"videos outside {data} were read: {loaded}"
    assert len(seen) == len(rows)  # the refused rows are counted (skipped with a reason), not dropped


@pytest.mark.s3
def test_s3_index_rows_outside_the_index_prefix_are_not_fetched(tmp_path: Path, s3_prefix: str) -> None:
    ok, secret = _mp4(tmp_path / "ok.mp4", 0), _mp4(tmp_path / "secret.mp4", 1)
    storage.write_bytes(f"{s3_prefix}/data/ok.mp4", ok)
    storage.write_bytes(f"{s3_prefix}/outside/secret.mp4", secret)
    rows = ["ok.mp4", f"{s3_prefix}/data/ok.mp4", f"{s3_prefix}/outside/secret.mp4", "../outside/secret.mp4",
            f"file://{tmp_path}/secret.mp4", str(tmp_path / "secret.mp4")]
    storage.write_bytes(f"{s3_prefix}/data/index.csv",
                        ("video,caption\n" + "".join(f"{r},a red square\n" for r in rows)).encode())
    loaded, seen = _load_all(f"{s3_prefix}/data/index.csv")
    assert loaded == ["ok.mp4", f"{s3_prefix}/data/ok.mp4"], f"videos outside {s3_prefix}/data were read: {loaded}"
    assert len(seen) == len(rows)


# ------------------------------------------------------------------- a killed training run leaks nothing
def _stage_cmd(store: Path, dataset: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "anyflow.stages.train_flowmap", "--store", str(store), "--in", f"dataset={dataset}",
            "--set", f"flowmap.train.steps={steps}", "--set", "flowmap.train.checkpoint_every=1", "--no-progress"]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_sigkilled_training_leaves_no_copies_and_pruning_leaves_no_empty_folders(tmp_path: Path) -> None:
    """A training stage killed with SIGKILL after its first checkpoints, then rerun to the end: the temp dir
    holds no checkpoint copy afterwards, and the local store keeps only the newest ``step-*`` folder."""
    from anyflow.stages import run_stage

    store, tmp = tmp_path / "store", tmp_path / "tmp"
    tmp.mkdir()
    dataset = run_stage("prepare_data", store=str(store), progress=False).uri
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("ANYFLOW_WORK_DIR", None)
    ckpts = store / "checkpoints" / "train_flowmap"
    steps = 40
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(_stage_cmd(store, dataset, steps), cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300

        def newest() -> int:
            return max((int(m.parent.name[5:]) for m in ckpts.glob("*/step-*/manifest.json")
                        if m.parent.name[5:].isdigit()), default=0)

        while proc.poll() is None and time.monotonic() < deadline and newest() < 3:
            time.sleep(0.02)  # a few checkpoints published: pruning has run
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        log.seek(0)
        assert alive, f"the stage ended before it could be killed: {log.read()[-2000:]}"
    copies = [p for p in _files(tmp) if p.suffix == ".safetensors"]
    assert copies, "expected the killed run's local checkpoint copy in its work folder"  # the leak being fixed
    res = subprocess.run(_stage_cmd(store, dataset, steps), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    left = [str(p.relative_to(tmp)) for p in _files(tmp) if p.suffix in (".safetensors", ".json", ".jsonl")]
    kept = sorted(str(p.relative_to(ckpts)) for p in ckpts.rglob("*"))
    # published: the stage deleted its checkpoint folder (and wrote none after the final step)
    assert (left, kept) == ([], []), (
        f"training state left in the temp dir after the rerun: {left}; checkpoint files and folders kept: {kept}")


# --------------------------------------------------------------------------- the KFP token stays off argv
IMAGE = "registry.example/ml/anyflow-train@sha256:" + "ab" * 32


def test_kfp_token_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The token reaches the KFP API from ``--existing-token-file`` or ``$KFP_TOKEN`` (neither shows in ``ps``);
    an unreadable file is one sentence naming it; the help says the command-line flag is visible to others."""
    from helpers.kfp_api import Recorder, serve

    from anyflow import cli

    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    token = "s3cr3t-" + os.urandom(6).hex()
    (tmp_path / "token").write_text(token + "\n")
    rec = Recorder(token=token)
    with serve(rec) as url:
        assert cli.main(["submit", "--host", url, "--existing-token-file", str(tmp_path / "token"), "--image", IMAGE]) == 0
        assert rec.requests and all(r["auth"] == f"Bearer {token}" for r in rec.requests)
        rec.requests.clear()
        monkeypatch.setenv("KFP_TOKEN", token)
        assert cli.main(["submit", "--host", url, "--image", IMAGE]) == 0
        assert rec.requests and all(r["auth"] == f"Bearer {token}" for r in rec.requests)
        monkeypatch.delenv("KFP_TOKEN")
        capsys.readouterr()
        missing = tmp_path / "no-such-token"
        assert cli.main(["submit", "--host", url, "--existing-token-file", str(missing), "--image", IMAGE]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert str(missing) in err[-1] and "Traceback" not in "\n".join(err)
    with pytest.raises(SystemExit):
        cli.main(["submit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--existing-token-file" in help_text and "KFP_TOKEN" in help_text and "ps" in help_text


# ------------------------------------------------------------- s3fs (source reads, listings) has the same bounds
def test_silent_s3_endpoint_bounds_s3fs_reads_and_listings(silent_s3) -> None:
    """Data sources read and list through s3fs (``storage.open_url``, ``storage.fs_and_path``), not boto3: those
    calls get the same connect/read timeouts and give up within ANYFLOW_S3_DEADLINE (5 s here), naming the
    endpoint. Before, s3fs's defaults (15 s read timeout, 5 s3fs retries over botocore's own) held one call for
    minutes."""
    url, conns = silent_s3
    calls = {
        "open+read": lambda: storage.open_url("s3://bucket/videos/index.csv").read(),
        "find": lambda: storage.fs_and_path("s3://bucket/videos")[0].find("bucket/videos"),
    }
    for name, fn in calls.items():
        before = len(conns)
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            fn()
        took = time.monotonic() - t0
        assert took < 8.0, f"{name}: a silent endpoint stalled the s3fs call for {took:.0f} s (deadline 5 s)"
        assert len(conns) > before, f"{name}: never reached the endpoint"
        assert url in str(info.value), f"{name}: the error does not name the endpoint: {info.value}"


# ------------------------------------------------------------- run_stage's output staging leaks nothing on SIGKILL
def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("where", ["s3", "local"])
def test_sigkilled_stage_leaves_no_staging_once_rerun(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """prepare_data SIGKILLed while it writes its output: the rerun removes the killed run's staging folder (under
    the stage's work folder for an S3 output, ``<out>/.anyflow-staging/`` for a local one) and publishes an
    artifact that verifies. Before, every killed run left ``$TMPDIR/anyflow-prepare_data-*`` behind for good."""
    store = request.getfixturevalue("s3_prefix") if where == "s3" else str(tmp_path / "store")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("ANYFLOW_WORK_DIR", None)
    cmd = [sys.executable, "-m", "anyflow.stages.prepare_data", "--store", store, "--no-progress"]
    local_art = tmp_path / "store" / "artifacts" / "prepare_data"

    def staged() -> list[str]:  # files a run wrote into its private staging so far
        roots = [tmp] if where == "s3" else list(local_art.glob("*/.anyflow-staging"))
        return [f for r in roots for f in _leftovers(r) if not f.endswith(".lock")]

    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not staged():
            time.sleep(0.01)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        log.seek(0)
        assert alive, f"the stage ended before it could be killed: {log.read()[-2000:]}"
    assert staged(), "expected the killed run's staged output"
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    uri = res.stdout.split(" -> ", 1)[1].split()[0]
    storage.verify(uri)
    left = staged() + ([] if where == "s3" else [f for f in _leftovers(tmp) if "prepare_data" in f])
    assert left == [], f"the killed run's staging is still there after the rerun: {left[:5]}"
