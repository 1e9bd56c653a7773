"""End to end: ``anyflow run`` through KFP's local runner (SubprocessRunner, use_venv=False) on the tiny
preset, with every artifact going through a real S3 API server on 127.0.0.1 (moto server mode). Then a
second run must be served entirely from the content-addressed store, and a single-stage ``rerun`` of
evaluate (its inputs given as store URLs) must reuse the same artifact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from anyflow import cli, storage
from pipelines.local import load_record

# Fewer steps / NFEs than the tiny preset so the whole test stays within a few minutes on 2 shared cores.
FAST = ["evaluate.nfes=1,4", "evaluate.reference_steps=8", "evaluate.num_prompts=2",
        "teacher.train.steps=8", "flowmap.train.steps=8", "distill.train.steps=4"]
SETS = [arg for item in FAST for arg in ("--set", item)]
ROLES = {"dataset": "prepare_data", "teacher": "train_teacher", "flowmap": "train_flowmap",
         "generator": "distill", "report": "evaluate"}


def _check_ui_artifacts(workdir: Path, artifacts: dict) -> None:
    """What the KFP UI shows, read back from the local runner's executor outputs (issue 19 item 3): every stage's
    Metrics artifact holds its manifest's headline numbers; evaluate's HTML artifact is the S3 report, whole,
    with nothing linked outside it."""
    (run_root,) = [p for p in (workdir / "kfp-local").iterdir() if p.is_dir()]
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
def test_anyflow_run_twice_on_s3_store(s3_server, s3_prefix: str, tmp_path: Path, capsys,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANYFLOW_S3_ENDPOINT", s3_server.endpoint)  # restored after the test
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    workdir = tmp_path / "runs"
    base = ["run", "--workdir", str(workdir), "--store", s3_prefix, "--s3-endpoint", s3_server.endpoint, *SETS]

    assert cli.main([*base, "--name", "first"]) == 0
    out1 = capsys.readouterr().out
    first = load_record("first", workdir)
    assert set(first["artifacts"]) == set(ROLES)
    for role, stage in ROLES.items():
        uri = first["artifacts"][role]
        assert uri.startswith(f"{s3_prefix}/artifacts/{stage}/"), (role, uri)
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
    _check_ui_artifacts(workdir, first["artifacts"])

    assert cli.main([*base, "--name", "second"]) == 0
    out2 = capsys.readouterr().out
    second = load_record("second", workdir)
    assert second["artifacts"] == first["artifacts"]
    assert all(second["cached"].values()), second["cached"]
    assert "5/5 outputs reused from the store cache" in out2
    for stage in ROLES.values():
        assert f"[anyflow] {stage}: reused cached artifact" in out2

    # Single-stage rerun with importer inputs taken from the first run's record.
    rerun = ["rerun", "--stage", "evaluate", "--run", "first", "--workdir", str(workdir), "--store", s3_prefix,
             "--s3-endpoint", s3_server.endpoint, *SETS]
    assert cli.main(rerun) == 0
    out3 = capsys.readouterr().out
    assert f"evaluate     cached   {first['artifacts']['report']}" in out3


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


@pytest.mark.slow
def test_finetune_dataset_takes_common_overrides_then_its_own(tmp_path: Path, capsys,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The finetune branch prepares its dataset with the run's --set overrides and then --finetune-set on top
    # (before, it got only its own and silently fell back to the preset for everything else).
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    workdir = tmp_path / "runs"
    base = ["run", "--workdir", str(workdir), *SETS, "--set", "data.heldout_fraction=0.5"]
    assert cli.main([*base, "--finetune-set", "data.source=procedural:n=8,seed=3"]) == 2
    assert "--finetune-set needs --finetune" in capsys.readouterr().err
    assert cli.main([*base, "--finetune", "--finetune-set", "data.sorce=x"]) == 2
    assert "--finetune-set" in (err := capsys.readouterr().err) and "sorce" in err
    assert cli.main([*base, "--finetune", "--finetune-set", "finetune.train.steps=1"]) == 2
    assert "data.* keys only" in capsys.readouterr().err

    assert cli.main([*base, "--finetune", "--finetune-set", "data.source=procedural:n=8,seed=3"]) == 0
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
    for manifest_url in storage.list_prefix(str(workdir / "store" / "artifacts" / "prepare_data")):
        if manifest_url.endswith("/manifest.json"):
            uri = manifest_url.rsplit("/", 1)[0]
            storage.verify(uri)
            datasets[uri] = storage.read_json(f"{uri}/config.json")["data"]
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
