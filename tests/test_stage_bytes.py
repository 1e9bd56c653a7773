"""What a stage moves through the store (issue 18, benchmarks/bench_bytes.py): no training checkpoint after the
final step and none left once the artifact is published; a checkpoint input fetches only the files its reader
uses; a parent's manifest is read once when publishing; the evaluate report is not read back from the store.

Requests are observed from outside the storage layer: the S3 tests route it through ``tests/s3server.py``'s
proxy in front of the moto server and read the proxy's request log.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from anyflow import storage


@pytest.fixture
def proxied(s3_server) -> Iterator[object]:
    """anyflow.storage talks to moto through a logging proxy (tests/s3server.py FaultProxy)."""
    from s3server import FaultProxy

    p = FaultProxy(s3_server.endpoint)
    storage.configure(s3_endpoint=p.endpoint)
    try:
        yield p
    finally:
        storage.configure(s3_endpoint=None)
        p.close()


def test_training_stage_checkpoints_below_the_last_step_and_deletes_them_once_published(
    tiny_chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """steps=5, checkpoint_every=2: checkpoints at steps 2 and 4 only (the old code also wrote one at 5), and the
    stage's checkpoint folder is gone after it publishes (the old code kept the last one)."""
    from anyflow.stages import run_stage

    published: list[int] = []
    publish = storage.publish

    def spy(local_dir, url, **kw):  # type: ignore[no-untyped-def]
        if kw.get("kind") == "train-state":
            published.append(kw["extra"]["step"])
        return publish(local_dir, url, **kw)

    monkeypatch.setattr(storage, "publish", spy)
    store = tmp_path / "store"
    ov = {"teacher.train.steps": 5, "teacher.train.checkpoint_every": 2}
    res = run_stage(
        "train_teacher",
        store=str(store),
        overrides=ov,
        inputs={"dataset": tiny_chain["dataset"].uri},
        progress=False,
    )
    assert published == [2, 4]
    assert res.metrics["steps"] == 5
    log = [json.loads(x) for x in (Path(res.uri) / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 5  # the artifact holds the last step
    key = Path(res.uri).name
    assert not (store / "checkpoints" / "train_teacher" / key).exists()
    again = run_stage(
        "train_teacher",
        store=str(store),
        overrides=ov,
        inputs={"dataset": tiny_chain["dataset"].uri},
        progress=False,
    )
    assert again.cached and again.uri == res.uri  # the cache does not need them


def test_a_failed_checkpoint_cleanup_does_not_fail_a_published_stage(
    tiny_chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Deleting the checkpoints comes after the publish: when it fails (S3 gave up, a delete was denied) the stage
    still returns its complete artifact, with one warning naming the prefix left behind (review finding: the
    stage used to fail after publishing)."""
    from anyflow.stages import run_stage

    delete = storage.delete

    def denied(urls):  # type: ignore[no-untyped-def]
        if any("/checkpoints/" in str(u) for u in urls):
            raise storage.StorageError("AccessDenied on DeleteObject")
        return delete(urls)

    monkeypatch.setattr(storage, "delete", denied)
    store = tmp_path / "store"
    ov = {"teacher.train.steps": 3, "teacher.train.checkpoint_every": 2}
    res = run_stage("train_teacher", store=str(store), overrides=ov,
                    inputs={"dataset": tiny_chain["dataset"].uri}, progress=False)
    assert not res.cached and storage.verify(res.uri) is not None
    left = store / "checkpoints" / "train_teacher" / Path(res.uri).name
    err = capsys.readouterr().err
    assert "could not delete its training checkpoints" in err and str(left) in err and "AccessDenied" in err
    assert left.exists()  # what the warning names is really there
    monkeypatch.setattr(storage, "delete", delete)  # the store is reachable again: the next cache hit cleans up
    again = run_stage("train_teacher", store=str(store), overrides=ov,
                      inputs={"dataset": tiny_chain["dataset"].uri}, progress=False)
    assert again.cached and again.uri == res.uri and not left.exists()


def _checkpoint(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A distill-like checkpoint folder: generator + critic adapters, model.json, log.jsonl, config.json."""
    from anyflow.config import get_preset

    m = get_preset("tiny").model
    g = torch.Generator().manual_seed(0)
    tensors = {name: {"w": torch.randn(4, 4, generator=g)} for name in ("generator", "critic")}
    (root / "adapters").mkdir(parents=True)
    for name, t in tensors.items():
        save_file(t, str(root / "adapters" / f"{name}.safetensors"))
    meta = {
        "kind": "generator",
        "variant": "bidirectional",
        "base": m.base,
        "lora": {"rank": m.lora_rank, "alpha": m.lora_alpha},
        "adapters": {n: {"role": n, "file": f"adapters/{n}.safetensors"} for n in tensors},
    }
    (root / "model.json").write_text(json.dumps(meta))
    (root / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    return tensors


def _gets(proxy, contains: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [path.split("?")[0] for method, path, _ in proxy.requests("GET", contains)]


def test_a_checkpoint_input_fetches_only_the_files_read(
    proxied, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anyflow.config import get_preset
    from anyflow.stages.common import read_checkpoint

    monkeypatch.setenv("ANYFLOW_CACHE_DIR", str(tmp_path / "cache"))
    tensors = _checkpoint(tmp_path / "ck")
    url = storage.join(s3_prefix, "ck")
    storage.publish(tmp_path / "ck", url, kind="generator")
    proxied.clear()
    ck = read_checkpoint(url, get_preset("tiny"), role="generator", need=("generator",))
    got = sorted({p.rsplit("/", 1)[1] for p in _gets(proxied, "/ck/")})
    assert got == ["generator.safetensors", "manifest.json", "model.json"], got  # no critic, log or config
    assert len(_gets(proxied, "/ck/manifest.json")) == 1  # one manifest read for the whole checkpoint
    assert torch.equal(ck.adapters["generator"]["w"], tensors["generator"]["w"]) and ck.log_path is None
    proxied.clear()  # evaluate also reads the loss log (log=True)
    monkeypatch.setenv("ANYFLOW_CACHE_DIR", str(tmp_path / "cache2"))
    ck = read_checkpoint(url, get_preset("tiny"), role="generator", need=("generator",), log=True)
    got = sorted({p.rsplit("/", 1)[1] for p in _gets(proxied, "/ck/")})
    assert got == ["generator.safetensors", "log.jsonl", "manifest.json", "model.json"], got
    assert len(_gets(proxied, "/ck/manifest.json")) == 1
    assert ck.log_path is not None and json.loads(ck.log_path.read_text())["loss"] == 0.5


def test_publish_reads_each_parent_manifest_once(proxied, s3_prefix: str, tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.txt").write_text("a")
    parent = storage.join(s3_prefix, "parent")
    storage.publish(tmp_path / "p", parent, kind="dataset")
    proxied.clear()
    m = storage.publish(tmp_path / "p", storage.join(s3_prefix, "child"), kind="x", parents=[parent])
    assert _gets(proxied, "/parent/manifest.json") and len(_gets(proxied, "/parent/manifest.json")) == 1
    assert m["parents"][0]["kind"] == "dataset"


def test_the_evaluate_report_is_written_once_and_not_read_back(
    s3_server, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_stage hands back the report it wrote; the component shows those bytes: with the stored report deleted
    behind its back (a plain boto3 client), copy_report still writes the page (the old code read it from S3)."""
    import anyflow.stages as stages
    from components._io import copy_report

    page = "<html><body>report of a fake evaluate</body></html>"

    def run(cfg, inputs, out_dir, *, ckpt_url=None, progress=True):  # type: ignore[no-untyped-def]
        (out_dir / "report.html").write_text(page)
        return {"x": 1.0}

    fake = types.SimpleNamespace(
        KIND="evaluation", INPUTS=(), OPTIONAL=(), SECTIONS=("model",), REPORT="report.html", run=run
    )
    real = stages.stage_module
    monkeypatch.setattr(stages, "stage_module", lambda name: fake if name == "evaluate" else real(name))
    res = stages.run_stage("evaluate", store=s3_prefix, progress=False)
    assert res.report_bytes == page.encode()
    client = s3_server.client()
    bucket, key = res.report.split("://", 1)[1].split("/", 1)
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == page.encode()  # published as written
    client.delete_object(Bucket=bucket, Key=key)
    html = types.SimpleNamespace(path=str(tmp_path / "kfp" / "report.html"))
    copy_report(html, res.report, res.uri, res.report_bytes)
    assert Path(html.path).read_text() == page


def test_the_benchmark_counter_counts_request_and_response_bodies(
    s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/bench_bytes.py's counter against sizes known here: a 1000-byte PUT and its GET, classed by key."""
    from anyflow import _storage_s3
    from benchmarks.bench_bytes import ByteCounter, install

    monkeypatch.setattr(
        _storage_s3, "client", _storage_s3.client
    )  # install() replaces both: put them back after
    monkeypatch.setattr(storage, "fs_and_path", storage.fs_and_path)
    counter = ByteCounter()
    install(counter)
    url = storage.join(s3_prefix, "a", "blob.bin")
    storage.write_bytes(url, bytes(1000))
    assert storage.read_bytes(url) == bytes(1000)
    storage.delete([url])
    rows = [(r["op"], r["url"], r["sent"], r["received"]) for r in counter.rows]
    assert ("PutObject", url, 1000, 0) in rows and ("GetObject", url, 0, 1000) in rows, rows
    assert [r[1] for r in rows if r[0] == "DeleteObjects"] == [
        url
    ]  # a delete is classed by the key it deletes
