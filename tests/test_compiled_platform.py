"""Every compiled pipeline's Kubernetes settings are valid for the KFP backend and for Kubernetes.

Two upstream contracts, neither of them our code:

* the KFP platform spec: each executor's settings parse strictly (unknown fields are errors) as kfp-kubernetes'
  ``KubernetesExecutorConfig`` protobuf, the message the KFP 2.17 driver reads;
* Kubernetes 1.32: the pod the driver builds from them (tolerations, node selector, security context, volumes,
  env from secrets and field paths, resources, deadline; the mapping of kubeflow/pipelines 2.17.0
  ``backend/src/v2/driver/k8s.go``) validates with kubernetes-validate, strictly.

Checked for the committed YAML (default platform) and for the platform files the overlays ship.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2 as kpb

from pipelines.compile import COMPILED_DIR, PIPELINES, compile_pipeline
from pipelines.platform import Platform, PlatformError

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.32.0"
PLATFORM_FILES = sorted((ROOT / "manifests" / "overlays").glob("*/platform.yaml"))


def _docs(path: Path) -> tuple[dict, dict]:
    spec, platform = list(yaml.safe_load_all(path.read_text()))
    return spec, platform


def _const(value: Any) -> Any:
    return value.get("runtimeValue", {}).get("constant") if isinstance(value, dict) else value


def _pod(name: str, cfg: dict, container: dict) -> dict:
    """The pod the KFP driver makes of one executor's settings (the fields anyflow uses)."""
    res = container.get("resources", {})
    limits, requests = {}, {}
    for field, (where, key) in {"resourceCpuLimit": (limits, "cpu"), "resourceMemoryLimit": (limits, "memory"),
                                "resourceCpuRequest": (requests, "cpu"),
                                "resourceMemoryRequest": (requests, "memory")}.items():
        if field in res:
            where[key] = res[field]
    if "accelerator" in res:
        limits[res["accelerator"]["resourceType"]] = str(res["accelerator"]["resourceCount"])
    env = [{"name": e["name"], "value": e["value"]} for e in container.get("env", [])]
    for secret in cfg.get("secretAsEnv", []):
        env += [{"name": k["envVar"], "valueFrom": {"secretKeyRef": {"name": _const(secret["secretNameParameter"]),
                                                                      "key": k["secretKey"]}}}
                for k in secret["keyToEnv"]]
    env += [{"name": f["name"], "valueFrom": {"fieldRef": {"fieldPath": f["fieldPath"]}}}
            for f in cfg.get("fieldPathAsEnv", [])]
    volumes, mounts = [], []
    for m in cfg.get("emptyDirMounts", []):
        volumes.append({"name": m["volumeName"], "emptyDir": {k: m[k] for k in ("medium", "sizeLimit") if k in m}})
        mounts.append({"name": m["volumeName"], "mountPath": m["mountPath"]})
    for i, m in enumerate(cfg.get("pvcMount", [])):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": _const(m["pvcNameParameter"])}})
        mounts.append({"name": f"pvc-{i}", "mountPath": m["mountPath"]})
    sc = cfg.get("securityContext", {})
    main = {"name": "main", "image": container["image"], "command": container.get("command", []),
            "env": env, "volumeMounts": mounts, "resources": {"limits": limits, "requests": requests},
            "securityContext": {k: (int(v) if k in ("runAsUser", "runAsGroup") else v) for k, v in sc.items()}}
    if "imagePullPolicy" in cfg:
        main["imagePullPolicy"] = cfg["imagePullPolicy"]
    spec: dict[str, Any] = {"containers": [main], "volumes": volumes, "restartPolicy": "Never"}
    if cfg.get("tolerations"):
        spec["tolerations"] = cfg["tolerations"]
    if cfg.get("nodeSelector"):
        spec["nodeSelector"] = cfg["nodeSelector"]["labels"]
    if "activeDeadlineSeconds" in cfg:
        spec["activeDeadlineSeconds"] = int(cfg["activeDeadlineSeconds"])
    meta: dict[str, Any] = {"name": name.replace("exec-", "x-")}
    if cfg.get("podMetadata", {}).get("labels"):  # the driver copies podMetadata onto the pod (k8s.go)
        meta["labels"] = cfg["podMetadata"]["labels"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def _check(spec: dict, platform: dict) -> int:
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    containers = spec["deploymentSpec"]["executors"]
    for name, cfg in executors.items():
        json_format.ParseDict(cfg, kpb.KubernetesExecutorConfig(), ignore_unknown_fields=False)
        assert name in containers, name
        kubernetes_validate.validate(_pod(name, cfg, containers[name]["container"]), K8S_VERSION, strict=True)
    return len(executors)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_committed_pipelines_are_valid_for_kfp_and_kubernetes(name: str) -> None:
    assert _check(*_docs(COMPILED_DIR / f"{name}.yaml")) >= 2


@pytest.mark.parametrize("platform_file", PLATFORM_FILES, ids=lambda p: p.parent.name)
def test_the_overlays_platform_files_compile_to_valid_settings(platform_file: Path, tmp_path: Path) -> None:
    out = compile_pipeline("anyflow-t2v", tmp_path / "p.yaml", Platform.from_yaml(platform_file),
                           image="r/anyflow-train@sha256:" + "0" * 64)
    assert _check(*_docs(out)) >= 6


def test_both_contracts_can_refuse() -> None:
    spec, platform = _docs(COMPILED_DIR / "anyflow-t2v.yaml")
    cfg = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-distill"]
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict({**cfg, "tolerationz": []}, kpb.KubernetesExecutorConfig(), ignore_unknown_fields=False)
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict({**cfg, "securityContext": {"runAsUser": "root"}}, kpb.KubernetesExecutorConfig())
    pod = _pod("exec-distill", cfg, spec["deploymentSpec"]["executors"]["exec-distill"]["container"])
    pod["spec"]["volumes"][0]["emptyDir"]["sizeLimitt"] = "1Gi"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_gke_gpu_pods_select_a_label_gke_nodes_carry(tmp_path: Path) -> None:
    # GKE labels GPU nodes cloud.google.com/gke-accelerator; nvidia.com/gpu.product exists only where the NVIDIA
    # GPU operator runs, so selecting it on plain GKE leaves the pod Pending.
    out = compile_pipeline("anyflow-t2v", tmp_path / "p.yaml",
                           Platform.from_yaml(ROOT / "manifests/overlays/gpu-cloud/platform.yaml"))
    executors = _docs(out)[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    labels = executors["exec-distill"]["nodeSelector"]["labels"]
    assert labels == {"cloud.google.com/gke-nodepool": "gpu-h100", "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert "cloud.google.com/gke-accelerator" not in executors["exec-prepare-data"]["nodeSelector"]["labels"]
    assert not any("nvidia.com/gpu.product" in e.get("nodeSelector", {}).get("labels", {}) for e in executors.values())


def test_a_kueue_queue_labels_the_gpu_pods_only(tmp_path: Path) -> None:
    """``kueue_queue`` in the platform file → label ``kueue.x-k8s.io/queue-name`` (Kueue's plain-pod integration
    reads it from the pod's metadata) on every task that asks for a GPU, none on the CPU tasks; the settings stay
    a valid KFP platform spec and valid 1.32 pods (label key and value checked by kubernetes-validate's ObjectMeta
    only as strings: there is no Kueue schema to check them against). Without the key no task has the label."""
    queued = Platform.from_dict({"kueue_queue": "gpu-team-a"})
    out = compile_pipeline("anyflow-t2v", tmp_path / "q.yaml", queued, image="r/anyflow-train@sha256:" + "0" * 64)
    spec, platform = _docs(out)
    assert _check(spec, platform) >= 6
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    containers = spec["deploymentSpec"]["executors"]
    gpu = {n for n, c in containers.items() if "accelerator" in c["container"].get("resources", {})}
    assert {"exec-train-teacher", "exec-distill", "exec-evaluate"} <= gpu
    for name, cfg in executors.items():
        labels = cfg.get("podMetadata", {}).get("labels", {})
        assert labels == ({"kueue.x-k8s.io/queue-name": "gpu-team-a"} if name in gpu else {}), name
        pod = _pod(name, cfg, containers[name]["container"])
        assert pod["metadata"].get("labels", {}) == labels
    plain = _docs(compile_pipeline("anyflow-t2v", tmp_path / "p.yaml", Platform(),
                                   image="r/anyflow-train@sha256:" + "0" * 64))[1]
    assert not any("podMetadata" in c for c in plain["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values())


@pytest.mark.parametrize("queue", ["Team_A", "a" * 64, "-gpu", 7])
def test_a_bad_kueue_queue_is_refused_naming_the_field(queue: Any) -> None:
    with pytest.raises(PlatformError, match="kueue_queue must be a LocalQueue name"):
        Platform.from_dict({"kueue_queue": queue})
