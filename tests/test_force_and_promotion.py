"""A forced recompute never destroys the promoted model, and "the same teacher?" is a question about bytes.

* ``anyflow rerun --force`` / ``anyflow.stages.discard`` / ``run_stage(force=True)`` remove or overwrite the
  stage's artifact at its key in place; when that artifact is the one a model of the store's registry promotes
  they are refused before anything is touched (docs/operations.md, "Rerunning one stage of an earlier run").
* The re-distillation teacher check compares content digests (``storage.content_digest``), recorded in the
  child's ``parents`` at publish time; integrity (``lineage``'s ``ok``) still compares manifest sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import run_cli

from anyflow import registry, storage
from anyflow.config import StageInputError
from anyflow.ops.redistill import _teacher_digest_of
from anyflow.stages import _resolve, discard, run_stage

ONE_STEP = {"teacher.train.steps": 1, "flowmap.train.steps": 1}


def _art(tmp_path: Path, url: str, payload: bytes, *, kind: str = "dataset", **kw) -> str:
    src = tmp_path / f"src-{abs(hash((url, payload)))}"
    src.mkdir(exist_ok=True)
    (src / "weights.safetensors").write_bytes(payload)
    storage.publish(src, url, kind=kind, **kw)
    return url


_main = run_cli  # (exit code, stdout, stderr) of `anyflow ARGV` in this process


def test_rerun_force_refuses_to_delete_the_promoted_artifact_on_a_local_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    store = str(tmp_path / "store")
    key = _resolve("prepare_data", "tiny", ONE_STEP, None, 1)[3]  # the key the forced rerun computes
    ds_uri = _art(tmp_path, storage.join(store, "artifacts", "prepare_data", key), b"\0" * 64)
    registry.promote(store, "anyflow-t2v", ds_uri, metrics={}, reason="test")
    before = storage.manifest_digest(ds_uri)

    with pytest.raises(
        StageInputError, match=r"promoted as model 'anyflow-t2v'.*anyflow models promote\|rollback"
    ):
        discard("prepare_data", overrides=ONE_STEP, store=store)
    with pytest.raises(StageInputError, match="promoted as model 'anyflow-t2v'"):  # would publish over it
        run_stage("prepare_data", store=store, overrides=ONE_STEP, progress=False, force=True)
    # the same store spelled another way (through a symlink) still names the same folder
    (tmp_path / "link").symlink_to(store)
    with pytest.raises(StageInputError, match="promoted as model"):
        discard("prepare_data", overrides=ONE_STEP, store=str(tmp_path / "link"))

    sets = [a for k, v in ONE_STEP.items() for a in ("--set", f"{k}={v}")]
    argv = [
        "rerun",
        "--stage",
        "prepare_data",
        "--store",
        store,
        "--workdir",
        str(tmp_path / "w"),
        *sets,
        "--force",
    ]
    code, out, err = _main(argv, capsys)
    assert code == 2 and "--force: removed" not in out, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "promoted as model 'anyflow-t2v'" in lines[0] and ds_uri in lines[0], err
    assert storage.manifest_digest(ds_uri) == before and storage.verify(ds_uri)  # untouched
    assert registry.promoted(store, "anyflow-t2v")["uri"] == ds_uri

    # once the alias points elsewhere the forced rerun proceeds
    other = _art(tmp_path, str(tmp_path / "store" / "other"), b"\1" * 64)
    registry.promote(store, "anyflow-t2v", other, metrics={}, reason="move the alias first")
    assert discard("prepare_data", overrides=ONE_STEP, store=store) == [ds_uri]
    assert not Path(ds_uri).exists()


def test_discard_refuses_the_promoted_artifact_on_s3(s3_prefix: str, tmp_path: Path) -> None:
    store = s3_prefix
    key = _resolve("prepare_data", "tiny", ONE_STEP, None, 1)[3]
    url = _art(tmp_path, storage.join(store, "artifacts", "prepare_data", key), b"\0" * 64)
    registry.promote(store, "gen", url, metrics={}, reason="test")
    before = storage.manifest_digest(url)
    with pytest.raises(
        StageInputError, match=f"--force would delete {url}, the artifact promoted as model 'gen'"
    ):
        discard("prepare_data", overrides=ONE_STEP, store=store)
    assert storage.manifest_digest(url) == before and storage.verify(url)
    registry.promote(
        store, "gen", _art(tmp_path, storage.join(store, "other"), b"\1" * 64), metrics={}, reason="x"
    )
    assert discard("prepare_data", overrides=ONE_STEP, store=store) == [url]
    assert storage.list_prefix(url) == []


def test_teacher_check_compares_content_not_manifests(tmp_path: Path) -> None:
    """A teacher published again with identical bytes (another manifest: other metrics, time) is the same
    teacher for the re-distillation check; other bytes are a changed teacher; lineage integrity still sees the
    new manifest."""
    store = tmp_path / "store"
    teacher = _art(tmp_path, str(store / "teacher"), b"\7" * 128, kind="teacher")
    gen = _art(tmp_path, str(store / "gen"), b"\2" * 32, kind="distill", parents=[teacher])
    content = storage.content_digest(teacher)
    assert _teacher_digest_of(gen) == content

    manifest_before = storage.manifest_digest(teacher)
    storage.publish(storage.fetch(teacher), teacher, kind="teacher", metrics={"rerun": 1})  # same bytes
    assert storage.manifest_digest(teacher) != manifest_before and storage.content_digest(teacher) == content
    assert _teacher_digest_of(gen) == storage.content_digest(teacher)  # unchanged teacher
    assert storage.lineage(gen)[1]["ok"] is False  # integrity: the recorded manifest is gone

    changed = _art(tmp_path, str(store / "teacher-v2"), b"\7" * 127 + b"\0", kind="teacher")
    assert _teacher_digest_of(gen) != storage.content_digest(changed)

    # a child published before parents carried their content digest: the teacher's current content digest while
    # its manifest is still the recorded one, else unknown (counted as changed)
    old = _art(tmp_path, str(store / "gen-old"), b"\3" * 32, kind="distill", parents=[teacher])
    path = Path(old) / "manifest.json"
    doc = json.loads(path.read_text())
    for p in doc["parents"]:
        del p["content_sha256"]
    path.write_text(json.dumps(doc))
    assert _teacher_digest_of(old) == content
    storage.publish(storage.fetch(teacher), teacher, kind="teacher", metrics={"rerun": 2})
    assert _teacher_digest_of(old) is None
