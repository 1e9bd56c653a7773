"""A malformed store or artifact location is refused before any work starts (issue 20 item 1): one sentence,
exit 2, nothing written. Before, ``anyflow run --store s3:/x`` ran for minutes and wrote to ``./s3:/x``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from anyflow import cli
from anyflow.urls import LocationError, check_url

BAD = [("s3:/x", "two slashes"), ("s3://", "names no bucket"), ("s3:///prefix", "names no bucket"),
       ("s3://Bad_Bucket/x", "not a valid S3 bucket name"), ("gs://bucket/x", "unsupported scheme"),
       ("S3://bucket/x", "unsupported scheme"), ("file:/tmp/x", "file URL"), ("", "empty"),
       ("s3//my-bucket/x", "without its colon"), ("S3//my-bucket/x", "without its colon"),
       ("s3a//my-bucket", "without its colon")]
GOOD = ["./store", "/abs/store", "relative/dir", "file:///tmp/x", "s3://my-bucket", "s3://my-bucket/a/b",
        "s3a://my.bucket-1/p", "s3/x", "./s3//x", "s3"]


@pytest.mark.parametrize(("url", "why"), BAD)
def test_malformed_locations_are_named(url: str, why: str) -> None:
    with pytest.raises(LocationError, match=why):
        check_url(url, "--store")


@pytest.mark.parametrize("url", GOOD)
def test_valid_locations_pass_unchanged(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize("argv", [
    ["run", "--store", "s3:/x"], ["run", "--store", "s3://"], ["run", "--store", "s3//my-bucket/x"], ["stage", "prepare_data", "--store", "s3:/x"],
    ["stage", "train_teacher", "--store", "st", "--in", "dataset=s3:/d"], ["rerun", "--stage", "distill", "--from",
    "dataset=s3://"], ["artifacts", "verify", "s3:/x"], ["sample", "s3:/ckpt"], ["models", "list", "--store", "s3:/x"],
    ["redistill", "--store", "s3:/x", "--source", "procedural:n=4", "--teacher", "t"],
])
def test_every_command_refuses_them_before_doing_anything(argv: list[str], tmp_path: Path, capsys,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "s3:" in err[-1] and "Traceback" not in "\n".join(err), err
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())  # nothing written (no ./s3: folder)


def test_the_stage_entry_point_refuses_them_too(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "anyflow.stages.prepare_data", "--store", "s3:/x"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert res.returncode == 2 and "two slashes" in res.stderr and not list(tmp_path.iterdir()), res.stderr


def test_models_defaults_to_the_run_store_and_says_when_empty(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANYFLOW_STORE", raising=False)
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no models in ./anyflow-runs/store") and "anyflow models promote" in out
    assert cli.main(["models", "promote", "m", "x", "--metrics", "[1"]) == 2  # a usage error: exit 2, one line
    assert capsys.readouterr().err.startswith("anyflow models promote: error: --metrics '[1'")


@pytest.mark.parametrize("nfe", ["0", "-3", "two"])
def test_sample_refuses_a_step_count_below_one(nfe: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["sample", "some/checkpoint", "--nfe", nfe])
    assert exc.value.code == 2 and "argument --nfe" in capsys.readouterr().err
