"""Component specs (typed I/O, a docstring per parameter, pinned image), the shared I/O helpers on real
KFP artifact objects, a component body calling the real stage, and the multi-node TrainJob launcher.

The launcher's wait loop runs against an in-process fake of ``CustomObjectsApi`` because no Kubernetes
API server can run on this machine (no kind/minikube/docker); the fake's method signatures are checked
against the real ``kubernetes.client.CustomObjectsApi`` so the calls we make are calls the client has.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import jsonschema
import pytest
from kfp import dsl

import components
from components._io import flatten_metrics, input_uri, log_metrics, parse_overrides, record_output, stored_uri
from components.trainjob import launcher

EXPECTED_IO = {
    "prepare_data": ({}, {"dataset": "system.Dataset"}),
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
    params = {k: v for k, v in spec.inputs.items() if not v.type.startswith("system.")}
    # no run id / record name: a stage task's KFP cache key is the same in every run (record_stage records)
    expected = {"preset": ("String", "tiny"), "overrides_json": ("String", "{}"), "store": ("String", "")}
    if stage == "prepare_data":  # the finetune branch's own data overrides, over the common ones
        expected["extra_overrides_json"] = ("String", "{}")
    assert {k: (v.type, v.default) for k, v in params.items()} == expected
    for name, io in {**spec.inputs, **spec.outputs}.items():
        assert io.description, f"{stage}: parameter {name!r} has no docstring entry"
    container = spec.implementation.container
    repo = "anyflow-eval" if stage == "evaluate" else "anyflow-train"  # evaluate: train image + VBench venv
    assert container.image == f"registry.example/{repo}:v0.1.0-abc1234"
    assert "pip install" not in " ".join(container.command)
    src = inspect.getsource(components.stage_functions()[stage])
    assert f'run_stage("{stage}"' in src and "torch" not in src  # thin: calls the stage, no maths


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
    func(dataset=first, preset="tiny", overrides_json="{}", store=store)
    uri = first.metadata["anyflow_uri"]
    assert uri.startswith(store + "/artifacts/prepare_data/") and first.metadata["anyflow_cached"] is False
    storage.verify(uri)
    assert json.loads(Path(first.path).read_text())["anyflow_uri"] == uri  # pointer file
    second = dsl.Dataset(uri=str(tmp_path / "kfp" / "dataset2"))
    func(dataset=second, preset="tiny", overrides_json="{}", store=store)
    assert second.metadata["anyflow_uri"] == uri and second.metadata["anyflow_cached"] is True


# ---------------------------------------------------------------------------------------- TrainJob
# Reduced schemas written from the CRDs (kubeflow/trainer manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml
# and kubeflow.org_pytorchjobs.yaml): the fields we set, their types, required keys, no unknown keys.
_ENV = {"type": "array", "items": {"type": "object", "required": ["name"],
                                   "properties": {"name": {"type": "string"}, "value": {"type": "string"},
                                                  "valueFrom": {"type": "object"}}, "additionalProperties": False}}
_RES = {"type": "object", "properties": {"limits": {"type": "object", "additionalProperties": {"type": "string"}},
                                         "requests": {"type": "object", "additionalProperties": {"type": "string"}}},
        "additionalProperties": False}
_META = {"type": "object", "required": ["name", "namespace"],
         "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}}}
TRAINJOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "trainer.kubeflow.org/v1alpha1"}, "kind": {"const": "TrainJob"}, "metadata": _META,
        "spec": {"type": "object", "required": ["runtimeRef"], "additionalProperties": False, "properties": {
            "runtimeRef": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
                "name": {"type": "string"}, "apiGroup": {"type": "string"},
                "kind": {"enum": ["ClusterTrainingRuntime", "TrainingRuntime"]}}},
            "trainer": {"type": "object", "additionalProperties": False, "properties": {
                "image": {"type": "string"}, "command": {"type": "array", "items": {"type": "string"}},
                "args": {"type": "array", "items": {"type": "string"}}, "env": _ENV,
                "numNodes": {"type": "integer", "minimum": 1}, "resourcesPerNode": _RES,
                "numProcPerNode": {"type": ["integer", "string"]}}},
            "labels": {"type": "object"}, "annotations": {"type": "object"}, "suspend": {"type": "boolean"}}},
    },
}
_REPLICA = {"type": "object", "required": ["template"], "properties": {
    "replicas": {"type": "integer", "minimum": 1}, "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
    "template": {"type": "object", "properties": {"spec": {"type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "image"]}}}}}}}}
PYTORCHJOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"}, "kind": {"const": "PyTorchJob"}, "metadata": _META,
        "spec": {"type": "object", "required": ["pytorchReplicaSpecs"], "properties": {
            "nprocPerNode": {"type": "string"}, "runPolicy": {"type": "object"},
            "pytorchReplicaSpecs": {"type": "object", "additionalProperties": False,
                                    "properties": {"Master": _REPLICA, "Worker": _REPLICA}}}}},
}


def _job_args() -> dict:
    cmd = launcher.stage_command("distill", preset="wan2.1-t2v-14b", overrides={"distill.train.steps": 10},
                                 inputs={"teacher": "s3://b/t", "dataset": "s3://b/d"}, store="s3://b/store")
    return dict(name=launcher.job_name("distill", "ab12cd34"), namespace="anyflow", image="r/anyflow-train:v0.1.0-abc",
                command=cmd, num_nodes=4, gpus_per_node=8,
                env=launcher.s3_env("anyflow-s3", ["AWS_ACCESS_KEY_ID"], run="anyflow-t2v-abc12"))


def test_trainjob_object_matches_crd_shape() -> None:
    body = launcher.build_trainjob(**_job_args())
    jsonschema.validate(body, TRAINJOB_SCHEMA)
    trainer = body["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert trainer["command"][:3] == ["torchrun", "-m", "anyflow.stages.distill"]
    assert trainer["command"][3:] == ["--preset", "wan2.1-t2v-14b", "--store", "s3://b/store", "--no-progress",
                                      "--in", "dataset=s3://b/d", "--in", "teacher=s3://b/t",
                                      "--set", "distill.train.steps=10"]
    assert trainer["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "anyflow-s3", "key": "AWS_ACCESS_KEY_ID"}
    # the workers tag a bad-input failure with the launcher's KFP run (issue 9: its retry stops at once)
    assert {"name": "ANYFLOW_KFP_RUN", "value": "anyflow-t2v-abc12"} in trainer["env"]
    assert body["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                          "kind": "ClusterTrainingRuntime"}
    bad = json.loads(json.dumps(body))
    bad["spec"]["trainer"]["numNodes"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, TRAINJOB_SCHEMA)


def test_the_launchers_key_size_is_the_jobs_process_count() -> None:
    # The launcher keys the stage with job_world_size; the workers key it with torchrun's WORLD_SIZE =
    # nodes x processes per node as written into the job objects. They must agree, or the launcher misses.
    for nodes, gpus in ((4, 8), (2, 0), (1, 1)):
        args = {**_job_args(), "num_nodes": nodes, "gpus_per_node": gpus}
        tj = launcher.build_trainjob(**args)["spec"]["trainer"]
        pj = launcher.build_pytorchjob(**args)["spec"]
        replicas = sum(r["replicas"] for r in pj["pytorchReplicaSpecs"].values())
        assert tj["numNodes"] * tj["numProcPerNode"] == launcher.job_world_size(nodes, gpus)
        assert replicas * int(pj["nprocPerNode"]) == launcher.job_world_size(nodes, gpus)
    assert launcher.job_world_size(4, 8) == 32 and launcher.job_world_size(2, 0) == 2


def test_pytorchjob_object_matches_crd_shape() -> None:
    body = launcher.build_pytorchjob(**_job_args())
    jsonschema.validate(body, PYTORCHJOB_SCHEMA)
    specs = body["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
    container = specs["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert specs["Master"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "Worker" not in launcher.build_pytorchjob(**{**_job_args(), "num_nodes": 1})["spec"]["pytorchReplicaSpecs"]


class FakeCustomObjects:
    """In-process stand-in for CustomObjectsApi: stores objects and replays a list of status updates."""

    def __init__(self, statuses: list[list[dict]]) -> None:
        self.objects: dict[tuple, dict] = {}
        self.statuses = statuses
        self.deleted: list[str] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        self.objects[(group, version, namespace, plural, body["metadata"]["name"])] = body
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        obj = self.objects[(group, version, namespace, plural, name)]
        if self.statuses:
            obj["status"] = {"conditions": self.statuses.pop(0)}
        return obj

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.deleted.append(name)
        return {}


def test_fake_api_matches_kubernetes_client_signatures() -> None:
    from kubernetes.client import CustomObjectsApi

    for meth in ("create_namespaced_custom_object", "get_namespaced_custom_object", "delete_namespaced_custom_object"):
        real = list(inspect.signature(getattr(CustomObjectsApi, meth)).parameters)
        fake = list(inspect.signature(getattr(FakeCustomObjects, meth)).parameters)
        assert fake[: len(real) - 1] == real[:-1], meth  # same positional parameters, then **kwargs


def _cond(kind: str, status: str = "True", reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": message}


def test_wait_succeeds_and_streams_conditions() -> None:
    api = FakeCustomObjects([[], [_cond("Created")], [_cond("Created"), _cond("Complete", reason="JobsCompleted")]])
    logs: list[str] = []
    body = launcher.build_trainjob(**_job_args())
    obj = launcher.launch(api, launcher.TRAINJOB, body, timeout_s=100, poll_s=1, log=logs.append, sleep=lambda s: None)
    assert obj["status"]["conditions"][-1]["type"] == "Complete"
    assert sum("Created=True" in line for line in logs) == 1 and any("Complete=True" in line for line in logs)
    assert not api.deleted


def test_wait_fails_the_step_when_the_job_fails() -> None:
    api = FakeCustomObjects([[_cond("Running")], [_cond("Failed", reason="BackoffLimitExceeded", message="rank 3 OOM")]])
    body = launcher.build_pytorchjob(**_job_args())
    with pytest.raises(launcher.TrainJobFailed, match="failed: BackoffLimitExceeded rank 3 OOM"):
        launcher.launch(api, launcher.PYTORCHJOB, body, timeout_s=100, poll_s=1, log=lambda s: None, sleep=lambda s: None)


def test_wait_times_out_and_deletes_the_job() -> None:
    now = [0.0]
    api = FakeCustomObjects([[_cond("Running")]] * 100)
    body = launcher.build_trainjob(**_job_args())

    def sleep(s: float) -> None:
        now[0] += s

    with pytest.raises(launcher.TrainJobFailed, match="did not finish within 60s"):
        launcher.launch(api, launcher.TRAINJOB, body, timeout_s=60, poll_s=25, log=lambda s: None,
                        clock=lambda: now[0], sleep=sleep)
    assert api.deleted == [body["metadata"]["name"]]


def test_trainjob_component_interface() -> None:
    from components.trainjob.component import trainjob

    comp = components.make_component(trainjob, "r/anyflow-train:v0.1.0-abc")
    spec = comp.component_spec
    assert {k for k, v in spec.inputs.items() if v.type.startswith("system.")} == {"dataset", "teacher", "flowmap", "generator"}
    assert all(spec.inputs[k].optional for k in ("dataset", "teacher", "flowmap", "generator"))
    assert set(spec.outputs) == {"result"}
    assert all(v.description for v in spec.inputs.values())
    assert not {"run_id", "record_as"} & set(spec.inputs)  # cacheable; a record_stage task records its result
