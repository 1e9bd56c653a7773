"""Component specs (typed I/O, a docstring per parameter, pinned image), the shared I/O helpers on real
KFP artifact objects, and a component body calling the real stage (the multi-node launcher:
tests/test_trainjob_launcher.py).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from kfp import dsl

import components
from components._io import (
    flatten_metrics,
    input_uri,
    log_metrics,
    parse_overrides,
    record_output,
    stage_inputs,
    stored_uri,
)

EXPECTED_IO = {
    "prepare_data": ({}, {"dataset": "system.Dataset", "metrics": "system.Metrics"}),
    "train_teacher": ({"dataset": "system.Dataset"}, {"teacher": "system.Model", "metrics": "system.Metrics"}),
    "train_flowmap": ({"dataset": "system.Dataset"}, {"flowmap": "system.Model", "metrics": "system.Metrics"}),
    "distill": ({"dataset": "system.Dataset", "teacher": "system.Model", "flowmap": "system.Model"},
                {"generator": "system.Model", "metrics": "system.Metrics"}),
    "finetune": ({"dataset": "system.Dataset", "generator": "system.Model"},
                 {"finetuned": "system.Model", "metrics": "system.Metrics"}),
    "evaluate": ({"generator": "system.Model", "teacher": "system.Model", "dataset": "system.Dataset",
                  "flowmap": "system.Model"},
                 {"report": "system.Artifact", "metrics": "system.Metrics", "html": "system.HTML"}),
}


TRAINING = ("train_teacher", "train_flowmap", "distill", "finetune")


@pytest.mark.parametrize("stage", sorted(EXPECTED_IO))
def test_component_interface(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANYFLOW_IMAGE", "registry.example/anyflow-train:v0.1.0-abc1234")
    monkeypatch.delenv("ANYFLOW_EVAL_IMAGE", raising=False)
    comp = components.build_components()[stage]
    spec = comp.component_spec
    ins, outs = EXPECTED_IO[stage]
    got_in = {k: v.type for k, v in (spec.inputs or {}).items() if v.type.startswith("system.")}
    got_out = {k: v.type for k, v in (spec.outputs or {}).items()}
    assert {k: t.split("@")[0] for k, t in got_in.items()} == ins
    assert {k: t.split("@")[0] for k, t in got_out.items()} == outs
    # every input artifact is optional: a rerun passes its store URL as the <role>_uri string instead
    assert all(spec.inputs[k].optional for k in ins), {k: spec.inputs[k].optional for k in ins}
    params = {k: v for k, v in spec.inputs.items() if not v.type.startswith("system.")}
    # no run id / record name: a stage task's KFP cache key is the same in every run (record_stage records)
    expected = {"preset": ("String", "tiny"), "overrides_json": ("String", "{}"), "store": ("String", "")}
    expected.update({f"{role}_uri": ("String", "") for role in ins})
    if stage == "prepare_data":  # the finetune branch's own data overrides, over the common ones; the
        expected["extra_overrides_json"] = ("String", "{}")  # source listing's digest (a KFP cache key input)
        expected["source_fingerprint"] = ("String", "")
        expected["merge_only"] = ("Boolean", False)  # Platform.prepare_fanout's CPU merge task sets it
    if stage in TRAINING:  # one process per GPU of the pod, set at compile time from the platform
        expected["nproc_per_node"] = ("Integer", 1)
    assert {k: (v.type, v.default) for k, v in params.items()} == expected
    for name, io in {**spec.inputs, **spec.outputs}.items():
        assert io.description, f"{stage}: parameter {name!r} has no docstring entry"
    container = spec.implementation.container
    repo = "anyflow-eval" if stage == "evaluate" else "anyflow-train"  # evaluate: train image + VBench venv
    assert container.image == f"registry.example/{repo}:v0.1.0-abc1234"
    assert "pip install" not in " ".join(container.command)
    src = inspect.getsource(components.stage_functions()[stage])
    # thin: one call of the shared body (components._io.run_component: inputs, run_stage, record), no maths
    assert f'run_component("{stage}"' in src and "run_stage" not in src
    assert "import torch" not in src and "from torch" not in src


def test_record_stage_component_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANYFLOW_IMAGE", "registry.example/anyflow-train:v0.1.0-abc1234")
    spec = components.build_record_component().component_spec
    assert {k: v.type.split("@")[0] for k, v in spec.inputs.items()} == {
        "artifact": "system.Artifact", "store": "String", "run_id": "String", "entry": "String"}
    assert not spec.outputs and all(v.description for v in spec.inputs.values())
    assert spec.implementation.container.image == "registry.example/anyflow-train:v0.1.0-abc1234"
    from components.record_stage.component import record_stage

    src = inspect.getsource(record_stage)
    assert "write_run_record" in src and "run_stage" not in src  # records, never recomputes


def test_stage_output_metadata_carries_what_the_record_needs(tmp_path: Path) -> None:
    class Result:
        uri, cached = "s3://b/artifacts/distill/k", True

    out = dsl.Model(uri=str(tmp_path / "kfp" / "generator"))
    record_output(out, Result(), "s3://b", "distill", inputs={"dataset": "s3://b/d", "teacher": "s3://b/t"})
    assert out.metadata == {"anyflow_uri": Result.uri, "anyflow_cached": True, "anyflow_stage": "distill",
                            "anyflow_inputs": {"dataset": "s3://b/d", "teacher": "s3://b/t"}}
    assert json.loads(Path(out.path).read_text())["anyflow_uri"] == Result.uri  # pointer file
    assert stored_uri(out) == Result.uri
    assert stored_uri(dsl.Model(uri=str(tmp_path / "kfp" / "direct"))) is None  # written into KFP: no store URL


def test_mutable_images_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("ghcr.io/anyflow/anyflow-train", "ghcr.io/anyflow/anyflow-train:latest", "localhost:5000/x"):
        with pytest.raises(ValueError, match="immutable tag"):
            components.check_image(bad)
    assert components.check_image("r/x@sha256:" + "a" * 64)
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    assert components.default_image() == components.IMAGE_PLACEHOLDER  # never a tag nobody pushed


def test_input_uri_resolution_order(tmp_path: Path) -> None:
    direct = dsl.Model(uri=str(tmp_path / "direct"))
    assert input_uri(direct) == direct.path  # artifact written into the KFP output itself
    pointer = tmp_path / "pointer"
    pointer.write_text(json.dumps({"anyflow_uri": "s3://b/artifacts/distill/k"}))
    assert input_uri(dsl.Model(uri=str(pointer))) == "s3://b/artifacts/distill/k"
    meta = dsl.Model(uri=str(pointer), metadata={"anyflow_uri": "s3://b/artifacts/distill/other"})
    assert input_uri(meta) == "s3://b/artifacts/distill/other"  # metadata wins
    assert input_uri(meta, "s3://b/artifacts/distill/given") == "s3://b/artifacts/distill/given"  # a <role>_uri wins
    assert input_uri(None, "s3://b/x") == "s3://b/x"
    # per role: the string, else the artifact; a role with neither is left out (run_stage names it)
    got = stage_inputs({"dataset": meta, "teacher": None, "flowmap": None},
                       {"dataset": "", "teacher": "s3://b/t", "flowmap": ""})
    assert got == {"dataset": "s3://b/artifacts/distill/other", "teacher": "s3://b/t"}


def test_overrides_and_metrics_helpers() -> None:
    assert parse_overrides("") == {} and parse_overrides('{"a.b": 2}') == {"a.b": 2}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_overrides("{a: 1}")
    with pytest.raises(ValueError, match="JSON object"):
        parse_overrides("[1]")
    nested = {"generator": {"nfe1": {"psnr": 30.5, "ok": True}, "nfe4": {"psnr": 33}}, "loss": float("nan"), "n": "x"}
    assert flatten_metrics(nested) == {"generator/nfe1/psnr": 30.5, "generator/nfe4/psnr": 33.0}
    out = dsl.Metrics(uri="/tmp/unused-metrics")
    log_metrics(out, nested)
    assert out.metadata == {"generator/nfe1/psnr": 30.5, "generator/nfe4/psnr": 33.0}


def test_prepare_data_component_body_runs_stage_and_reuses_store(tmp_path: Path) -> None:
    """The component's own Python function (what the KFP executor calls) on real artifacts."""
    from anyflow import storage

    func = components.stage_functions()["prepare_data"]
    store = str(tmp_path / "store")
    first = dsl.Dataset(uri=str(tmp_path / "kfp" / "dataset1"))
    metrics = dsl.Metrics(uri=str(tmp_path / "kfp" / "metrics1"))
    func(dataset=first, metrics=metrics, preset="tiny", overrides_json="{}", store=store)
    uri = first.metadata["anyflow_uri"]
    assert uri.startswith(store + "/artifacts/prepare_data/") and first.metadata["anyflow_cached"] is False
    summary = storage.verify(uri)["metrics"]
    # the KFP UI's metrics are the dataset's summary as the manifest records it (tiny: procedural n=16)
    assert metrics.metadata["clips_written"] == summary["clips_written"] == 16.0
    assert metrics.metadata["num_shards"] == summary["num_shards"] >= 1 and metrics.metadata["clips_per_s"] > 0
    assert json.loads(Path(first.path).read_text())["anyflow_uri"] == uri  # pointer file
    second = dsl.Dataset(uri=str(tmp_path / "kfp" / "dataset2"))
    func(dataset=second, metrics=dsl.Metrics(uri=str(tmp_path / "kfp" / "metrics2")), preset="tiny",
         overrides_json="{}", store=store)
    assert second.metadata["anyflow_uri"] == uri and second.metadata["anyflow_cached"] is True


def _report_artifact(url: str, tmp_path: Path, html: str, files: dict[str, bytes]) -> str:
    """Publish an evaluate-like artifact (report.html + files beside it) at ``url``; returns the report's URL."""
    from anyflow import storage

    src = tmp_path / "report-src"
    (src / "samples").mkdir(parents=True)
    (src / "report.html").write_text(html, encoding="utf-8")
    for name, data in files.items():
        (src / name).write_bytes(data)
    storage.publish(src, url, kind="evaluation")
    return storage.file_url(url, "report.html")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_kfp_html_artifact_is_the_whole_report_with_its_files_inlined(where: str, tmp_path: Path,
                                                                      request: pytest.FixtureRequest) -> None:
    """The evaluate task's HTML artifact is the report itself (also when the artifact is on S3), with a file it
    links beside it turned into a data: URI of exactly that file's bytes; never a page linking elsewhere."""
    import base64

    from components._io import copy_report

    url = (request.getfixturevalue("s3_prefix") + "/artifacts/evaluate/k") if where == "s3" else str(tmp_path / "a")
    gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\x00\x00\x00\x00\x00!\xf9\x04\x00\x00\x00\x00\x00,\x00\x00\x00\x00"
    page = ('<html><body><h1>AnyFlow evaluation</h1><img src="data:image/png;base64,AAAA">'
            '<img src="samples/nfe1.gif" alt="x"><a href="#metrics">metrics</a></body></html>')
    report = _report_artifact(url, tmp_path, page, {"samples/nfe1.gif": gif})
    out = dsl.HTML(uri=str(tmp_path / "kfp" / "html"))
    copy_report(out, report, url)
    text = Path(out.path).read_text(encoding="utf-8")
    want = '<img src="data:image/gif;base64,' + base64.b64encode(gif).decode("ascii") + '" alt="x">'
    assert want in text and "samples/nfe1.gif" not in text
    assert '<h1>AnyFlow evaluation</h1>' in text and 'src="data:image/png;base64,AAAA"' in text
    assert 'href="#metrics"' in text  # in-page anchors stay


def test_kfp_html_artifact_refuses_a_report_it_cannot_show(tmp_path: Path) -> None:
    """No placeholder page: a missing report, or one linking a file only the writer's machine has, fails the
    task naming it."""
    from components._io import copy_report

    out = dsl.HTML(uri=str(tmp_path / "kfp" / "html"))
    with pytest.raises(FileNotFoundError, match=r"report\.html of the evaluate artifact"):
        copy_report(out, str(tmp_path / "nowhere" / "report.html"), str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"names no report\.html"):
        copy_report(out, None, "s3://b/artifacts/evaluate/k")
    url = str(tmp_path / "abs")
    report = _report_artifact(url, tmp_path, '<img src="/home/me/anyflow-runs/x.gif">', {})
    with pytest.raises(ValueError, match="only resolves on the machine that wrote it"):
        copy_report(out, report, url)
