"""The multi-node launcher (components/trainjob): the TrainJob / PyTorchJob objects it builds, checked
against the vendored upstream CRDs (Trainer v2.3.0, training operator v1.9.4; tests/helpers/crd.py) and,
for their pod parts, the core Kubernetes 1.32 schema; and its lifecycle (retries, adoption, ownership,
SIGTERM) against an in-process fake of ``CustomObjectsApi`` (tests/helpers/fake_k8s.py), because no API
server runs in CI. Behaviour only a real cluster shows is cited to upstream source in the README.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers import crd
from helpers.fake_k8s import FakeClock, FakeCustomObjects, api_error, connection_reset, max_retries

import components
from components.trainjob import launcher
from pipelines.platform import Platform

K8S_VERSION = "1.32.0"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # k8s.io/apimachinery IsDNS1123Label, <= 63
RUNTIME = crd.CONTRACTS / "trainer-v2.3.0" / "runtime-torch_distributed.yaml"
OWNER_ENV = {"KFP_POD_NAME": "anyflow-t2v-abc12-system-container-impl-123", "KFP_POD_UID": "0f1e2d3c-aaaa-bbbb"}


def _workers(platform: Platform | None = None, stage: str = "distill") -> launcher.Workers:
    # through JSON, as the pipeline hands them to the launcher task
    return launcher.Workers.from_dict(json.loads(json.dumps((platform or Platform()).worker_settings(stage))))


def _job_args(workers: launcher.Workers | None = None, **kw) -> dict:
    cmd = launcher.stage_command("distill", preset="wan2.1-t2v-14b", overrides={"distill.train.steps": 10},
                                 inputs={"teacher": "s3://b/t", "dataset": "s3://b/d"}, store="s3://b/store")
    key = launcher.job_key("anyflow-t2v-abc12", "distill", cmd)
    workers = workers or _workers()
    args = dict(name=launcher.job_name("distill", "ab12cd34"), namespace="anyflow", image="r/anyflow-train:v0.1.0-abc",
                command=cmd, num_nodes=4, gpus_per_node=8, workers=workers,
                env=launcher.worker_env(workers, run="anyflow-t2v-abc12"),
                labels={launcher.STAGE_LABEL: "distill", launcher.KEY_LABEL: key})
    return {**args, **kw}


def _validate_core(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _pod(spec: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "worker"}, "spec": spec}


# ------------------------------------------------------------------------------------ objects


def test_trainjob_object_matches_crd_shape() -> None:
    body = launcher.build_trainjob(**_job_args())
    crd.validate(body)
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
    bad = copy.deepcopy(body)
    bad["spec"]["trainer"]["numNodes"] = "4"
    with pytest.raises(jsonschema.ValidationError):
        crd.validate(bad)


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
    crd.validate(body)
    specs = body["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
    container = specs["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert specs["Master"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "Worker" not in launcher.build_pytorchjob(**{**_job_args(), "num_nodes": 1})["spec"]["pytorchReplicaSpecs"]


PLATFORMS = {
    # cloud default: 8 x H100 per node, GPU taint tolerated, product node selector, model-cache PVC
    "gpu-pvc": Platform.from_dict({"model_cache_pvc": "anyflow-model-cache", "stages": {"distill": {
        "gpus": 8, "gpu_product": "NVIDIA-H100-80GB-HBM3",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}}),
    # kind/minikube: no GPUs, no tolerations, emptyDir cache, MinIO endpoint
    "cpu-emptydir": Platform.local(),
    "pool-selectors": Platform.from_dict({
        "model_cache_pvc": "", "run_as_user": 2000, "s3_endpoint": "https://s3.internal:9000",
        "stages": {"distill": {"node_selector": {"pool": "a100", "zone": "eu-1"}, "gpu_product": "",
                               "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "train",
                                                "effect": "NoExecute"}, {"key": "spot"}]}}}),
}


def _trainer_pod(body: dict) -> dict:
    """The worker pod Trainer v2.3 derives from a TrainJob: the runtime's ``node`` container with the
    trainer fields (image, command, env, resourcesPerNode), strategic-merged with our runtime patch."""
    patch = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    spec = copy.deepcopy(patch["template"]["spec"]["template"]["spec"])
    trainer = body["spec"]["trainer"]
    (container,) = spec["containers"]
    container.update(image=trainer["image"], command=trainer["command"], env=trainer["env"],
                     resources=trainer["resourcesPerNode"])
    return spec


@pytest.mark.parametrize("variant", sorted(PLATFORMS))
@pytest.mark.parametrize("kind", ["trainer", "pytorchjob"])
def test_workers_get_the_platform_and_validate_upstream(variant: str, kind: str) -> None:
    plat = PLATFORMS[variant]
    res = plat.for_stage("distill")
    gpus = 8 if variant == "gpu-pvc" else 0
    args = _job_args(_workers(plat), gpus_per_node=gpus, owner=launcher.owner_reference(OWNER_ENV))
    body = launcher.build_trainjob(**args) if kind == "trainer" else launcher.build_pytorchjob(**args)
    crd.validate(body)
    if kind == "trainer":
        pods = [_trainer_pod(body)]
    else:
        pods = [r["template"]["spec"] for r in body["spec"]["pytorchReplicaSpecs"].values()]
    for spec in pods:
        _validate_core(_pod(spec))
        (container,) = spec["containers"]
        # the settings Platform.apply gives a KFP task, now on every worker
        want_tolerations = {
            "gpu-pvc": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "cpu-emptydir": None,
            "pool-selectors": [{"key": "dedicated", "operator": "Equal", "value": "train", "effect": "NoExecute"},
                               {"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
        }[variant]
        assert spec.get("tolerations") == want_tolerations
        assert spec.get("nodeSelector") == {
            "gpu-pvc": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "cpu-emptydir": None,
            "pool-selectors": {"pool": "a100", "zone": "eu-1"}}[variant]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": res.shm_size}
        cache = {"gpu-pvc": {"persistentVolumeClaim": {"claimName": "anyflow-model-cache"}}}.get(variant, {"emptyDir": {}})
        assert {k: v for k, v in volumes["model-cache"].items() if k != "name"} == cache
        assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]} == {
            "/dev/shm": "dshm", plat.model_cache_path: "model-cache"}
        assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": plat.run_as_user,
                                           "runAsGroup": plat.run_as_user}
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        env = {e["name"]: e for e in container["env"]}
        assert env["ANYFLOW_CACHE_DIR"]["value"] == plat.model_cache_path
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": plat.s3_secret,
                                                                             "key": "AWS_SECRET_ACCESS_KEY"}
        assert ("AWS_ENDPOINT_URL" in env) == bool(plat.s3_endpoint)
        want = {"cpu": res.cpu_request, "memory": res.memory_request, **({"nvidia.com/gpu": "8"} if gpus else {})}
        assert container["resources"]["requests"] == want
        assert container["resources"]["limits"]["memory"] == res.memory_limit


def test_the_runtime_patch_targets_the_torch_distributed_node_container() -> None:
    """Trainer v2.3's TrainJob validator (pkg/runtime/framework/plugins/jobset/jobset.go, Validate) refuses a
    patch naming a replicated job or container the runtime lacks, env on the ``node`` container, and a
    manager that is not a domain-prefixed path; the CRD lets only name/env/securityContext/volumeMounts
    into a patched container."""
    runtime = yaml.safe_load(RUNTIME.read_text())
    crd.validate(runtime)
    containers = {rj["name"]: {c["name"] for c in rj["template"]["spec"]["template"]["spec"]["containers"]}
                  for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    body = launcher.build_trainjob(**_job_args())
    (patch,) = body["spec"]["runtimePatches"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9/._~%!$&'()*+,;=:-]+", patch["manager"])
    for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
        assert rj["name"] in containers
        for c in rj["template"]["spec"]["template"]["spec"]["containers"]:
            assert c["name"] in containers[rj["name"]] and "env" not in c
    bad = copy.deepcopy(body)
    patched = bad["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    patched["template"]["spec"]["template"]["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "1"}}
    with pytest.raises(jsonschema.ValidationError):  # resources belong in spec.trainer.resourcesPerNode
        crd.validate(bad)


def test_the_pipeline_hands_the_stage_platform_to_the_launcher(tmp_path: Path) -> None:
    from kfp import compiler

    from pipelines.anyflow_t2v import build_t2v_pipeline

    plat = Platform.from_dict({"model_cache_pvc": "anyflow-model-cache", "stages": {"distill": {
        "num_nodes": 2, "gpus": 8, "gpu_product": "NVIDIA-H100-80GB-HBM3", "cpu_request": "64",
        "node_selector": {"pool": "h100"}, "tolerations": [{"key": "nvidia.com/gpu"}]}}})
    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(build_t2v_pipeline(plat, image="r/anyflow-train:v0.1.0-abc"), str(out))
    spec = next(yaml.safe_load_all(out.read_text()))
    params = spec["root"]["dag"]["tasks"]["trainjob"]["inputs"]["parameters"]
    sent = json.loads(params["workers_json"]["runtimeValue"]["constant"])
    assert sent["node_selector"] == {"pool": "h100", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert sent["cpu_request"] == "64" and sent["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert launcher.Workers.from_dict(sent).model_cache_pvc == "anyflow-model-cache"
    with pytest.raises(ValueError, match="unknown keys"):
        launcher.Workers.from_dict({**sent, "gpus": 8})


@pytest.mark.parametrize("kind", ["trainer", "pytorchjob"])
def test_a_kueue_queue_labels_the_job_and_it_still_validates(kind: str) -> None:
    """Kueue's job integrations take the LocalQueue from the job's ``kueue.x-k8s.io/queue-name`` label (Kueue docs,
    "Run A TrainJob": metadata.labels) and admit the whole job as one workload. There is no Kueue CRD here to
    check against: the label is the whole interface. The object must still pass the vendored Trainer / training
    operator CRDs (the TrainJob CRD names Kueue only in ``managedBy`` and ``runtimePatches[].manager``, which
    Kueue itself sets)."""
    build = launcher.build_trainjob if kind == "trainer" else launcher.build_pytorchjob
    queued = Platform.from_dict({"kueue_queue": "gpu-team-a"})
    body = build(**_job_args(_workers(queued)))
    crd.validate(body)
    labels = body["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-team-a"
    assert labels[launcher.STAGE_LABEL] == "distill"  # the launcher's own labels (adoption) are kept
    plain = build(**_job_args(_workers(Platform())))
    crd.validate(plain)
    assert not any(k.startswith("kueue.x-k8s.io/") for k in plain["metadata"]["labels"])
    # an unqueued platform hands the launcher exactly the parameter it did before the queue existed
    assert "kueue_queue" not in Platform().worker_settings("distill")


def test_the_pipeline_hands_the_queue_to_the_launcher_not_to_the_launcher_pod(tmp_path: Path) -> None:
    from kfp import compiler

    from pipelines.anyflow_t2v import build_t2v_pipeline

    plat = Platform.from_dict({"kueue_queue": "gpu-team-a", "stages": {"distill": {"num_nodes": 2, "gpus": 8}}})
    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(build_t2v_pipeline(plat, image="r/anyflow-train:v0.1.0-abc"), str(out))
    spec, platform_spec = list(yaml.safe_load_all(out.read_text()))
    params = spec["root"]["dag"]["tasks"]["trainjob"]["inputs"]["parameters"]
    assert launcher.Workers.from_dict(json.loads(params["workers_json"]["runtimeValue"]["constant"])).kueue_queue \
        == "gpu-team-a"
    # the launcher pod holds no GPU: queued behind its own job's quota it could never start the job
    executors = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "podMetadata" not in executors["exec-trainjob"]


# ------------------------------------------------------------------------------------ names, owner


def test_job_names_are_deterministic_per_run_and_stage() -> None:
    cmd = ["torchrun", "-m", "anyflow.stages.train_teacher"]
    key = launcher.job_key("anyflow-t2v-x7k2p", "train_teacher", cmd)
    assert key == launcher.job_key("anyflow-t2v-x7k2p", "train_teacher", list(cmd))  # a retried attempt
    assert key != launcher.job_key("anyflow-t2v-other", "train_teacher", cmd)  # another run
    assert key != launcher.job_key("anyflow-t2v-x7k2p", "train_flowmap", cmd)
    long_stage = "train_" + "very_long_stage_name_" * 5
    for stage in ("distill", "train_teacher", long_stage):
        name = launcher.job_name(stage, launcher.job_key("r", stage, cmd))
        assert len(name) <= launcher.MAX_JOB_NAME and DNS1123_LABEL.match(name), name
        assert name.endswith(launcher.job_key("r", stage, cmd)[:12])  # the key's head survives truncation
    assert len(key) <= 63 and DNS1123_LABEL.match(key)  # also a valid label value


def test_owner_reference_comes_from_the_kfp_downward_api_env() -> None:
    owner = launcher.owner_reference(OWNER_ENV)
    assert owner == {"apiVersion": "v1", "kind": "Pod", "name": OWNER_ENV["KFP_POD_NAME"],
                     "uid": OWNER_ENV["KFP_POD_UID"]}
    body = launcher.build_trainjob(**_job_args(owner=owner))
    # an ObjectMeta.ownerReferences entry, as the core schema defines it
    _validate_core({"apiVersion": "v1", "kind": "ConfigMap", "metadata": body["metadata"]})
    api = FakeCustomObjects([[_cond("Complete")]])
    launcher.launch(api, launcher.TRAINJOB, body, timeout_s=60, poll_s=1, log=lambda s: None,
                    sleep=lambda s: None)
    assert api.only()["metadata"]["ownerReferences"] == [owner]
    assert launcher.owner_reference({}) is None and launcher.owner_reference({"KFP_POD_NAME": "p"}) is None
    logs: list[str] = []
    plain = launcher.build_trainjob(**_job_args())
    assert "ownerReferences" not in plain["metadata"]
    launcher.launch(FakeCustomObjects([[_cond("Complete")]]), launcher.TRAINJOB, plain, timeout_s=60, poll_s=1,
                    log=logs.append, sleep=lambda s: None)
    assert any("without an ownerReference" in line for line in logs)


# ------------------------------------------------------------------------------------ lifecycle


def test_fake_api_matches_kubernetes_client_signatures() -> None:
    from kubernetes.client import CustomObjectsApi

    for verb in ("create", "get", "patch", "delete"):
        meth = f"{verb}_namespaced_custom_object"
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
    with pytest.raises(launcher.TrainJobFailed, match="failed: BackoffLimitExceeded rank 3 OOM") as err:
        launcher.launch(api, launcher.PYTORCHJOB, body, timeout_s=100, poll_s=1, log=lambda s: None, sleep=lambda s: None)
    assert "training.kubeflow.org/job-name=" in str(err.value)  # the training operator's pod label


def test_wait_times_out_and_deletes_the_job() -> None:
    clock = FakeClock()
    api = FakeCustomObjects([[_cond("Running")]] * 100)
    body = launcher.build_trainjob(**_job_args())
    with pytest.raises(launcher.TrainJobFailed, match="did not finish within 60s"):
        launcher.launch(api, launcher.TRAINJOB, body, timeout_s=60, poll_s=25, log=lambda s: None,
                        clock=clock, sleep=clock.sleep)
    assert api.deleted == [(body["metadata"]["name"], "Background")]


def test_transient_errors_during_create_and_polling_end_in_success() -> None:
    clock = FakeClock()
    api = FakeCustomObjects(
        [[_cond("Running")], [_cond("Complete")]],
        faults={"create": [api_error(503, "Service Unavailable"), connection_reset()],
                "get": [api_error(429, "Too Many Requests"), max_retries(), api_error(502, "Bad Gateway"),
                        connection_reset(), api_error(504, "Gateway Timeout"), api_error(500, "Internal")]})
    body = launcher.build_trainjob(**_job_args())
    obj = launcher.launch(api, launcher.TRAINJOB, body, timeout_s=3600, poll_s=30, log=lambda s: None,
                          clock=clock, sleep=clock.sleep)
    assert obj["status"]["conditions"][-1]["type"] == "Complete"
    assert [v for v, _ in api.calls].count("create") == 3 and len(api.objects) == 1 and not api.deleted
    assert max(clock.sleeps) <= 30  # bounded backoff


def test_a_create_whose_response_was_lost_adopts_the_job_it_made() -> None:
    api = FakeCustomObjects([[_cond("Complete")]], faults={"create": [(connection_reset(), "after")]})
    body = launcher.build_trainjob(**_job_args())
    launcher.launch(api, launcher.TRAINJOB, body, timeout_s=60, poll_s=1, log=lambda s: None, sleep=lambda s: None)
    assert [v for v, _ in api.calls][:3] == ["create", "create", "get"] and len(api.objects) == 1


def test_transient_errors_are_retried_a_bounded_number_of_times() -> None:
    clock = FakeClock()
    api = FakeCustomObjects(faults={"get": [api_error(503, "Service Unavailable")] * 100})
    body = launcher.build_trainjob(**_job_args())
    with pytest.raises(launcher.TrainJobFailed, match=f"get TrainJob anyflow/{body['metadata']['name']} failed: HTTP 503"):
        launcher.launch(api, launcher.TRAINJOB, body, timeout_s=3600, poll_s=30, log=lambda s: None,
                        clock=clock, sleep=clock.sleep)
    assert 0 < sum(clock.sleeps) <= 180


@pytest.mark.parametrize(("status", "reason", "hint"), [
    (403, "Forbidden", "service account may not create"),
    (404, "NotFound", "Kubeflow Trainer >= v2.3"),
    (422, "Unprocessable Entity", "rejected the object"),
])
def test_permanent_errors_fail_at_once_naming_the_job(status: int, reason: str, hint: str) -> None:
    clock = FakeClock()
    api = FakeCustomObjects(faults={"create": [api_error(status, reason)]})
    body = launcher.build_trainjob(**_job_args())
    with pytest.raises(launcher.TrainJobFailed, match=f"create TrainJob anyflow/{body['metadata']['name']} failed: "
                                                      f"HTTP {status}") as err:
        launcher.launch(api, launcher.TRAINJOB, body, timeout_s=60, poll_s=1, log=lambda s: None,
                        clock=clock, sleep=clock.sleep)
    assert hint in str(err.value) and api.calls == [("create", body["metadata"]["name"])] and not clock.sleeps


class PodKilled(BaseException):
    """The first launcher pod dies mid-wait (node drained): nothing of it runs on."""


def test_a_retried_launcher_adopts_the_job_and_takes_ownership() -> None:
    first, second = ({"KFP_POD_NAME": f"pod-{i}", "KFP_POD_UID": f"uid-pod-{i}"} for i in (1, 2))
    api = FakeCustomObjects([[_cond("Running")], [_cond("Running")], [_cond("Complete")]])
    body1 = launcher.build_trainjob(**_job_args(owner=launcher.owner_reference(first)))

    def die(n: int) -> None:
        raise PodKilled

    clock = FakeClock(on_sleep=die)
    with pytest.raises(PodKilled):
        launcher.launch(api, launcher.TRAINJOB, body1, timeout_s=600, poll_s=30,
                        log=lambda s: None, clock=clock, sleep=clock.sleep)
    owner2 = launcher.owner_reference(second)
    body2 = launcher.build_trainjob(**_job_args(owner=owner2))  # the same run: the same name and key
    logs: list[str] = []
    obj = launcher.launch(api, launcher.TRAINJOB, body2, timeout_s=600, poll_s=30, log=logs.append,
                          sleep=lambda s: None)
    assert obj["status"]["conditions"][-1]["type"] == "Complete"
    assert [v for v, _ in api.calls].count("create") == 2 and len(api.objects) == 1  # no second job
    assert api.only()["metadata"]["ownerReferences"] == [owner2]
    assert any("adopted" in line for line in logs) and not api.deleted


def test_adoption_replaces_a_failed_job_and_refuses_a_foreign_one() -> None:
    body = launcher.build_trainjob(**_job_args())
    api = FakeCustomObjects([[_cond("Failed", reason="PodFailed")], [_cond("Complete")]])
    api.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "anyflow", "trainjobs", copy.deepcopy(body))
    launcher.launch(api, launcher.TRAINJOB, body, timeout_s=60, poll_s=1, log=lambda s: None, sleep=lambda s: None)
    assert api.deleted == [(body["metadata"]["name"], "Background")] and api.only()["metadata"]["uid"] == "uid-2"

    foreign = copy.deepcopy(body)
    foreign["metadata"]["labels"][launcher.KEY_LABEL] = "someone-else"
    api = FakeCustomObjects()
    api.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "anyflow", "trainjobs", foreign)
    with pytest.raises(launcher.TrainJobFailed, match="is not this launcher's job"):
        launcher.launch(api, launcher.TRAINJOB, body, timeout_s=60, poll_s=1, log=lambda s: None, sleep=lambda s: None)
    assert not api.deleted


def test_sigterm_during_the_wait_deletes_the_job() -> None:
    before = signal.getsignal(signal.SIGTERM)

    def cancel(n: int) -> None:
        if n == 2:
            signal.raise_signal(signal.SIGTERM)  # a real signal, as kubelet sends on pod deletion

    clock = FakeClock(on_sleep=cancel)
    api = FakeCustomObjects([[_cond("Running")]] * 10)
    body = launcher.build_trainjob(**_job_args())
    with pytest.raises(launcher.Cancelled, match="SIGTERM"):
        launcher.launch(api, launcher.TRAINJOB, body, timeout_s=600, poll_s=30, log=lambda s: None,
                        clock=clock, sleep=clock.sleep)
    assert api.deleted == [(body["metadata"]["name"], "Background")] and not api.objects
    assert signal.getsignal(signal.SIGTERM) == before


_SIGTERM_SCRIPT = """
import sys, time
from helpers.fake_k8s import FakeCustomObjects
from components.trainjob import launcher
from pipelines.platform import Platform
w = launcher.Workers.from_dict(Platform().worker_settings("distill"))
body = launcher.build_trainjob(name="anyflow-distill-x", namespace="ns", image="i:v1", command=["torchrun"],
                               num_nodes=2, gpus_per_node=8, workers=w,
                               labels={launcher.STAGE_LABEL: "distill", launcher.KEY_LABEL: "k"})
api = FakeCustomObjects([[{"type": "Running", "status": "True"}]] * 10000)
def log(line):
    print(line, flush=True)
try:
    launcher.launch(api, launcher.TRAINJOB, body, timeout_s=600, poll_s=0.05, log=log)
finally:
    print("deleted", api.deleted, flush=True)
"""


def test_sigterm_to_the_launcher_process_deletes_the_job_and_exits_nonzero() -> None:
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the job exists and is being polled
        if "Running=True" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "deleted [('anyflow-distill-x', 'Background')]" in out and "Cancelled" in out


def test_trainjob_component_interface() -> None:
    from components.trainjob.component import trainjob

    comp = components.make_component(trainjob, "r/anyflow-train:v0.1.0-abc")
    spec = comp.component_spec
    assert {k for k, v in spec.inputs.items() if v.type.startswith("system.")} == {"dataset", "teacher", "flowmap", "generator"}
    assert all(spec.inputs[k].optional for k in ("dataset", "teacher", "flowmap", "generator"))
    assert set(spec.outputs) == {"result"}
    assert all(v.description for v in spec.inputs.values())
    assert not {"run_id", "record_as"} & set(spec.inputs)  # cacheable; a record_stage task records its result
    assert "namespace" not in spec.inputs  # the job goes into the launcher pod's namespace (its owner's)


# ------------------------------------------------------------- the component body: launch once, collect, never compute


class _JobThatPublishes(FakeCustomObjects):
    """The fake API where creating the job stands for its workers: ``work()`` runs when the job is created
    (publishing into the store, or not), and the job then completes."""

    def __init__(self, work) -> None:
        super().__init__(statuses=[[{"type": "Created", "status": "True"}]] + [[{"type": "Complete", "status": "True"}]] * 8)
        self.work = work

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        out = super().create_namespaced_custom_object(group, version, namespace, plural, body, **kwargs)
        self.work(body)
        return out


def _run_component(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: FakeCustomObjects, dataset: str,
                   store: str):
    import kubernetes
    from kfp import dsl

    from components.trainjob.component import trainjob

    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", lambda: api)
    monkeypatch.setenv("ANYFLOW_KFP_RUN", "anyflow-t2v-abc12")
    result = dsl.Model(uri=str(tmp_path / "kfp" / "result"))
    art = dsl.Dataset(uri=str(tmp_path / "kfp" / "ds"), metadata={"anyflow_uri": dataset})
    trainjob(stage="train_teacher", store=store, image="r/anyflow-train:v0-abc", result=result, dataset=art,
             overrides_json=json.dumps({"teacher.train.steps": 1}), num_nodes=2, gpus_per_node=0,
             workers_json=json.dumps(Platform.local().worker_settings("train_teacher")), poll_s=0)
    return result


def test_the_component_launches_once_and_returns_what_the_job_published(tmp_path: Path, monkeypatch) -> None:
    from anyflow.stages import prelaunch_check, run_stage

    store = str(tmp_path / "store")
    dataset = run_stage("prepare_data", store=store, progress=False).uri
    check = dict(preset="tiny", overrides={"teacher.train.steps": 1}, inputs={"dataset": dataset}, store=store)

    def workers(body) -> None:  # the job's 2 processes publish under the 2-process key (simulated in-process)
        assert body["spec"]["trainer"]["numNodes"] == 2
        run_stage("train_teacher", progress=False, world_size=2, **check)

    api = _JobThatPublishes(workers)
    result = _run_component(tmp_path, monkeypatch, api, dataset, store)
    published = prelaunch_check("train_teacher", world_size=2, **check)
    assert published and result.metadata["anyflow_uri"] == published
    assert result.metadata["anyflow_cached"] is False  # a job ran for it
    assert [verb for verb, _ in api.calls].count("create") == 1

    again = _JobThatPublishes(lambda body: pytest.fail("a cached stage must not launch a job"))
    result = _run_component(tmp_path, monkeypatch, again, dataset, store)
    assert result.metadata["anyflow_uri"] == published and result.metadata["anyflow_cached"] is True
    assert not again.calls


def test_a_job_that_publishes_nothing_fails_the_component(tmp_path: Path, monkeypatch) -> None:
    from anyflow.stages import run_stage

    store = str(tmp_path / "store")
    dataset = run_stage("prepare_data", store=store, progress=False).uri
    api = _JobThatPublishes(lambda body: None)
    with pytest.raises(RuntimeError, match=r"train_teacher: the trainer job anyflow-train-teacher-\S+ .*published no "
                                           r"artifact.*WORLD_SIZE=2"):
        _run_component(tmp_path, monkeypatch, api, dataset, store)
    assert not any(Path(store, "artifacts", "train_teacher").glob("*/manifest.json"))  # never computed here


@pytest.mark.parametrize("stage", ["train_teacher", "train_flowmap", "distill", "finetune"])
def test_job_names_leave_jobset_room_for_its_pod_names(stage: str) -> None:
    # Trainer v2 names the JobSet after the TrainJob; JobSet's webhook refuses one whose longest pod name,
    # <jobset>-<replicated job>-<job index>-<pod index>-<5 random>, exceeds 63 characters (kubernetes-sigs/jobset
    # podNameTooLongErrorMsg). The replicated job of the vendored torch-distributed runtime is "node".
    runtime = yaml.safe_load(RUNTIME.read_text())
    (rjob,) = [j["name"] for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]]
    name = launcher.job_name(stage, launcher.job_key("anyflow-t2v-abcde", stage, ["torchrun", "-m", stage]))
    for nodes in (2, 16, 1000):
        assert len(f"{name}-{rjob}-0-{nodes - 1}-abcde") <= 63, (name, nodes)  # a TrainJob's pods
        assert len(f"{name}-worker-{nodes - 2}") <= 63, (name, nodes)  # a PyTorchJob's pods
    assert launcher.job_name(stage, "b" * 32) != launcher.job_name(stage, "c" * 32)  # the key still tells jobs apart


def test_workers_read_back_the_launchers_exact_overrides() -> None:
    # The launcher waits for the artifact under the key of *its* config; the workers rebuild the config from the
    # command line. A tuple or list override must survive that (str() gave "(1, 2)", which does not parse).
    from anyflow.config import apply_overrides, get_preset, parse_override_args, to_dict

    overrides = {"evaluate.nfes": (1, 2), "distill.train.steps": 3, "data.source": "procedural:n=4,seed=1",
                 "data.strict": True, "distill.train.ema_decay": 0.99}
    cmd = launcher.stage_command("distill", preset="tiny", overrides=overrides, inputs={}, store="s3://bkt/p")
    items = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]
    preset = get_preset("tiny")
    assert to_dict(apply_overrides(preset, parse_override_args(items))) == to_dict(apply_overrides(preset, overrides))
