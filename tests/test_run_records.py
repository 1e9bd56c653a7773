"""Per-run stage records (``<store>/runs/<run id>/<entry>.json``) and ``anyflow rerun --run <run id>``.

The records are written by the ``record_stage`` task after each stage task (the stage tasks take no
run id, so KFP's cache can skip them) from the stage output artifact's metadata. They are read back
with a plain boto3 client and checked against sha256 of the manifest bytes computed here; the local
runner tests run the real record component (KFP substitutes ``dsl.PIPELINE_JOB_ID_PLACEHOLDER`` with a
random integer, as a cluster substitutes the run UUID), here on an artifact the run did not compute (as
after a KFP cache hit); in the whole pipeline, whose run id alone then resolves a rerun's inputs as for a
cluster run, in tests/test_kfp_local.py (``test_kfp_local_run_records_by_run_id_and_rerun_resolves_them``: it
reads the one local-runner run that file's tests share).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
from pathlib import Path

import pytest
from helpers.s3objects import get as _get
from helpers.s3objects import key as _key
from helpers.s3objects import keys as _keys
from kfp import dsl

import components
from anyflow import cli, storage
from anyflow.cli import run as cli_run
from anyflow.ops import record as R
from components._io import OUTPUT_ROLE, write_run_record
from pipelines.rerun import STAGE_INPUTS, STAGE_OUTPUT

pytestmark = pytest.mark.s3


def _artifact(store: str, tmp_path: Path, name: str, kind: str, payload: bytes = b"x") -> str:
    src = tmp_path / name
    src.mkdir()
    (src / "weights.safetensors").write_bytes(payload * 64)
    url = storage.join(store, "artifacts", name, "k")
    storage.publish(src, url, kind=kind)
    return url


def _rerun_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["rerun", *argv])


def test_output_roles_match_the_rerun_pipelines() -> None:
    assert OUTPUT_ROLE == {stage: out for stage, (out, _cls) in STAGE_OUTPUT.items()}
    assert all(role in OUTPUT_ROLE.values() for roles in STAGE_INPUTS.values() for role in roles)


def test_records_one_object_per_entry_written_concurrently(s3_server, s3_prefix: str, tmp_path: Path) -> None:
    arts = {
        "prepare_data": _artifact(s3_prefix, tmp_path, "ds", "dataset", b"d"),
        "train_teacher": _artifact(s3_prefix, tmp_path, "te", "teacher", b"t"),
        "train_flowmap": _artifact(s3_prefix, tmp_path, "fm", "flowmap", b"f"),
        "prepare_finetune_data": _artifact(s3_prefix, tmp_path, "ds2", "dataset", b"e"),
    }
    barrier = threading.Barrier(len(arts))

    def write(entry: str) -> None:  # one "pod" per stage task, all at once
        barrier.wait()
        stage = "prepare_data" if entry == "prepare_finetune_data" else entry
        R.write_stage_record(
            s3_prefix,
            "run-1",
            stage=stage,
            output=OUTPUT_ROLE[stage],
            uri=arts[entry],
            entry=entry,
            inputs={"dataset": arts["prepare_data"]} if stage != "prepare_data" else {},
        )

    threads = [threading.Thread(target=write, args=(e,)) for e in arts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    root = _key(s3_server, s3_prefix)
    assert _keys(s3_server, f"{s3_prefix}/runs") == sorted(f"{root}/runs/run-1/{e}.json" for e in arts)
    for entry, uri in arts.items():
        doc = json.loads(_get(s3_server, f"{s3_prefix}/runs/run-1/{entry}.json"))
        manifest = _get(s3_server, f"{uri}/manifest.json")
        assert (
            doc["format"] == "anyflow.stage-record/1" and doc["run_id"] == "run-1" and doc["entry"] == entry
        )
        assert doc["uri"] == uri and doc["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
        assert doc["kind"] == json.loads(manifest)["kind"]
    # roles come from the entries named after their stage; the second dataset is listed but gives no role
    roles, records = R.run_artifacts(s3_prefix, "run-1")
    assert roles == {
        "dataset": arts["prepare_data"],
        "teacher": arts["train_teacher"],
        "flowmap": arts["train_flowmap"],
    }
    assert sorted(records) == sorted(arts)
    # a retried task rewrites only its own entry
    R.write_stage_record(
        s3_prefix, "run-1", stage="train_teacher", output="teacher", uri=arts["train_teacher"], cached=True
    )
    assert R.read_stage_records(s3_prefix, "run-1")["train_teacher"]["cached"] is True
    assert R.read_stage_records(s3_prefix, "run-1")["prepare_data"]["uri"] == arts["prepare_data"]


def test_finetune_rerun_takes_the_runs_finetune_dataset(s3_prefix: str, tmp_path: Path) -> None:
    """A run with the finetune branch recorded two datasets; rerunning finetune uses the second one."""
    ds, ds2 = (_artifact(s3_prefix, tmp_path, n, "dataset", p) for n, p in (("ds", b"d"), ("ds2", b"e")))
    gen = _artifact(s3_prefix, tmp_path, "gen", "generator", b"g")
    R.write_stage_record(s3_prefix, "run-ft", stage="prepare_data", output="dataset", uri=ds)
    R.write_stage_record(s3_prefix, "run-ft", stage="prepare_data", output="dataset", uri=ds2,
                         entry="prepare_finetune_data")
    R.write_stage_record(s3_prefix, "run-ft", stage="distill", output="generator", uri=gen)
    common = ("--run", "run-ft", "--store", s3_prefix, "--workdir", str(tmp_path / "w"))
    assert cli_run._rerun_uris(_rerun_args("--stage", "finetune", *common)) == {"dataset": ds2, "generator": gen}
    # the other stages keep the training dataset
    assert cli_run._rerun_uris(_rerun_args("--stage", "train_teacher", *common)) == {"dataset": ds}


def test_bad_ids_and_unpublished_artifacts_are_refused(s3_prefix: str) -> None:
    for bad in ("../other", "a/b", "", ".hidden", "{{$.pipeline_job_uuid}}"):
        with pytest.raises(R.RunRecordError, match="not usable in a store path"):
            R.stage_records_dir(s3_prefix, bad)
    with pytest.raises(storage.ArtifactError, match=r"manifest\.json is missing"):
        R.write_stage_record(
            s3_prefix, "run-1", stage="distill", output="generator", uri=f"{s3_prefix}/nothing"
        )
    assert R.read_stage_records(s3_prefix, "run-1") == {}


def test_rerun_errors_name_the_store_the_run_and_the_recorded_stages(
    s3_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["--workdir", str(tmp_path / "w"), "--store", s3_prefix]
    assert cli.main(["rerun", "--stage", "distill", "--run", "0123abcd-run", *base]) == 2
    err = capsys.readouterr().err
    assert f"no stage records for run '0123abcd-run' in store {s3_prefix}" in err
    assert f"{s3_prefix}/runs/0123abcd-run/" in err and "no stages recorded" in err

    ds = _artifact(s3_prefix, tmp_path, "ds", "dataset", b"d")
    te = _artifact(s3_prefix, tmp_path, "te", "teacher", b"t")
    R.write_stage_record(s3_prefix, "r2", stage="prepare_data", output="dataset", uri=ds)
    R.write_stage_record(s3_prefix, "r2", stage="train_teacher", output="teacher", uri=te)
    assert cli.main(["rerun", "--stage", "distill", "--run", "r2", *base]) == 2
    err = capsys.readouterr().err
    assert f"run 'r2' in store {s3_prefix} recorded the stage(s) prepare_data, train_teacher" in err
    assert "also needs role(s) flowmap" in err and "--from ROLE=URI" in err

    fm = _artifact(s3_prefix, tmp_path, "fm", "flowmap", b"f")
    uris = cli_run._rerun_uris(
        _rerun_args("--stage", "distill", "--run", "r2", "--from", f"flowmap={fm}", *base)
    )
    assert uris == {"dataset": ds, "teacher": te, "flowmap": fm}
    # the recorded artifact was re-published with other content: refused, naming the role and the run
    src = tmp_path / "te2"
    src.mkdir()
    (src / "weights.safetensors").write_bytes(b"changed")
    storage.publish(src, te, kind="teacher")
    assert cli.main(["rerun", "--stage", "distill", "--run", "r2", "--from", f"flowmap={fm}", *base]) == 2
    err = capsys.readouterr().err
    assert (
        f"teacher={te} (from run 'r2' in store {s3_prefix})" in err
        and "changed since the run recorded it" in err
    )


def test_local_records_from_before_run_ids_still_work(s3_prefix: str, tmp_path: Path) -> None:
    ds = _artifact(s3_prefix, tmp_path, "ds", "dataset", b"d")
    runs = tmp_path / "w" / "runs"
    runs.mkdir(parents=True)
    (runs / "old.json").write_text(json.dumps({"name": "old", "artifacts": {"dataset": ds, "report": "r"}}))
    args = _rerun_args("--stage", "train_teacher", "--run", "old", "--workdir", str(tmp_path / "w"))
    assert cli_run._rerun_uris(args) == {"dataset": ds}


def _stage_output(tmp_path: Path, name: str, uri: str, stage: str = "distill", **meta) -> dsl.Model:
    """A stage output artifact as KFP hands it to the record task: the stage's metadata, no payload here."""
    return dsl.Model(uri=str(tmp_path / "kfp" / name),
                     metadata={"anyflow_uri": uri, "anyflow_stage": stage, "anyflow_cached": False, **meta})


def test_record_task_records_only_with_a_run_id_and_a_store(s3_prefix: str, tmp_path: Path, capsys) -> None:
    uri = _artifact(s3_prefix, tmp_path, "g", "generator")
    out = _stage_output(tmp_path, "generator", uri, anyflow_inputs={"dataset": "s3://b/d"})
    assert write_run_record(out, "", "r3") is None  # no store: nothing to record into (the pipelines skip it)
    assert "no stage record" in capsys.readouterr().out
    assert write_run_record(out, s3_prefix, "") is None  # no run id
    assert write_run_record(out, s3_prefix, "{{$.pipeline_job_uuid}}") is None  # not substituted
    assert "was not substituted" in capsys.readouterr().out
    assert storage.list_prefix(f"{s3_prefix}/runs") == []
    doc = write_run_record(out, s3_prefix, "r3", "distill_again")
    assert R.read_stage_records(s3_prefix, "r3") == {"distill_again": doc}
    assert doc["uri"] == uri and doc["stage"] == "distill" and doc["output"] == "generator"
    assert doc["inputs"] == {"dataset": "s3://b/d"} and doc["cached"] is False
    assert R.run_artifacts(s3_prefix, "r3")[0] == {}  # not named after its stage: no role
    # an output written into KFP itself (no anyflow_uri, no pointer file) is not in any store
    with pytest.raises(ValueError, match="not published to a store"):
        write_run_record(dsl.Model(uri=str(tmp_path / "kfp" / "raw"), metadata={"anyflow_stage": "distill"}),
                         s3_prefix, "r3")


def test_record_task_reads_the_url_from_the_artifact_not_from_a_recomputation(
    s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a KFP cache hit the record task gets the cached artifact: its metadata is all there is."""
    import anyflow.stages

    def no_recompute(*args, **kwargs):
        raise AssertionError("the record task must not run a stage")

    monkeypatch.setattr(anyflow.stages, "run_stage", no_recompute)
    uri = _artifact(s3_prefix, tmp_path, "t", "teacher")  # a key no recomputation here could produce
    cached = _stage_output(tmp_path, "teacher", uri, stage="train_teacher", anyflow_cached=True,
                           anyflow_inputs={"dataset": "s3://b/d"})
    from components.record_stage.component import record_stage

    record_stage(artifact=cached, store=s3_prefix, run_id="run-9", entry="")
    doc = R.read_stage_records(s3_prefix, "run-9")["train_teacher"]
    assert doc["uri"] == uri and doc["output"] == "teacher" and doc["cached"] is True
    assert doc["manifest_sha256"] == storage.manifest_digest(uri)
    # only the pointer file (metadata lost): still the stage's store URL
    pointer = tmp_path / "kfp" / "pointer"
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(json.dumps({"anyflow_uri": uri, "stage": "train_teacher"}))
    record_stage(artifact=dsl.Model(uri=str(pointer)), store=s3_prefix, run_id="run-10", entry="train_teacher")
    assert R.run_artifacts(s3_prefix, "run-10")[0] == {"teacher": uri}


def test_prepare_data_component_body_then_record_task_write_its_record(tmp_path: Path) -> None:
    from components.record_stage.component import record_stage

    store = str(tmp_path / "store")
    out = dsl.Dataset(uri=str(tmp_path / "kfp" / "dataset"))
    metrics = dsl.Metrics(uri=str(tmp_path / "kfp" / "metrics"))
    components.stage_functions()["prepare_data"](dataset=out, metrics=metrics, store=store)
    assert not (tmp_path / "store" / "runs").exists()  # the stage task itself records nothing
    record_stage(artifact=out, store=store, run_id="7", entry="prepare_data")
    doc = json.loads((tmp_path / "store" / "runs" / "7" / "prepare_data.json").read_text())
    manifest = Path(out.metadata["anyflow_uri"], "manifest.json").read_bytes()
    assert doc["uri"] == out.metadata["anyflow_uri"] and doc["output"] == "dataset" and doc["inputs"] == {}
    assert doc["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()


def test_kfp_local_record_task_records_an_artifact_it_did_not_compute(
    s3_server, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record task in KFP's local runner, fed like after a KFP cache hit: an artifact this run did not
    produce (an importer with a stage output's metadata; the local runner has no cache of its own). The
    record holds the URL from the metadata, and run_local learns the substituted run id from the task."""
    from pipelines.local import run_local
    from pipelines.platform import Platform
    from pipelines.records import record

    monkeypatch.setenv("ANYFLOW_S3_ENDPOINT", s3_server.endpoint)
    uri = _artifact(s3_prefix, tmp_path, "fm", "flowmap", b"f")
    image = "ghcr.io/anyflow/anyflow-train:v0.0.0-test"
    recorder = components.build_record_component(image)
    meta = {"anyflow_uri": uri, "anyflow_stage": "train_flowmap", "anyflow_cached": False,
            "anyflow_inputs": {"dataset": "s3://b/artifacts/prepare_data/k"}}

    def pipeline(store: str, no_store: str = "") -> dsl.Model:
        cached = dsl.importer(artifact_uri=str(tmp_path / "earlier-run" / "flowmap"), artifact_class=dsl.Model,
                              reimport=False, metadata=meta)
        record(recorder, Platform.local(), cached.output, store, "train_flowmap")
        skipped = dsl.importer(artifact_uri=str(tmp_path / "earlier-run" / "x"), artifact_class=dsl.Model,
                               reimport=False, metadata={"anyflow_stage": "distill"})
        record(recorder, Platform.local(), skipped.output, no_store, "distill")  # store "": the task does not run
        return cached.output

    pipeline.__annotations__ = {"store": str, "no_store": str, "return": dsl.Model}  # real types for KFP
    pipeline = dsl.pipeline(name="record-cached-artifact")(pipeline)
    run = run_local(pipeline, {"store": s3_prefix}, tmp_path / "w", "rec")
    assert run.run_id and run.run_id.isdigit()
    roles, records = R.run_artifacts(s3_prefix, run.run_id)
    assert roles == {"flowmap": uri} and sorted(records) == ["train_flowmap"]
    assert records["train_flowmap"]["inputs"] == meta["anyflow_inputs"]
    assert records["train_flowmap"]["manifest_sha256"] == storage.manifest_digest(uri)


def test_a_record_reads_the_manifest_once(s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record task reads the output's manifest once (one S3 GET) and takes both digests from those bytes:
    the manifest digest is sha256 of the bytes in the store, the content digest that of a separate read."""
    uri = _artifact(s3_prefix, tmp_path, "m", "model", b"m")
    gets: list[str] = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda u, *a, **k: gets.append(str(u)) or real(u, *a, **k))
    doc = R.write_stage_record(s3_prefix, "run-m", stage="train_teacher", output="teacher", uri=uri)
    assert [g for g in gets if g.endswith("manifest.json")] == [f"{uri}/manifest.json"]
    monkeypatch.undo()
    assert doc["manifest_sha256"] == hashlib.sha256(storage.read_bytes(f"{uri}/manifest.json")).hexdigest()
    assert doc["content_sha256"] == storage.content_digest(uri) and doc["kind"] == "model"
