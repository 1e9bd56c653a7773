"""The re-distillation run lease across processes (KFP pods) on a real S3 server (moto on 127.0.0.1).

A short-TTL lease stays held while a heartbeat renews it, expires soon after its holder is killed,
stops the work of a holder that lost it, and a run that lost it cannot promote. The lease document is
read back with a plain boto3 client (not through anyflow), and "another pod" is a real subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from anyflow import registry, storage
from anyflow.ops import steps
from anyflow.ops.lease import RunLease
from anyflow.ops.redistill import RedistillConfig

pytestmark = pytest.mark.s3

TTL = 1.5  # seconds; the heartbeat renews every TTL/3

HOLDER = """
import sys, time
from anyflow.ops.lease import RunLease
lease = RunLease(sys.argv[1], sys.argv[2], sys.argv[3], ttl_s=float(sys.argv[4]))
assert lease.acquire(), "the lease should be free"
print("acquired", flush=True)
time.sleep(600)
"""


def _lease_doc(s3_server, store: str, name: str) -> dict:
    """The lease document as stored, read with boto3 (independent of anyflow.storage)."""
    key = store.split(f"s3://{s3_server.bucket}/", 1)[1] + f"/models/{name}/lease.json"
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    return json.loads(body)


def _artifact(store: str, tmp_path: Path, i: int) -> str:
    src = tmp_path / f"gen{i}"
    src.mkdir()
    (src / "weights.safetensors").write_bytes(bytes([i]) * 256)
    url = storage.join(store, "artifacts", "distill", f"cand{i}")
    storage.publish(src, url, kind="generator")
    return url


def _run_files(store: str, name: str, run_id: str, candidate: str, ttl: float = TTL) -> tuple[str, str, str]:
    """plan.json, candidate.json and evals.json of a run that is ready for its decide task."""
    cfg = RedistillConfig(name=name, lease_ttl_s=ttl)
    rdir = f"{store}/redistill/{name}/runs/{run_id}"
    plan = {
        "run_id": run_id,
        "name": name,
        "store": store,
        "source": "procedural:n=2,seed=0",
        "started_at": "2025-01-01T00:00:00Z",
        "config": cfg.to_json(),
        "teacher": {"uri": "t", "digest": "d"},
        "teacher_changed": False,
        "window": {"new": 2, "replay": 0, "items_seen": 2, "source": "procedural"},
        "window_url": f"{rdir}/window.json",
        "dataset": "ds",
        "warm_start": "flowmap (first promotion)",
        "baseline": None,
        "action": "run",
        "distill_inputs": {
            "dataset": f"{store}/missing/dataset",
            "teacher": f"{store}/missing/teacher",
            "flowmap": f"{store}/missing/flowmap",
        },
    }
    urls = (f"{rdir}/plan.json", f"{rdir}/candidate.json", f"{rdir}/evals.json")
    storage.write_json_atomic(urls[0], plan)
    storage.write_json_atomic(urls[1], {"uri": candidate, "digest": storage.manifest_digest(candidate)})
    storage.write_json_atomic(
        urls[2], {"candidate": {"uri": candidate, "metrics": {"1": {"coupled_mse": 0.1}}}, "baseline": None}
    )
    return urls


def test_heartbeat_keeps_a_short_lease_across_processes_until_the_holder_is_killed(
    s3_server, s3_prefix: str
) -> None:
    name = "hb"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, s3_prefix, name, "run-holder", str(TTL)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        line = holder.stdout.readline()
        assert line.strip() == "acquired", holder.stderr.read() if holder.poll() is not None else line
        contender = registry.Lease(s3_prefix, name, owner="run-next", ttl_s=TTL, poll_s=0.05)
        start, expiries = time.time(), []
        while time.time() - start < 2.5 * TTL:  # several TTLs: only the heartbeat can keep it
            assert not contender.acquire(wait_s=0), "the contender got a lease that is being renewed"
            doc = _lease_doc(s3_server, s3_prefix, name)
            assert doc["owner"] == "run-holder" and not doc["released"]
            assert doc["expires_at"] > time.time(), "the holder's lease ran out although its process is alive"
            expiries.append(doc["expires_at"])
            time.sleep(0.2)
        assert max(expiries) - min(expiries) >= TTL, f"the lease was not renewed: {expiries}"
    finally:
        holder.send_signal(signal.SIGKILL)  # a hard crash: no release, no exit handler
        holder.wait(timeout=30)
    killed = time.time()
    last_expiry = _lease_doc(s3_server, s3_prefix, name)["expires_at"]
    assert last_expiry <= killed + TTL + 0.1  # the last beat was at most one TTL ago
    assert contender.acquire(wait_s=4 * TTL)
    taken = time.time()
    assert taken >= last_expiry, "the contender took the lease before it expired"
    assert taken - killed <= TTL + 1.5, f"the lease of a killed holder blocked for {taken - killed:.1f} s"
    doc = _lease_doc(s3_server, s3_prefix, name)
    assert doc["owner"] == "run-next" and not doc["released"]


def test_handoff_and_resume_across_tasks_of_one_run(s3_server, s3_prefix: str) -> None:
    plan_task = RunLease(s3_prefix, "ho", "run-a", ttl_s=TTL)
    assert plan_task.acquire()
    before = time.time()
    plan_task.handoff()  # the task ends: beats stop, the lease is left renewed for the next task
    after = time.time()
    handed = _lease_doc(s3_server, s3_prefix, "ho")
    # renewed during handoff(): a full TTL from then (bounds from this process's clock, whatever the load)
    assert handed["owner"] == "run-a" and before + TTL - 1e-3 <= handed["expires_at"] <= after + TTL + 1e-3
    time.sleep(TTL / 3 * 2)
    assert _lease_doc(s3_server, s3_prefix, "ho")["expires_at"] == handed["expires_at"]  # no beats any more
    time.sleep(TTL)  # the next pod starts late: the lease has expired, but nobody took it
    assert _lease_doc(s3_server, s3_prefix, "ho")["expires_at"] < time.time()
    with pytest.raises(registry.LeaseLost, match="run-a"):
        RunLease(s3_prefix, "ho", "run-b", ttl_s=TTL).resume()  # another run cannot "resume" it
    next_task = RunLease(s3_prefix, "ho", "run-a", ttl_s=TTL)
    next_task.resume()  # the same run takes it back and beats again
    try:
        time.sleep(1.5 * TTL)
        doc = _lease_doc(s3_server, s3_prefix, "ho")
        assert doc["owner"] == "run-a" and doc["expires_at"] > time.time()
        assert not registry.Lease(s3_prefix, "ho", owner="run-b").acquire()
    finally:
        next_task.release()
    assert _lease_doc(s3_server, s3_prefix, "ho")["released"]


def _stall_until_taken(lease: RunLease, store: str, name: str) -> threading.Thread:
    """Stall the holder's heartbeat (as a long GC pause or a network partition would) until another run
    has taken the expired lease, then let it beat again."""

    def stall() -> None:
        with lease.lock:  # the heartbeat cannot renew while we hold its lock
            assert registry.Lease(store, name, owner="run-thief", ttl_s=60, poll_s=0.05).acquire(
                wait_s=4 * TTL
            )

    thread = threading.Thread(target=stall, daemon=True)
    thread.start()
    return thread


def test_a_lost_lease_stops_the_work_on_the_main_thread(s3_server, s3_prefix: str) -> None:
    lease = RunLease(s3_prefix, "lost", "run-a", ttl_s=TTL)
    assert lease.acquire()
    stall = _stall_until_taken(lease, s3_prefix, "lost")
    start, steps_done = time.monotonic(), 0
    with pytest.raises(registry.LeaseLost) as info, lease.guard():
        while time.monotonic() - start < 20:  # "training": would run 20 s if nothing stopped it
            time.sleep(0.01)
            steps_done += 1
    stopped = time.monotonic() - start
    stall.join(timeout=10)
    assert stopped < 2 * TTL + 3, f"the work went on for {stopped:.1f} s after the lease was lost"
    msg = str(info.value)
    assert "run-a lost the lease" in msg and "run-thief" in msg and "must not promote" in msg
    assert _lease_doc(s3_server, s3_prefix, "lost")["owner"] == "run-thief"
    lease.release()  # not ours: a no-op
    assert _lease_doc(s3_server, s3_prefix, "lost")["owner"] == "run-thief"
    assert not _lease_doc(s3_server, s3_prefix, "lost")["released"]
    time.sleep(0.2)  # no stray interrupt arrives after the guard


def test_a_lost_lease_fails_the_block_on_another_thread(s3_server, s3_prefix: str) -> None:
    lease = RunLease(s3_prefix, "lost-t", "run-a", ttl_s=TTL)
    assert lease.acquire()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with lease.guard():
                time.sleep(3 * TTL)  # cannot be interrupted off the main thread: fails when it ends
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    _stall_until_taken(lease, s3_prefix, "lost-t").join(timeout=10)
    worker.join(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], registry.LeaseLost) and "run-thief" in str(errors[0])


def test_a_run_that_lost_its_lease_cannot_promote(s3_server, s3_prefix: str, tmp_path: Path) -> None:
    from anyflow.ops.redistill import decide

    candidate = _artifact(s3_prefix, tmp_path, 1)
    # 1. in-process: the heartbeat lost the lease during the run; decide must refuse before promoting
    plan_url, cand_url, evals_url = _run_files(s3_prefix, "m1", "run-a", candidate)
    lease = RunLease(s3_prefix, "m1", "run-a", ttl_s=TTL)
    assert lease.acquire()
    _stall_until_taken(lease, s3_prefix, "m1").join(timeout=10)
    time.sleep(TTL / 3 + 0.5)  # the next beat finds the lease gone
    assert lease.lost and "run-thief" in lease.lost
    with pytest.raises(registry.LeaseLost):
        decide(
            storage.read_json(plan_url),
            storage.read_json(cand_url),
            storage.read_json(evals_url),
            lease=lease,
        )
    assert registry.promoted(s3_prefix, "m1") is None and registry.history(s3_prefix, "m1") == []
    lease.stop()

    # 2. KFP tasks: the run's lease expired between pods and another run took it
    plan_url, cand_url, evals_url = _run_files(s3_prefix, "m2", "run-a", candidate)
    assert registry.Lease(s3_prefix, "m2", owner="run-a", ttl_s=0.5).acquire()  # as the plan pod left it
    time.sleep(0.6)
    assert registry.Lease(s3_prefix, "m2", owner="run-b", ttl_s=60).acquire()
    with pytest.raises(registry.LeaseLost, match="run-b"):
        steps.distill_step(plan_url)  # refuses before training (its inputs do not even exist)
    with pytest.raises(registry.LeaseLost, match="run-b"):
        steps.decide_step(plan_url, cand_url, evals_url)
    assert registry.promoted(s3_prefix, "m2") is None and registry.history(s3_prefix, "m2") == []
    conf = json.dumps({"name": "m2", "lease_ttl_s": TTL})
    assert steps.finish_step(s3_prefix, conf, "run-a") == "failed"  # the exit handler
    rec = storage.read_json(f"{s3_prefix}/redistill/m2/runs/run-a/record.json")
    assert rec["status"] == "failed" and "held by run-b" in rec["reason"]
    doc = _lease_doc(s3_server, s3_prefix, "m2")
    assert doc["owner"] == "run-b" and not doc["released"]  # finish never releases another run's lease

    # 3. control: the same files and an expired lease that nobody took — the run takes it back and promotes
    plan_url, cand_url, evals_url = _run_files(s3_prefix, "m3", "run-a", candidate)
    assert registry.Lease(s3_prefix, "m3", owner="run-a", ttl_s=0.5).acquire()
    time.sleep(0.6)
    rec = steps.decide_step(plan_url, cand_url, evals_url)
    assert rec["status"] == "promoted" and registry.promoted(s3_prefix, "m3")["uri"] == candidate
    assert steps.finish_step(s3_prefix, json.dumps({"name": "m3", "lease_ttl_s": TTL}), "run-a") == "promoted"
    assert _lease_doc(s3_server, s3_prefix, "m3")["released"]
