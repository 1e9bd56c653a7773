"""anyflow.registry: promotion alias, history, rollback, compare-and-swap, lease, and the gate."""

from __future__ import annotations

import argparse
import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest

from anyflow import registry, storage
from anyflow.registry import NO_ALIAS, AliasConflict, Lease, LeaseHeld, LeaseLost, RegistryError, gate


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_prefix")


def make_art(root: str, tmp_path: Path, i: int) -> str:
    src = tmp_path / f"src{i}"
    src.mkdir(exist_ok=True)
    (src / "weights.safetensors").write_bytes(bytes([i]) * 1000)
    url = storage.join(root, "artifacts", f"cand{i}")
    storage.publish(src, url, kind="generator", metrics={"i": i})
    return url


def test_promote_history_rollback(root: str, tmp_path: Path) -> None:
    a1, a2, a3 = (make_art(root, tmp_path, i) for i in (1, 2, 3))
    assert registry.promoted(root, "gen") is None and registry.list_models(root) == []
    e1 = registry.promote(root, "gen", a1, metrics={"1": {"fvd": 10.0}}, reason="first", expected_current=NO_ALIAS)
    assert e1["uri"] == a1 and e1["manifest_sha256"] == storage.manifest_digest(a1)
    e2 = registry.promote(root, "gen", a2, metrics={"1": {"fvd": 9.0}}, reason="better",
                          expected_current=e1["manifest_sha256"])
    registry.record_rejection(root, "gen", a3, metrics={"1": {"fvd": 50.0}}, reason="fvd worse at NFE 1")
    live = registry.promoted(root, "gen")
    assert live == e2 and live["metrics"] == {"1": {"fvd": 9.0}} and live["reason"] == "better"
    raw = storage.read_json(storage.join(root, "models", "gen", "promoted.json"))  # the documented object
    assert raw["uri"] == a2 and raw["manifest_sha256"] == storage.manifest_digest(a2)

    back = registry.rollback(root, "gen", reason="regression seen in prod")
    assert (back["uri"], back["manifest_sha256"]) == (a1, e1["manifest_sha256"])
    assert registry.promoted(root, "gen")["uri"] == a1
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback(root, "gen")

    h = registry.history(root, "gen")
    assert [(e["event"], e["uri"]) for e in h] == [("promote", a1), ("promote", a2), ("reject", a3), ("rollback", a1)]
    assert h[2]["metrics"] == {"1": {"fvd": 50.0}} and h[2]["reason"] == "fvd worse at NFE 1"
    assert h[2]["promoted"] == e2["manifest_sha256"] and h[3]["replaced"] == e2["manifest_sha256"]
    assert [e["seq"] for e in h] == [1, 2, 3, 4]
    assert registry.list_models(root) == ["gen"]


def test_promote_verifies_the_artifact_first(root: str, tmp_path: Path) -> None:
    a1, a2 = make_art(root, tmp_path, 1), make_art(root, tmp_path, 2)
    registry.promote(root, "gen", a1, metrics={}, reason="first")
    rel = storage.read_manifest(a2)["files"]["weights.safetensors"].get("object", "weights.safetensors")
    storage.write_bytes(storage.join(a2, rel), b"\2" * 999 + b"\3")  # flipped byte
    with pytest.raises(storage.ArtifactError, match=r"weights\.safetensors"):
        registry.promote(root, "gen", a2, metrics={}, reason="x")
    assert registry.promoted(root, "gen")["uri"] == a1
    # a local path that does not exist is named as such (228234a); on S3 a prefix has no existence of its own
    missing = r"nothing-here does not exist \(an artifact is a folder holding manifest\.json\)" \
        if not storage.is_remote(root) else r"manifest\.json is missing"
    with pytest.raises(storage.ArtifactError, match=missing):
        registry.promote(root, "gen", storage.join(root, "nothing-here"), metrics={}, reason="x")


def test_compare_and_swap_conflicts(root: str, tmp_path: Path) -> None:
    a1, a2, a3 = (make_art(root, tmp_path, i) for i in (1, 2, 3))
    d1 = registry.promote(root, "gen", a1, metrics={}, reason="first")["manifest_sha256"]
    # runs A and B both evaluated against a1; B promotes first, A must not overwrite B
    registry.promote(root, "gen", a2, metrics={"run": "B"}, reason="B wins", expected_current=d1)
    with pytest.raises(AliasConflict, match="another run moved it"):
        registry.promote(root, "gen", a3, metrics={"run": "A"}, reason="A late", expected_current=d1)
    with pytest.raises(AliasConflict):
        registry.promote(root, "gen", a3, metrics={}, reason="expects none", expected_current=NO_ALIAS)
    assert registry.promoted(root, "gen")["uri"] == a2
    assert [e["event"] for e in registry.history(root, "gen")] == ["promote", "promote", "conflict", "conflict"]

    # the storage-level CAS the alias relies on: a stale version tag is refused
    url = storage.join(root, "models", "gen", "promoted.json")
    _, tag = storage.read_bytes_etag(url)
    storage.write_bytes_if(url, storage.read_bytes(url) + b"\n", if_match=tag)  # fresh tag: accepted
    with pytest.raises(storage.PreconditionFailed):  # the tag we read is stale now (content-based tags)
        storage.write_bytes_if(url, b"{}", if_match=tag)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_bytes_if(url, b"{}", if_none_match=True)
    assert registry.promoted(root, "gen")["uri"] == a2


def test_history_stamps_sort_like_the_clock_across_a_second_boundary(root: str, monkeypatch) -> None:
    # The stamp took its seconds and its microseconds from two clock readings; when they straddled a second,
    # an entry sorted a second early (seen in CI: a later "conflict" listed before the first "promote").
    clock = iter([999.9999999, 1000.0000001, 1000.4])
    monkeypatch.setattr(registry.time, "time", lambda: next(clock))
    for event in ("a", "b", "c"):
        registry._record(root, "gen", {"event": event})
    assert [e["event"] for e in registry.history(root, "gen")] == ["a", "b", "c"]
    stamps = [registry._stamp(t) for t in (999.9999999, 1000.0, 1000.0000001, 1000.999999)]
    assert stamps == sorted(stamps) and stamps[0].endswith("39.999999Z") and stamps[1].endswith("40.000000Z")


def test_overlapping_promotions_leave_one_winner(tmp_path: Path) -> None:
    """Real threads racing on a local store (flock-serialised CAS): one wins, the others conflict."""
    root = str(tmp_path / "store")
    arts = [make_art(root, tmp_path, i) for i in range(5)]
    d0 = registry.promote(root, "gen", arts[0], metrics={}, reason="base")["manifest_sha256"]
    results: dict[int, str] = {}
    barrier = threading.Barrier(4)

    def run(i: int) -> None:
        barrier.wait()
        try:
            registry.promote(root, "gen", arts[i], metrics={"i": i}, reason=f"run {i}", expected_current=d0)
            results[i] = "won"
        except AliasConflict:
            results[i] = "conflict"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if r == "won"]
    assert len(winners) == 1 and len(results) == 4
    assert registry.promoted(root, "gen")["uri"] == arts[winners[0]]
    events = [e["event"] for e in registry.history(root, "gen")]
    assert events.count("promote") == 2 and events.count("conflict") == 3
    assert registry.rollback(root, "gen")["uri"] == arts[0]


def test_lease_acquire_expire_renew_release(root: str) -> None:
    a = Lease(root, "gen", owner="run-a", ttl_s=1.5, poll_s=0.05)
    b = Lease(root, "gen", owner="run-b", ttl_s=1.5, poll_s=0.05)
    assert a.acquire() and not b.acquire()
    assert a.holder()["owner"] == "run-a"
    a.renew()
    with pytest.raises(LeaseHeld, match="held by run-a"), b:
        pass
    assert b.acquire(wait_s=6.0)  # a's lease expires while b waits
    assert b.holder()["owner"] == "run-b"
    with pytest.raises(LeaseLost):
        a.renew()
    a.release()  # no-op: not ours any more
    storage.delete([a.url])  # a deleted lease file: renewing it is refused too
    with pytest.raises(LeaseLost):
        b.renew()
    assert b.acquire()
    assert b.holder()["owner"] == "run-b" and not b.holder()["released"]
    b.release()
    with Lease(root, "gen", owner="run-c", ttl_s=30) as c:
        assert c.holder()["owner"] == "run-c"
    assert Lease(root, "gen", owner="run-d").acquire()


M = [("fvd", False), ("clip", True)]


def test_gate_checks_every_nfe() -> None:
    prom = {1: {"fvd": 100.0, "clip": 0.30}, 4: {"fvd": 80.0, "clip": 0.32}}
    ok, why = gate({"1": {"fvd": 101.0, "clip": 0.295}, "4": {"fvd": 70.0, "clip": 0.35}}, prom,
                   metrics=M, margin={"fvd": 2.0, "clip": 0.01})
    assert ok and why == ["all 4 checks passed (every NFE within margin)"]
    # better on average and at NFE 4, but worse beyond the margin at NFE 1: rejected
    ok, why = gate({1: {"fvd": 103.0, "clip": 0.40}, 4: {"fvd": 50.0, "clip": 0.40}}, prom,
                   metrics=M, margin={"fvd": 2.0, "clip": 0.01})
    assert not ok and len(why) == 1 and why[0].startswith("NFE 1: fvd 103 vs promoted 100")
    ok, why = gate({1: {"fvd": 90.0, "clip": 0.28}, 4: {"fvd": 80.0, "clip": 0.32}}, prom, metrics=M, margin=0.01)
    assert not ok and why[0].startswith("NFE 1: clip 0.28") and "higher is better" in why[0]


def test_gate_refuses_missing_or_non_finite_values() -> None:
    prom = {1: {"fvd": 100.0}, 2: {"fvd": 90.0}}
    ok, why = gate({1: {"fvd": 90.0}}, prom, metrics=[("fvd", False)], margin=0.0)
    assert not ok and why == ["NFE 2: fvd missing or not finite in the candidate (None)"]
    ok, why = gate({1: {"fvd": math.nan}, 2: {"fvd": 1.0}}, prom, metrics=[("fvd", False)], margin=0.0)
    assert not ok and why[0].startswith("NFE 1")
    assert gate({1: {"fvd": 1.0}}, None, metrics=[("fvd", False)], margin=0.0)[0]
    assert gate({1: {"fvd": 100.0}, 2: {"fvd": 90.0}}, prom, metrics=[("fvd", False)], margin=0.0)[0]  # ties pass
    ok, why = gate({1: {"fid": 1.0}}, {1: {"fid": 2.0}}, metrics=[("fvd", False)], margin=0.0)
    assert not ok and "none of the gate metrics (fvd)" in why[0]


def test_models_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = str(tmp_path / "store")
    a1, a2 = make_art(root, tmp_path, 1), make_art(root, tmp_path, 2)
    from anyflow.cli import models

    parser = argparse.ArgumentParser()
    models.add_cli(parser.add_subparsers())

    def cli(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    assert cli("models", "promote", "gen", a1, "--root", root, "--metrics", '{"1": {"fvd": 3}}') == 0
    assert cli("models", "promote", "gen", a2, "--root", root, "--reason", "by hand") == 0
    assert cli("models", "promote", "gen", a1, "--root", root, "--expected-current", "beef") == 1
    assert cli("models", "list", "--root", root) == 0
    assert f"gen\t{a2}" in capsys.readouterr().out
    assert cli("models", "rollback", "gen", "--root", root) == 0
    assert cli("models", "show", "gen", "--root", root, "--metrics") == 0
    out = capsys.readouterr().out
    assert f"live = {a1}" in out and "by hand" in out and "conflict" in out and '"fvd": 3' in out


# ------------------------------------------------------------------ idempotent retries (issue 22 item 2)
class LostResponses:
    """A botocore hook on anyflow's S3 client: the server has applied the PUT, then the response is lost
    (the client sees a closed connection) -- for the PUTs ``pick(key, attempt)`` selects."""

    def __init__(self, pick: Any) -> None:
        self.pick, self.dropped, self.seen = pick, 0, {}

    def __call__(self, http_response: Any, parsed: Any, context: Any, **kw: Any) -> None:
        from botocore.exceptions import ConnectionClosedError

        key = context.get("anyflow_key", "")
        n = self.seen[key] = self.seen.get(key, 0) + 1
        if http_response.status_code < 300 and self.pick(key, n):
            self.dropped += 1
            raise ConnectionClosedError(endpoint_url=f"lost response of PUT {key}")

    def key_of(self, params: Any, context: Any, **kw: Any) -> None:
        context["anyflow_key"] = params.get("Key", "")


@pytest.fixture
def lose(s3_server: Any) -> Any:
    from anyflow import _storage_s3 as s3

    hooks: list[LostResponses] = []
    events = s3.client().meta.events

    def install(pick: Any) -> LostResponses:
        h = LostResponses(pick)
        events.register("before-parameter-build.s3.PutObject", h.key_of)
        events.register("after-call.s3.PutObject", h)
        hooks.append(h)
        return h

    yield install
    for h in hooks:
        events.unregister("after-call.s3.PutObject", h)
        events.unregister("before-parameter-build.s3.PutObject", h.key_of)


def _registry_puts(key: str) -> bool:
    return "/models/" in key and not key.endswith("lease.json")


@pytest.mark.s3
def test_lost_put_responses_are_neither_conflicts_nor_duplicates(s3_server: Any, s3_prefix: str, tmp_path: Path,
                                                                lose: Any) -> None:
    """Every registry PUT's first response is lost: each promotion/rollback still succeeds exactly once."""
    arts = [make_art(s3_prefix, tmp_path, i) for i in (1, 2, 3)]
    hook = lose(lambda key, n: _registry_puts(key) and n % 2 == 1)  # first try of each write
    live = NO_ALIAS
    for a in arts:
        e = registry.promote(s3_prefix, "gen", a, metrics={"1": {"fvd": 1.0}}, reason="r", expected_current=live)
        live = e["manifest_sha256"]
    registry.rollback(s3_prefix, "gen", expected_current=live)
    assert hook.dropped >= 8
    bucket, key = s3_prefix.split("://", 1)[1].split("/", 1)
    c = s3_server.client()  # the server's own state, not what anyflow reports
    alias = json.loads(c.get_object(Bucket=bucket, Key=f"{key}/models/gen/promoted.json")["Body"].read())
    assert alias["uri"] == arts[1] and [e["uri"] for e in alias["stack"]] == arts[:1]
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix=f"{key}/models/gen/history/")["Contents"]]
    events = [json.loads(c.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in sorted(keys)]
    assert [(e["event"], e["uri"]) for e in events] == [("promote", a) for a in arts] + [("rollback", arts[1])]


@pytest.mark.s3
def test_retried_promote_call_is_applied_once(s3_prefix: str, tmp_path: Path) -> None:
    a1, a2 = make_art(s3_prefix, tmp_path, 1), make_art(s3_prefix, tmp_path, 2)
    registry.promote(s3_prefix, "gen", a1, metrics={}, reason="first", request_id="req-1")
    registry.promote(s3_prefix, "gen", a2, metrics={}, reason="second")
    again = registry.promote(s3_prefix, "gen", a1, metrics={}, reason="first", request_id="req-1")
    assert again["uri"] == a1 and registry.promoted(s3_prefix, "gen")["uri"] == a2  # not applied twice
    assert [e["event"] for e in registry.history(s3_prefix, "gen")] == ["promote", "promote"]


def test_connection_error_inside_an_except_block_is_transient() -> None:
    from botocore.exceptions import ClientError, ConnectionClosedError

    from anyflow import _storage_s3 as s3

    try:
        try:
            raise ClientError({"Error": {"Code": "PreconditionFailed"},
                               "ResponseMetadata": {"HTTPStatusCode": 412}}, "PutObject")
        except ClientError:
            raise ConnectionClosedError(endpoint_url="http://x")  # noqa: B904 - the case under test
    except ConnectionClosedError as exc:
        assert isinstance(exc.__context__, ClientError)
        assert s3.classify(exc) == "transient"


@pytest.mark.s3
def test_faulty_promotions_figures(s3_server: Any, s3_prefix: str, tmp_path: Path, lose: Any) -> None:
    """Seeded campaign: 30 uncontended promotions, 35 % of registry PUT responses lost."""
    import random

    rng = random.Random(22)
    arts = [make_art(s3_prefix, tmp_path, i) for i in range(1, 31)]
    hook = lose(lambda key, n: _registry_puts(key) and rng.random() < 0.35)
    false_conflicts = 0
    for i, a in enumerate(arts):
        live = registry.promoted(s3_prefix, "gen")
        try:
            registry.promote(s3_prefix, "gen", a, metrics={}, reason=f"p{i}",
                             expected_current=live["manifest_sha256"] if live else NO_ALIAS)
        except AliasConflict:
            false_conflicts += 1
    hist = registry.history(s3_prefix, "gen")
    promotes = [e["uri"] for e in hist if e["event"] == "promote"]
    extra = len(hist) - len(arts)
    print(f"\nlost responses {hook.dropped}; false conflicts {false_conflicts}/30; "
          f"history entries {len(hist)} for 30 promotions (extra {extra})")
    assert hook.dropped > 5
    assert false_conflicts == 0 and promotes == arts and extra == 0
    assert registry.promoted(s3_prefix, "gen")["uri"] == arts[-1]
