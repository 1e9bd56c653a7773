"""``anyflow rerun --run RUN``: an input the run recorded and that was published again since with the same files
(a forced rerun of its stage that reproduced them) is the same input; other files are still refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from anyflow import cli, storage
from anyflow.cli import run as cli_run
from anyflow.ops import record as R


def _publish(store: str, tmp_path: Path, name: str, kind: str, payload: bytes) -> str:
    src = tmp_path / f"{name}-{time.monotonic_ns()}"
    src.mkdir()
    (src / "weights.safetensors").write_bytes(payload * 64)
    url = storage.join(store, "artifacts", name, "k")
    storage.publish(src, url, kind=kind)
    return url


@pytest.mark.parametrize("remote", [False, True])
def test_republished_same_files_is_the_same_input(remote: bool, tmp_path: Path, request, capsys) -> None:
    store = request.getfixturevalue("s3_prefix") if remote else str(tmp_path / "store")
    ds = _publish(store, tmp_path, "ds", "dataset", b"d")
    te = _publish(store, tmp_path, "te", "teacher", b"t")
    fm = _publish(store, tmp_path, "fm", "flowmap", b"f")
    for stage, output, uri in (("prepare_data", "dataset", ds), ("train_teacher", "teacher", te),
                               ("train_flowmap", "flowmap", fm)):
        R.write_stage_record(store, "r1", stage=stage, output=output, uri=uri)
    recorded = R.read_stage_records(store, "r1")["train_teacher"]
    assert recorded["content_sha256"] == storage.content_digest(te)  # the independent digest of its files

    before = recorded["manifest_sha256"]
    time.sleep(1.1)  # created_at has whole seconds: the manifest differs
    assert _publish(store, tmp_path, "te", "teacher", b"t") == te  # the forced rerun: same files, new manifest
    assert storage.manifest_digest(te) != before
    args = cli.build_parser().parse_args(["rerun", "--stage", "distill", "--run", "r1", "--store", store,
                                          "--workdir", str(tmp_path / "w")])
    assert cli_run._rerun_uris(args) == {"dataset": ds, "teacher": te, "flowmap": fm}
    assert f"teacher={te} was published again since run 'r1'" in capsys.readouterr().err

    _publish(store, tmp_path, "te", "teacher", b"T")  # other files: still refused
    with pytest.raises(cli_run.UserError, match=r"teacher=.*changed since the run recorded it.*files differ"):
        cli_run._rerun_uris(args)


def test_records_from_before_content_digests_still_refuse_a_new_manifest(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    ds = _publish(store, tmp_path, "ds", "dataset", b"d")
    doc = R.write_stage_record(store, "old", stage="prepare_data", output="dataset", uri=ds)
    doc.pop("content_sha256")  # a record written by an older anyflow
    storage.write_json_atomic(R.stage_record_url(store, "old", "prepare_data"), doc)
    time.sleep(1.1)
    _publish(store, tmp_path, "ds", "dataset", b"d")
    args = cli.build_parser().parse_args(["rerun", "--stage", "train_teacher", "--run", "old", "--store", store,
                                          "--workdir", str(tmp_path / "w")])
    with pytest.raises(cli_run.UserError, match="changed since the run recorded it"):
        cli_run._rerun_uris(args)
