"""``Platform.prepare_fanout`` (issue 23, "Merge: a small CPU step"): partition pods encode, the task after the
loop only merges. The merge must never load an encoder (it runs on a CPU-only profile), must refuse a partition
the loop did not publish, and the fingerprint task refuses an unpartitioned run before any pod starts; through
KFP's own local runner the fanned-out graph gives the same dataset as the unpartitioned encoder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from anyflow import storage
from anyflow.config import StageInputError, apply_overrides, get_preset
from anyflow.data.partitions import PARTITION_STAGE
from anyflow.stages import prepare_data as prep
from anyflow.stages import run_stage

GEOM = {"data.frames": 5, "data.height": 16, "data.width": 16, "data.samples_per_shard": 2}


def _samples(url: str) -> dict:
    from anyflow.data.shards import LatentDataset

    n = LatentDataset(url, batch_size=1, seed=0, shuffle=False).len_samples
    ds = LatentDataset(url, batch_size=n, seed=0, shuffle=False)
    return {**next(ds), "negative": ds.negative_embedding()}


def _same(a: dict, b: dict) -> None:
    assert b["keys"] == a["keys"] and b["captions"] == a["captions"]
    assert torch.equal(b["text"], a["text"]) and torch.equal(b["negative"], a["negative"])
    # partitions of 2 clips encode other VAE batches than one run of 6: a CPU convolution's summation order
    # depends on its batch, so latents agree to float32 rounding (torch's defaults: rtol 1.3e-6, atol 1e-5)
    torch.testing.assert_close(b["latents"], a["latents"])


def test_fanout_plan_refuses_an_unpartitioned_run_naming_what_to_set(tmp_path: Path) -> None:
    cfg = apply_overrides(get_preset("tiny"), {**GEOM, "data.source": "procedural:n=4,seed=0"})
    assert prep.partition_plan(cfg, str(tmp_path)) == []  # without fan-out: prepare_data encodes it itself
    with pytest.raises(StageInputError, match=r"prepare_fanout: true .* needs data.partition_size > 0"):
        prep.partition_plan(cfg, str(tmp_path), fanout=True)
    parted = apply_overrides(cfg, {"data.partition_size": 2})
    with pytest.raises(StageInputError, match=r"needs a store \(the pipeline's 'store' parameter\)"):
        prep.partition_plan(parted, "", fanout=True)
    assert [p.split(":")[0] for p in prep.partition_plan(parted, str(tmp_path), fanout=True)] == ["0", "1"]


def test_merge_only_merges_published_partitions_and_refuses_a_missing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = str(tmp_path / "store")
    over = {**GEOM, "data.source": "procedural:n=6,seed=4", "data.partition_size": 2}
    cfg = apply_overrides(get_preset("tiny"), over)
    for item in prep.partition_plan(cfg, store):  # what the loop's prepare_partition pods do, one item each
        prep.encode_partition_item(cfg, store, item, progress=False)
    assert prep.partition_plan(cfg, store) == []  # all three published

    loads = []
    real = prep.common.load_models
    monkeypatch.setattr(prep.common, "load_models", lambda c: loads.append(1) or real(c))
    with prep.merge_only():
        merged = run_stage("prepare_data", store=store, overrides=over, progress=False)
    assert loads == [] and merged.metrics["partitions"] == 3 and merged.metrics["partitions_encoded"] == 0
    reference = run_stage("prepare_data", out=str(tmp_path / "ref"), progress=False,
                          overrides={**over, "data.partition_size": 0})  # the unpartitioned encoder
    _same(_samples(reference.uri), _samples(merged.uri))
    assert loads == [1]  # the reference did load them (the counter works)
    loads.clear()

    grown = {**over, "data.source": "procedural:n=7,seed=4"}  # a clip arrived after the fingerprint task listed
    with prep.merge_only(), pytest.raises(StageInputError, match=r"1 of 4 partitions of \S+ are not in the store \S+ -- 3:\w{16} = part-00003 .*only merges"):
        run_stage("prepare_data", store=store, overrides=grown, progress=False)  # named; exit 2 (bad input)
    with prep.merge_only(), pytest.raises(StageInputError, match=r"compiled with prepare_fanout: true .* needs data.partition_size > 0"):
        run_stage("prepare_data", store=store, overrides={**over, "data.partition_size": 0}, progress=False)
    assert loads == []  # no encoder was loaded on the merge's CPU profile
    assert prep._NO_ENCODERS == []  # the context is left as found, also after a failure


def test_a_missing_partition_is_bad_input_even_beside_a_transient_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge's retries cannot publish a missing partition (only the loop's pods encode), so a missing one is
    exit 2 also when another partition failed transiently; both are named."""
    from anyflow.data import partitions as P
    from anyflow.errors import classify_failure

    store = str(tmp_path / "store")
    over = {**GEOM, "data.source": "procedural:n=6,seed=8", "data.partition_size": 2}
    cfg = apply_overrides(get_preset("tiny"), over)
    prep.encode_partition_item(cfg, store, prep.partition_plan(cfg, store)[0], progress=False)
    flaky = P.partition_url(store, P.plan_partitions(cfg.data.source, 2)[2], cfg)
    real = P.cached_partition
    monkeypatch.setattr(P, "cached_partition", lambda url, key: (_ for _ in ()).throw(ConnectionError("reset"))
                        if url == flaky else real(url, key))
    monkeypatch.setattr(prep.common, "load_models", lambda c: pytest.fail("the merge task loaded an encoder"))
    with prep.merge_only(), pytest.raises(StageInputError) as err:
        run_stage("prepare_data", store=store, overrides=over, progress=False)
    msg = str(err.value)
    assert "1 of 3 partitions of procedural:n=6,seed=8 are not in the store" in msg and " 1:" in msg
    assert "part-00002" in msg and "ConnectionError: reset" in msg
    assert classify_failure(err.value)[0] == 2


def test_the_merge_only_component_exits_2_without_loading_an_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The KFP component itself (what the compiled merge task runs): ``merge_only=True`` reaches the stage."""
    from kfp import dsl

    from components.prepare_data.component import prepare_data

    store = str(tmp_path / "store")
    over = {**GEOM, "data.source": "procedural:n=4,seed=6", "data.partition_size": 2}
    cfg = apply_overrides(get_preset("tiny"), over)
    first = prep.partition_plan(cfg, store)[0]
    prep.encode_partition_item(cfg, store, first, progress=False)  # the loop published one partition of two
    monkeypatch.setattr(prep.common, "load_models", lambda c: pytest.fail("the merge task loaded an encoder"))
    out = dsl.Dataset(name="dataset", uri=str(tmp_path / "out" / "dataset"))
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "out" / "metrics"))
    with pytest.raises(SystemExit) as exit_:
        prepare_data(out, metrics, preset="tiny", overrides_json=json.dumps(over), store=store, merge_only=True)
    assert exit_.value.code == 2  # bad input: KFP's retries stop (anyflow.errors)
    assert "1 of 2 partitions of procedural:n=4,seed=6 are not in the store" in capsys.readouterr().err


def test_partition_cache_checks_sizes_without_reading_the_data(tmp_path: Path) -> None:
    """The fingerprint and merge tasks check every partition on every run: by manifest and sizes, no hashing
    (readers check each byte they use); a missing or truncated file still makes the partition be encoded again."""
    from anyflow.data import partitions as P

    store = str(tmp_path / "store")
    cfg = apply_overrides(get_preset("tiny"), {**GEOM, "data.source": "procedural:n=4,seed=7",
                                               "data.partition_size": 2})
    for item in prep.partition_plan(cfg, store):
        prep.encode_partition_item(cfg, store, item, progress=False)
    storage._VERIFIED.clear()  # a fresh process: nothing hashed yet
    hashed = []
    real = storage.hash_inside
    storage_hash = pytest.MonkeyPatch()
    storage_hash.setattr(storage, "hash_inside", lambda *a, **k: hashed.append(a[1]) or real(*a, **k))
    try:
        assert prep.partition_plan(cfg, store) == []
        assert hashed == []
        part = P.plan_partitions(cfg.data.source, 2)[1]
        url = P.partition_url(store, part, cfg)
        shard = next(f for f in storage.read_manifest(url)["files"] if f.startswith("shard-"))
        path = storage.local_path(storage.join(url, shard))
        path.write_bytes(path.read_bytes()[:-1])  # truncated
        assert [i.split(":")[0] for i in prep.partition_plan(cfg, store)] == ["1"]
    finally:
        storage_hash.undo()


@pytest.mark.slow
def test_fanned_out_graph_through_kfp_local_runner(tmp_path: Path) -> None:
    """The compiled ``anyflow-rerun-prepare-data`` graph with ``prepare_fanout`` run by KFP 2.17's local runner:
    two partition tasks in the ``ParallelFor``, a merge that encodes nothing, the unpartitioned dataset's
    samples; and the same graph with ``data.partition_size`` 0 stops in the fingerprint task."""
    from pipelines.local import LocalRunError, local_env, run_local
    from pipelines.platform import Platform
    from pipelines.rerun import build_rerun_pipeline

    store = tmp_path / "store"
    over = {**GEOM, "data.source": "procedural:n=4,seed=5", "data.partition_size": 2}
    func = build_rerun_pipeline("prepare_data", platform=dataclasses.replace(Platform.local_runner(),
                                                                            prepare_fanout=True))
    env = local_env(apply_overrides(get_preset("tiny"), over))
    params = {"preset": "tiny", "overrides_json": json.dumps(over), "store": str(store)}
    run = run_local(func, params, tmp_path / "work", "fanout", env=env)
    url = run.artifacts["prepare_data"]  # the single output is named after its stage
    manifest = storage.read_manifest(url)
    assert manifest["metrics"]["partitions"] == 2 and manifest["metrics"]["partitions_encoded"] == 0
    assert len([p for p in manifest["parents"] if f"/{PARTITION_STAGE}/" in p["uri"]]) == 2
    log = (tmp_path / "work" / "runs" / "fanout.log").read_text()
    assert log.count("prepare_data partition ") == 2 and "(encoded)" in log  # one loop task per partition
    reference = run_stage("prepare_data", out=str(tmp_path / "ref"), progress=False,
                          overrides={**over, "data.partition_size": 0})
    _same(_samples(reference.uri), _samples(url))

    bad = {**params, "overrides_json": json.dumps({**over, "data.partition_size": 0})}
    with pytest.raises(LocalRunError, match="fingerprint"):
        run_local(func, bad, tmp_path / "work", "unpartitioned", env=env)
    assert "needs data.partition_size > 0" in (tmp_path / "work" / "runs" / "unpartitioned.log").read_text()


@pytest.mark.parametrize("argv", [["submit", "--pipeline", "anyflow-t2v"], ["submit", "--pipeline", "anyflow-far"],
                                  ["rerun", "--stage", "prepare_data"]])
def test_submit_refuses_an_unpartitioned_run_under_prepare_fanout(argv: list[str], tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    """Before anything reaches the cluster: the CLI applies the fingerprint task's rule (no KFP API is contacted:
    nothing listens on the host)."""
    from anyflow import cli

    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    plat = tmp_path / "platform.yaml"
    plat.write_text("prepare_fanout: true\n")
    common = [*argv, "--host", "http://127.0.0.1:9", "--platform", str(plat),
              "--image", "registry.test/anyflow-train@sha256:" + "0" * 64]
    assert cli.main([*common, "--store", "s3://bucket/anyflow"]) == 2
    err = capsys.readouterr().err
    assert "needs data.partition_size > 0" in err and "--set data.partition_size=N" in err
    assert cli.main([*common, "--set", "data.partition_size=4"]) == 2
    assert "needs a store" in capsys.readouterr().err


def test_a_partition_pod_retried_after_bad_input_stops_before_loading_encoders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KFP retries a failed partition pod (the platform's retries); after a bad-input failure the retry of the same
    run stops at once, naming the first failure, instead of loading the encoders again. Another run tries anew."""
    from anyflow.stages import RUN_ENV, RepeatedStageFailure

    rows = [{"video": "a.mp4", "caption": "a"}, {"video": "b.mp4"}]  # b has no caption; no video exists
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = apply_overrides(get_preset("tiny"), {**GEOM, "data.source": str(tmp_path / "index.jsonl"),
                                               "data.partition_size": 2, "data.strict": True})
    store = str(tmp_path / "store")
    (item,) = prep.partition_plan(cfg, store)
    loads = []
    real = prep._encoders
    monkeypatch.setattr(prep, "_encoders", lambda c: loads.append(1) or real(c))
    monkeypatch.setenv(RUN_ENV, "run-a")
    with pytest.raises(Exception, match="missing_video") as first:
        prep.encode_partition_item(cfg, store, item, progress=False)
    assert not isinstance(first.value, RepeatedStageFailure) and len(loads) == 1
    with pytest.raises(RepeatedStageFailure, match=r"earlier attempt of this run \(run-a.*missing_video"):
        prep.encode_partition_item(cfg, store, item, progress=False)  # the KFP retry
    assert len(loads) == 1  # stopped before loading the encoders
    monkeypatch.setenv(RUN_ENV, "run-b")  # a new run (the input may have been fixed): tried again
    with pytest.raises(Exception, match="missing_video") as again:
        prep.encode_partition_item(cfg, store, item, progress=False)
    assert not isinstance(again.value, RepeatedStageFailure) and len(loads) == 2
