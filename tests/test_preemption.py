"""Preemption-safe stages: a training stage killed at random points (SIGKILL, SIGTERM) and rerun
resumes from its checkpoint in the store and publishes exactly the artifact of an uninterrupted run.

Every run is a real subprocess (``python -m anyflow.stages.train_flowmap`` or ``python -m anyflow.cli
stage …``) against the moto S3 server, with the same thread count, so the comparison is bit-for-bit:
safetensors tensors with ``torch.equal`` and the manifest's file hashes, ``log.jsonl`` included: it records
no wall-clock throughput (that goes to the metrics), so the resumed artifact's content digest, which keys every
later stage, is the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anyflow import storage

STEPS = 8
#: Kills land at checkpoints 1 .. STEPS - 3: at least three steps (and the publish) remain after the checkpoint a
#: kill waits for, so the stage cannot finish between the poll that sees it and the signal (up to 0.5 s later). With
#: kills up to the last checkpoint an idle machine finished the stage first (a fresh-clone run, kill at 5 of 6).
LAST_KILL = STEPS - 3
SETS = ["--set", f"flowmap.train.steps={STEPS}", "--set", "flowmap.train.checkpoint_every=1"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cmd(entry: str, store: str, dataset: str) -> list[str]:
    if entry == "module":
        head = [sys.executable, "-m", "anyflow.stages.train_flowmap"]
    else:
        head = [sys.executable, "-m", "anyflow.cli", "stage", "train_flowmap"]
    return [*head, "--store", store, "--in", f"dataset={dataset}", *SETS, "--no-progress"]


def _start(entry: str, store: str, dataset: str) -> subprocess.Popen:
    out = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the child
    proc = subprocess.Popen(_cmd(entry, store, dataset), env={**os.environ, **ENV}, cwd=Path(__file__).parent.parent,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.output_file = out  # type: ignore[attr-defined]
    return proc


def _output(proc: subprocess.Popen) -> str:
    proc.output_file.seek(0)  # type: ignore[attr-defined]
    return proc.output_file.read()  # type: ignore[attr-defined]


def _run(entry: str, store: str, dataset: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(entry, store, dataset), env={**os.environ, **ENV}, cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=600)


def _ckpt_state(client, bucket: str, store: str) -> tuple[int, list[str]]:
    """(step, log lines) of the valid checkpoint in the store, read with a plain boto3 client; (0, []) if
    none or torn (no manifest: the kill hit its upload, so the rerun starts over)."""
    prefix = store.split(f"s3://{bucket}/", 1)[1] + "/checkpoints/train_flowmap/"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    state = [k for k in keys if k.endswith("/state.json")]
    if not state or not any(k.endswith("/manifest.json") for k in keys):
        return 0, []
    try:
        step = json.loads(client.get_object(Bucket=bucket, Key=state[0])["Body"].read())["step"]
        log = [k for k in keys if k.endswith("/log.jsonl")]
        lines = client.get_object(Bucket=bucket, Key=log[0])["Body"].read().decode().splitlines() if log else []
    except Exception:  # being rewritten right now
        return 0, []
    return step, lines


def _kill_at(proc: subprocess.Popen, sig: int, step: int, extra_s: float, s3_server, store: str) -> tuple[int, list[str]]:
    """Send ``sig`` once the store's checkpoint reached ``step`` (+ ``extra_s``); returns the state then."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        got, _ = _ckpt_state(s3_server.client(), s3_server.bucket, store)
        if got >= step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the stage finished before checkpoint {step}: {_output(proc)[-2000:]}"
    time.sleep(extra_s)
    proc.send_signal(sig)
    proc.wait(timeout=300)
    return _ckpt_state(s3_server.client(), s3_server.bucket, store)


def _artifact(store: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]], list[dict]]:
    urls = [u for u in storage.list_prefix(storage.join(store, "artifacts", "train_flowmap")) if u.endswith("manifest.json")]
    assert len(urls) == 1, urls
    url = urls[0].rsplit("/", 1)[0]
    local = storage.fetch(url)
    manifest = storage.verify(url)
    tensors = {p.name: load_file(str(p)) for p in sorted((local / "adapters").glob("*.safetensors"))}
    log = [json.loads(x) for x in (local / "log.jsonl").read_text().splitlines()]
    return manifest, tensors, log


def _assert_same(a_store: str, b_store: str) -> list[dict]:
    ma, ta, la = _artifact(a_store)
    mb, tb, lb = _artifact(b_store)
    assert ma["extra"]["cache_key"] == mb["extra"]["cache_key"]
    # sizes and hashes (where a file is stored, the S3 entries' "object", is the writer's, not the content)
    files_a = {k: (v["size"], v["sha256"]) for k, v in ma["files"].items()}
    files_b = {k: (v["size"], v["sha256"]) for k, v in mb["files"].items()}
    assert files_a == files_b, "manifest file hashes differ from the uninterrupted run"
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        assert ta[name].keys() == tb[name].keys()
        for k in ta[name]:
            assert torch.equal(ta[name][k], tb[name][k]), f"{name}:{k} differs from the uninterrupted run"
    losses = [[(k, v) for k, v in r.items() if k == "step" or k.startswith("loss")] for r in la]
    assert losses == [[(k, v) for k, v in r.items() if k == "step" or k.startswith("loss")] for r in lb]
    assert [r["step"] for r in lb] == list(range(1, STEPS + 1))
    return lb


@pytest.fixture(scope="module")
def reference(tiny_chain: dict, s3_server, tmp_path_factory) -> tuple[str, str]:
    """The uninterrupted run (same entry point, same threads) in its own store prefix."""
    store = f"s3://{s3_server.bucket}/preempt-ref-{os.getpid()}-{random.randrange(1 << 30)}"
    dataset = tiny_chain["dataset"].uri
    res = _run("module", store, dataset)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return store, dataset


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_points_then_rerun_equals_uninterrupted(reference, s3_prefix: str, s3_server, seed: int) -> None:
    ref_store, dataset = reference
    rng = random.Random(seed)
    kills = sorted(rng.sample(range(1, LAST_KILL + 1), 2))  # two kills, at different checkpoints of one run
    resumed_lines: list[str] = []
    for step in kills:
        proc = _start("module", s3_prefix, dataset)
        _, lines = _kill_at(proc, signal.SIGKILL, step, rng.uniform(0, 0.5), s3_server, s3_prefix)
        assert proc.returncode == -signal.SIGKILL
        resumed_lines = lines  # empty if the kill tore the checkpoint (then the rerun starts over)
    res = _run("module", s3_prefix, dataset)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    log = _assert_same(ref_store, s3_prefix)
    # resumed, not restarted: the records before the kill are carried over verbatim (timings included)
    if resumed_lines:
        final = storage.fetch_file(_artifact_url(s3_prefix), "log.jsonl").read_text().splitlines()
        assert final[: len(resumed_lines)] == resumed_lines
        assert len(log) == STEPS


def _artifact_url(store: str) -> str:
    urls = [u for u in storage.list_prefix(storage.join(store, "artifacts", "train_flowmap")) if u.endswith("manifest.json")]
    return urls[0].rsplit("/", 1)[0]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_rerun_equals_uninterrupted(reference, s3_prefix: str, s3_server) -> None:
    ref_store, dataset = reference
    proc = _start("cli", s3_prefix, dataset)
    got, lines = _kill_at(proc, signal.SIGTERM, 2, 0.0, s3_server, s3_prefix)
    out = _output(proc)
    assert proc.returncode == 75, f"SIGTERM must exit 75 (retryable), got {proc.returncode}: {out[-1500:]}"
    assert "SIGTERM" in out
    assert 2 <= got < STEPS and len(lines) == got  # a checkpoint of the step it stopped at
    res = _run("cli", s3_prefix, dataset)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    _assert_same(ref_store, s3_prefix)
    final = storage.fetch_file(_artifact_url(s3_prefix), "log.jsonl").read_text().splitlines()
    assert final[:got] == lines  # resumed from the SIGTERM checkpoint


@pytest.mark.slow
def test_module_entry_point_maps_exit_codes(s3_prefix: str) -> None:
    res = _run("module", s3_prefix, f"{s3_prefix}/no-such-artifact")
    assert res.returncode == 2


def test_bad_input_exits_2_without_retrying(s3_prefix: str, tmp_path: Path) -> None:
    not_an_artifact = tmp_path / "dataset"
    not_an_artifact.mkdir()
    (not_an_artifact / "index.json").write_text("{}")
    t0 = time.monotonic()
    res = _run("cli", s3_prefix, str(not_an_artifact))
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert re.match(r"anyflow( stage)?: error: ", err[-1]) and "manifest.json is missing" in err[-1]
    assert "Traceback" not in res.stderr
    assert not storage.list_prefix(storage.join(s3_prefix, "checkpoints"))  # nothing was started
    assert time.monotonic() - t0 < 120
