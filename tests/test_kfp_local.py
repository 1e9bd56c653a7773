"""End to end: ``anyflow run`` through KFP's local runner (SubprocessRunner, use_venv=False) on the tiny
preset, with every artifact going through a real S3 API server on 127.0.0.1 (moto server mode).

One such run (``shared_run``, module scope: the whole pipeline is minutes on 2 shared cores) is read by the
tests below, each checking its own side of it: its artifacts, metrics and KFP UI outputs; a second run must
then be served entirely from the content-addressed store, and a single-stage ``rerun`` of evaluate (its
inputs given as store URLs) must reuse the same artifact; its per-run stage records (by run id, as on a
cluster) resolve a ``rerun --run``; its export step (``--export``) publishes the exports; and a run with the
fine-tuning branch on the same store computes only that branch, on a dataset with the run's overrides and
then its own. The tests only read the shared run's outputs, or add runs and records that none of the others
reads (a rerun's new run id is found as the one that was not there before it), so they pass in any order.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.s3objects import get, key, keys

from anyflow import cli, storage
from anyflow.cli import run as cli_run
from anyflow.ops import record as R
from components._io import OUTPUT_ROLE
from pipelines.local import load_record

# Fewer steps / NFEs than the tiny preset so that the run stays within a few minutes on 2 shared cores. The
# held-out fraction is the fine-tuning test's (its branch's dataset must take the run's data.* overrides).
FAST = ["evaluate.nfes=1,4", "evaluate.reference_steps=4", "evaluate.num_prompts=2", "teacher.train.steps=2",
        "flowmap.train.steps=2", "distill.train.steps=2", "data.heldout_fraction=0.5"]
SETS = [arg for item in FAST for arg in ("--set", item)]
ROLES = {"dataset": "prepare_data", "teacher": "train_teacher", "flowmap": "train_flowmap",
         "generator": "distill", "report": "evaluate"}
STAGES = tuple(ROLES.values())


@dataclass
class SharedRun:
    """``anyflow run --name first --export`` on a fresh S3 prefix, and what it left."""

    store: str
    workdir: Path
    common: list[str]  # --store, --s3-endpoint and the --set overrides of every command on this store
    out: str  # what the run printed
    record: dict  # the local run record of "first"
    run_root: Path  # the local runner's folder of this run (the tasks' executor outputs)
    run_keys: list[str]  # the objects under <store>/runs right after the run


@pytest.fixture(scope="module")
def shared_run(s3_server, tmp_path_factory: pytest.TempPathFactory) -> SharedRun:
    store = f"s3://{s3_server.bucket}/shared-run-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path_factory.mktemp("shared-run") / "runs"
    common = ["--store", store, "--s3-endpoint", s3_server.endpoint, *SETS]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("ANYFLOW_S3_ENDPOINT", s3_server.endpoint)
        mp.delenv("ANYFLOW_IMAGE", raising=False)
        code = cli.main(["run", "--workdir", str(workdir), "--name", "first", "--export", *common])
    assert code == 0, printed.getvalue()[-4000:]
    (run_root,) = [p for p in (workdir / "kfp-local").iterdir() if p.is_dir()]
    return SharedRun(store=store, workdir=workdir, common=common, out=printed.getvalue(),
                     record=load_record("first", workdir), run_root=run_root,
                     run_keys=keys(s3_server, f"{store}/runs"))


@pytest.fixture
def on_shared_store(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANYFLOW_S3_ENDPOINT", s3_server.endpoint)  # restored after the test
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)


def _artifact_json(uri: str, relpath: str) -> dict:
    """A JSON file the artifact's manifest lists (on S3 it lives under its publisher's staging prefix)."""
    return json.loads(storage.read_bytes(storage.file_url(uri, relpath)))


def _run_ids(s3_server, store: str) -> set[str]:
    root = key(s3_server, store)
    return {k[len(root) + len("/runs/") :].split("/", 1)[0] for k in keys(s3_server, f"{store}/runs")}


def _check_ui_artifacts(run_root: Path, artifacts: dict) -> None:
    """What the KFP UI shows, read back from the local runner's executor outputs (issue 19 item 3): every stage's
    Metrics artifact holds its manifest's headline numbers; evaluate's HTML artifact is the S3 report, whole,
    with nothing linked outside it."""
    logged = {}
    for task in ("prepare-data", "train-teacher", "train-flowmap", "distill", "evaluate"):
        out = json.loads((run_root / task / "executor_output.json").read_text())
        (art,) = out["artifacts"]["metrics"]["artifacts"]
        logged[task] = art["metadata"]
    from components._io import flatten_metrics

    for task, role in (("prepare-data", "dataset"), ("train-teacher", "teacher"), ("train-flowmap", "flowmap"),
                       ("distill", "generator"), ("evaluate", "report")):
        recorded = flatten_metrics(storage.read_manifest(artifacts[role])["metrics"])
        assert logged[task] == pytest.approx(recorded), task  # every finite number, nothing else
    assert logged["prepare-data"]["clips_written"] > 0
    for task in ("train-teacher", "train-flowmap", "distill"):
        assert logged[task]["steps_per_s"] > 0 and any(k.startswith(("loss", "forward/loss")) for k in logged[task])
    assert {"generator/nfe1/coupled_mse", "generator/nfe4/coupled_mse"} <= set(logged["evaluate"])
    shown = (run_root / "evaluate" / "html").read_text(encoding="utf-8")
    report = storage.read_bytes(storage.file_url(artifacts["report"], "report.html")).decode("utf-8")
    assert shown == report and shown.count("data:image/") >= 4
    assert not re.findall(r"""(?:src|href)=["'](?!data:|#)""", shown)


@pytest.mark.slow
@pytest.mark.s3
def test_anyflow_run_twice_on_s3_store(shared_run: SharedRun, on_shared_store, capsys) -> None:
    store, workdir = shared_run.store, shared_run.workdir
    first, out1 = shared_run.record, shared_run.out
    assert set(first["artifacts"]) == set(ROLES)
    for role, stage in ROLES.items():
        uri = first["artifacts"][role]
        assert uri.startswith(f"{store}/artifacts/{stage}/"), (role, uri)
        manifest = storage.verify(uri)  # re-hashes every file over S3
        assert manifest["files"], role
    assert not any(first["cached"].values()), "a fresh S3 prefix cannot have cached stages"

    # The evaluate artifact's manifest lists metrics for every NFE of the preset.
    metrics = storage.read_manifest(first["artifacts"]["report"])["metrics"]
    flat = "\n".join(_flatten(metrics))
    for nfe in (1, 4):
        assert f"nfe{nfe}/" in flat, f"no metrics for NFE {nfe}"
    assert storage.exists(storage.file_url(first["artifacts"]["report"], "report.html"))  # where it was staged
    assert first["report_html"] and Path(first["report_html"]).read_text().lstrip().lower().startswith("<")
    assert "report.html:" in out1 and "0/5 outputs reused" in out1
    _check_ui_artifacts(shared_run.run_root, first["artifacts"])

    base = ["run", "--workdir", str(workdir), "--export", *shared_run.common]
    assert cli.main([*base, "--name", "second"]) == 0
    out2 = capsys.readouterr().out
    second = load_record("second", workdir)
    assert second["artifacts"] == first["artifacts"]
    assert all(second["cached"].values()), second["cached"]
    assert "5/5 outputs reused from the store cache" in out2
    for stage in ROLES.values():
        assert f"[anyflow] {stage}: reused cached artifact" in out2

    # Single-stage rerun with importer inputs taken from the first run's record.
    rerun = ["rerun", "--stage", "evaluate", "--run", "first", "--workdir", str(workdir), *shared_run.common]
    assert cli.main(rerun) == 0
    out3 = capsys.readouterr().out
    assert f"evaluate     cached   {first['artifacts']['report']}" in out3


def _rerun_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["rerun", *argv])


@pytest.mark.slow
@pytest.mark.s3
def test_kfp_local_run_records_by_run_id_and_rerun_resolves_them(
    shared_run: SharedRun, on_shared_store, s3_server, tmp_path: Path, capsys
) -> None:
    """The record task in the whole pipeline: what the runner substituted for ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``
    is one run id, the same in every task's record (tests/test_run_records.py: the records themselves)."""
    store, workdir, common = shared_run.store, shared_run.workdir, shared_run.common
    root = key(s3_server, store)
    run_keys = shared_run.run_keys  # listed right after the run, before any other test's runs
    run_ids = {k[len(root) + len("/runs/") :].split("/", 1)[0] for k in run_keys}
    assert len(run_ids) == 1, run_keys
    run_id = run_ids.pop()
    assert run_id.isdigit(), f"the local runner should substitute a random integer, got {run_id!r}"
    assert run_keys == sorted(f"{root}/runs/{run_id}/{s}.json" for s in STAGES)
    local = load_record("first", workdir)
    assert local["run_id"] == run_id and local["store"] == store
    out = shared_run.out
    assert "run: first (show it with 'anyflow status first --workdir" in out  # one name: not the run id too
    assert f"run id: {run_id}" not in out and f"--run {run_id}" not in out
    for stage in STAGES:
        doc = json.loads(get(s3_server, f"{store}/runs/{run_id}/{stage}.json"))
        role = OUTPUT_ROLE[stage]
        assert doc["run_id"] == run_id and doc["stage"] == stage and doc["output"] == role
        assert doc["uri"] == local["artifacts"][role]  # the pipeline's own output metadata
        assert doc["uri"].startswith(f"{store}/artifacts/{stage}/")
        assert doc["manifest_sha256"] == hashlib.sha256(get(s3_server, doc["uri"] + "/manifest.json")).hexdigest()
    distill = json.loads(get(s3_server, f"{store}/runs/{run_id}/distill.json"))
    assert distill["inputs"] == {r: local["artifacts"][r] for r in ("dataset", "teacher", "flowmap")}

    # as on a cluster: only the run id and the store (a fresh workdir has no local record)
    cluster = ["--workdir", str(tmp_path / "elsewhere"), *common]
    expected = {r: local["artifacts"][r] for r in ("dataset", "teacher", "flowmap")}
    assert cli_run._rerun_uris(_rerun_args("--stage", "distill", "--run", run_id, *cluster)) == expected
    # the local name resolves through the same records
    named = ["--workdir", str(workdir), *common]
    assert cli_run._rerun_uris(_rerun_args("--stage", "distill", "--run", "first", *named)) == expected

    before = _run_ids(s3_server, store)
    assert cli.main(["rerun", "--stage", "distill", "--run", run_id, *cluster]) == 0
    out = capsys.readouterr().out
    assert (
        f"{'distill':<12} {'cached':<8} {local['artifacts']['generator']}" in out
    )  # same inputs → same artifact
    # the rerun recorded its own output under its own run id
    (new_id,) = _run_ids(s3_server, store) - before
    assert R.run_artifacts(store, new_id)[0] == {"generator": local["artifacts"]["generator"]}


@pytest.mark.slow
@pytest.mark.s3
def test_anyflow_run_export_runs_the_export_step_in_the_local_runner(shared_run: SharedRun, on_shared_store) -> None:
    """``--export``: the export step after evaluate published both formats of the distilled generator under
    <store>/exports/<format>/<key>, and the run printed where (tests/test_export.py: what an export holds)."""
    store = shared_run.store
    generator = shared_run.record["artifacts"]["generator"]
    digest = storage.manifest_digest(generator)[:20]
    for fmt in ("diffusers", "lora"):
        url = f"{store}/exports/{fmt}/{digest}"
        assert f"export ({fmt}): {url}" in shared_run.out
        storage.verify(url)
        assert storage.read_manifest(url)["parents"][0]["uri"] == generator
    index = _artifact_json(f"{store}/exports/diffusers/{digest}", "model_index.json")
    assert index["_class_name"] == "AnyFlowPipeline"


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


@pytest.mark.slow
@pytest.mark.s3
def test_finetune_dataset_takes_common_overrides_then_its_own(shared_run: SharedRun, on_shared_store, capsys) -> None:
    # The finetune branch prepares its dataset with the run's --set overrides (data.heldout_fraction=0.5, in
    # SETS) and then --finetune-set on top (before, it got only its own and silently fell back to the preset for
    # everything else). On the shared run's store and settings: its stages come from the store cache, the
    # branch is computed.
    store, workdir = shared_run.store, shared_run.workdir
    base = ["run", "--workdir", str(workdir), *shared_run.common]
    assert cli.main([*base, "--finetune-set", "data.source=procedural:n=8,seed=3"]) == 2
    assert "--finetune-set needs --finetune" in capsys.readouterr().err
    assert cli.main([*base, "--finetune", "--finetune-set", "data.sorce=x"]) == 2
    assert "--finetune-set" in (err := capsys.readouterr().err) and "sorce" in err
    assert cli.main([*base, "--finetune", "--finetune-set", "finetune.train.steps=1"]) == 2
    assert "data.* keys only" in capsys.readouterr().err

    argv = [*base, "--name", "finetune", "--finetune", "--finetune-set", "data.source=procedural:n=8,seed=3"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    # the branch's results are visible: its artifacts listed, counted, recorded, its report named
    # (before, the summary said "5/5 outputs reused" and showed only the run without fine-tuning)
    listed = {line.split()[0]: line.split()[-1] for line in out if line.startswith("  ") and len(line.split()) == 3}
    assert {"prepare_finetune_data", "finetune", "evaluate_finetuned"} <= set(listed), out
    assert any(line.endswith("outputs reused from the store cache.") and "/8 " in line for line in out), out
    assert storage.verify(listed["finetune"])["extra"]["stage"] == "finetune"
    (ft_report,) = [line for line in out if line.startswith("report of the fine-tuned generator: ")]
    assert storage.exists(ft_report.split(": ", 1)[1])
    assert out[-1].startswith("report.html: ")  # the report path is the last line
    (record,) = [line.split(": ", 1)[1] for line in out if line.startswith("run record: ")]
    assert "finetune" in load_record(record, workdir)["artifacts"]
    datasets = {}
    for manifest_url in storage.list_prefix(f"{store}/artifacts/prepare_data"):
        if manifest_url.endswith("/manifest.json"):
            uri = manifest_url.rsplit("/", 1)[0]
            storage.verify(uri)
            datasets[uri] = _artifact_json(uri, "config.json")["data"]
    by_source = {d["source"]: d for d in datasets.values()}
    assert set(by_source) == {"procedural:n=16,seed=0", "procedural:n=8,seed=3"}, datasets
    assert all(d["heldout_fraction"] == 0.5 for d in by_source.values()), datasets


def test_progress_view_keeps_the_terminal_short_and_the_log_whole(tmp_path: Path) -> None:
    import io

    from pipelines.local import ProgressLog

    echo = io.StringIO()
    log = ProgressLog(tmp_path / "runs" / "x.log", echo)
    lines = [
        "06:10:00.000 - INFO - Running pipeline: \x1b[95m'anyflow-t2v'\x1b[0m",
        "06:10:00.001 - INFO - Executing task \x1b[96m'prepare-data'\x1b[0m",
        '    {"inputs": {"parameterValues": {"store": "/s"}}}',
        "    prepare_data: 13clip [00:00, 96.05clip/s, skipped=0, written=12]",
        "    [anyflow] prepare_data: wrote artifact /s/artifacts/prepare_data/abc",
        "06:10:04.000 - INFO - Task \x1b[96m'prepare-data'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m",
        "06:10:04.001 - INFO - Executing task 'record-stage'",
        "    [anyflow] record prepare_data: run 1 -> /s/artifacts/prepare_data/abc",
        "06:10:04.100 - INFO - Task 'record-stage' finished with status SUCCESS",
        "06:10:04.200 - INFO - Executing task 'distill'",
        "    ValueError: distill: input teacher=/s/x is not a teacher checkpoint",
        "06:10:05.000 - ERROR - Task 'distill' finished with status FAILURE",
    ]
    for line in lines:  # the runner writes in pieces; lines may arrive split
        log.write(line[:10])
        log.write(line[10:] + "\n")
    log.close()
    shown = echo.getvalue().splitlines()
    assert shown[0] == "Running pipeline: 'anyflow-t2v'"
    assert shown[1:3] == ["▶ prepare-data", "  [anyflow] prepare_data: wrote artifact /s/artifacts/prepare_data/abc"]
    assert shown[3].startswith("  prepare-data: SUCCESS in ") and shown[3].endswith(" s")
    assert shown[4] == "▶ distill" and shown[5].startswith("  distill: FAILURE in ")
    assert len(shown) == 6  # no JSON, progress bars or record-stage lines
    assert log.failed == "distill" and "is not a teacher checkpoint" in "\n".join(log.tail)
    full = (tmp_path / "runs" / "x.log").read_text()
    assert all(line in full for line in lines)  # the log keeps everything, colour codes included


def test_failed_local_run_names_the_task_and_shows_the_log_tail(tmp_path: Path, capsys,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    workdir = tmp_path / "runs"
    missing = str(tmp_path / "no-such-folder")  # checked before the runner starts: one sentence, no KFP at all
    assert cli.main(["run", "--workdir", str(workdir), "--set", f"data.source={missing}", "--name", "early"]) == 2
    out, err = capsys.readouterr()
    assert f"data source {missing} is empty or does not exist" in err and "Traceback" not in err
    assert not (workdir / "runs" / "early.log").exists() and "▶" not in out
    bad = tmp_path / "junk"  # listable, but nothing in it decodes: the prepare-data task itself fails
    bad.mkdir()
    (bad / "clip.mp4").write_bytes(b"not a video")
    (bad / "clip.txt").write_text("a caption")
    assert cli.main(["run", "--workdir", str(workdir), "--set", f"data.source={bad}", "--name", "broken"]) == 2
    out, err = capsys.readouterr()
    assert "▶ prepare-data" in out and "[anyflow] prepare_data failed: no usable clips" in out  # the log's tail
    assert "Traceback" not in out  # the stage's own clear error, not a traceback through KFP's executor
    assert "task 'prepare-data' failed in the local KFP runner" in err and str(workdir / "runs" / "broken.log") in err
    assert "non-Python base image" not in out + err  # the local runner's irrelevant warnings are filtered
    assert '"parameterValues"' not in out  # executor JSON stays in the log
    assert '"parameterValues"' in (workdir / "runs" / "broken.log").read_text()


@pytest.mark.slow
@pytest.mark.s3
def test_local_runs_take_the_s3_endpoint_from_the_environment(s3_server, s3_prefix: str, tmp_path: Path, capsys,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Only AWS_ENDPOINT_URL (the s3_server fixture sets it): no --s3-endpoint, no ANYFLOW_S3_ENDPOINT. The local
    # runner must not inject the local platform's in-cluster endpoint (it used to: prepare_data then retried
    # http://minio.anyflow.svc.cluster.local:9000 and failed).
    import os

    monkeypatch.delenv("ANYFLOW_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("KFP_HOST", raising=False)
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    argv = ["rerun", "--stage", "prepare_data", "--workdir", str(tmp_path / "runs"), "--store", s3_prefix,
            "--set", "data.source=procedural:n=4,seed=0"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    (uri,) = {w for w in out.split() if w.startswith(f"{s3_prefix}/artifacts/prepare_data/")}
    assert storage.verify(uri)["files"]  # published through the endpoint of the environment, re-hashed over S3
