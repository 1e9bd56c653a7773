"""Multi-node stages: build a Kubeflow Trainer v2 ``TrainJob`` (or a legacy ``PyTorchJob``) that runs
``python -m anyflow.stages.<stage>`` under torchrun on every node, create it, and wait for it.

Pure functions build the objects (unit-tested against the CRD shapes); :func:`wait_for_job` polls a
``kubernetes.client.CustomObjectsApi``-compatible object, prints each condition change, and raises
:class:`TrainJobFailed` when the job fails or times out (the KFP step then fails).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class JobKind:
    """Where a job kind lives in the API and which conditions end it."""

    group: str
    version: str
    plural: str
    kind: str
    success: str
    failure: str = "Failed"


TRAINJOB = JobKind("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", success="Complete")
PYTORCHJOB = JobKind("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", success="Succeeded")
KINDS: dict[str, JobKind] = {"trainer": TRAINJOB, "pytorchjob": PYTORCHJOB}
_NAME = re.compile(r"[^a-z0-9-]+")


class TrainJobFailed(RuntimeError):
    """The training job failed, was deleted, or timed out; the message names it."""


def job_name(stage: str, suffix: str) -> str:
    """A DNS-1123 name ``anyflow-<stage>-<suffix>`` of at most 63 characters."""
    name = _NAME.sub("-", f"anyflow-{stage}-{suffix}".lower()).strip("-")
    return name[:63].rstrip("-")


def procs_per_node(gpus_per_node: int) -> int:
    """Processes torchrun starts per node: one per GPU (one on a CPU-only node)."""
    return max(int(gpus_per_node), 1)


def job_world_size(num_nodes: int, gpus_per_node: int) -> int:
    """The job's processes (torchrun's ``WORLD_SIZE`` in every worker): part of the stage's cache key."""
    return int(num_nodes) * procs_per_node(gpus_per_node)


def stage_command(stage: str, *, preset: str, overrides: Mapping[str, Any], inputs: Mapping[str, str],
                  store: str) -> list[str]:
    """``torchrun -m anyflow.stages.<stage> …``; torchrun reads nodes/rank/master from the ``PET_*``
    environment both Trainer v2 and the training operator inject."""
    cmd = ["torchrun", "-m", f"anyflow.stages.{stage}", "--preset", preset, "--store", store, "--no-progress"]
    for role, uri in sorted(inputs.items()):
        cmd += ["--in", f"{role}={uri}"]
    for key, value in sorted(overrides.items()):
        cmd += ["--set", f"{key}={value}"]
    return cmd


def s3_env(secret: str, keys: Sequence[str], endpoint: str = "", run: str = "") -> list[dict[str, Any]]:
    """Env vars of the job's workers: S3 credentials from a Kubernetes secret, the endpoint when set, and
    the launcher's KFP run (``anyflow.stages.RUN_ENV``) so a worker's bad-input marker is tagged with it and
    a retried launcher's new job stops at once."""
    from anyflow.stages import RUN_ENV

    env: list[dict[str, Any]] = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}} for key in keys
    ]
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    if run:
        env.append({"name": RUN_ENV, "value": run})
    return env


def build_trainjob(*, name: str, namespace: str, image: str, command: Sequence[str], num_nodes: int,
                   gpus_per_node: int, env: Sequence[Mapping[str, Any]] = (), runtime: str = "torch-distributed",
                   cpu: str = "16", memory: str = "128Gi", labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A ``trainer.kubeflow.org/v1alpha1`` TrainJob using a (Cluster)TrainingRuntime such as torch-distributed."""
    if num_nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"num_nodes must be >= 1 and gpus_per_node >= 0, got {num_nodes} and {gpus_per_node}.")
    resources: dict[str, Any] = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    if gpus_per_node:
        resources["limits"]["nvidia.com/gpu"] = str(gpus_per_node)
        resources["requests"]["nvidia.com/gpu"] = str(gpus_per_node)
    return {
        "apiVersion": f"{TRAINJOB.group}/{TRAINJOB.version}",
        "kind": TRAINJOB.kind,
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "anyflow", **(labels or {})}},
        "spec": {
            "runtimeRef": {"name": runtime, "apiGroup": TRAINJOB.group, "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": image,
                "command": list(command),
                "numNodes": int(num_nodes),
                "numProcPerNode": procs_per_node(gpus_per_node),
                "resourcesPerNode": resources,
                "env": [dict(e) for e in env],
            },
        },
    }


def build_pytorchjob(*, name: str, namespace: str, image: str, command: Sequence[str], num_nodes: int,
                     gpus_per_node: int, env: Sequence[Mapping[str, Any]] = (), cpu: str = "16",
                     memory: str = "128Gi", labels: Mapping[str, str] | None = None,
                     service_account: str = "anyflow-launcher") -> dict[str, Any]:
    """A legacy ``kubeflow.org/v1`` PyTorchJob (training operator v1): one Master + ``num_nodes - 1`` Workers."""
    if num_nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"num_nodes must be >= 1 and gpus_per_node >= 0, got {num_nodes} and {gpus_per_node}.")
    limits = {"cpu": cpu, "memory": memory}
    if gpus_per_node:
        limits["nvidia.com/gpu"] = str(gpus_per_node)

    def replica(count: int) -> dict[str, Any]:
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {"spec": {
                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000},
                "containers": [{
                    "name": "pytorch",  # the training operator requires this container name
                    "image": image, "command": list(command), "env": [dict(e) for e in env],
                    "resources": {"requests": dict(limits), "limits": dict(limits)},
                    "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                }],
                "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
            }},
        }

    specs = {"Master": replica(1)}
    if num_nodes > 1:
        specs["Worker"] = replica(num_nodes - 1)
    return {
        "apiVersion": f"{PYTORCHJOB.group}/{PYTORCHJOB.version}",
        "kind": PYTORCHJOB.kind,
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "anyflow", **(labels or {})}},
        "spec": {
            "nprocPerNode": str(procs_per_node(gpus_per_node)),
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 0},
            "pytorchReplicaSpecs": specs,
        },
    }


def _conditions(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list((obj.get("status") or {}).get("conditions") or [])


def wait_for_job(api: Any, kind: JobKind, name: str, namespace: str, *, timeout_s: float, poll_s: float = 30.0,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll the job until its success condition (returns the object) or failure/timeout (raises)."""
    deadline = clock() + timeout_s
    seen: set[tuple[str, str]] = set()
    while True:
        try:
            obj = api.get_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, name)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                raise TrainJobFailed(f"{kind.kind} {namespace}/{name} disappeared (deleted?) while waiting.") from None
            raise
        for cond in _conditions(obj):
            key = (str(cond.get("type")), str(cond.get("status")))
            if key not in seen:
                seen.add(key)
                log(f"[anyflow] {kind.kind} {name}: {key[0]}={key[1]} {cond.get('reason', '')} {cond.get('message', '')}".rstrip())
            if cond.get("status") == "True" and cond.get("type") == kind.failure:
                raise TrainJobFailed(
                    f"{kind.kind} {namespace}/{name} failed: {cond.get('reason', '')} {cond.get('message', '')}".rstrip()
                    + f"; see 'kubectl -n {namespace} logs -l jobset.sigs.k8s.io/jobset-name={name}'.")
            if cond.get("status") == "True" and cond.get("type") == kind.success:
                return obj
        if clock() >= deadline:
            api.delete_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, name)
            raise TrainJobFailed(f"{kind.kind} {namespace}/{name} did not finish within {timeout_s:.0f}s; deleted it.")
        sleep(poll_s)


def launch(api: Any, kind: JobKind, body: Mapping[str, Any], *, timeout_s: float, poll_s: float = 30.0,
           log: Callable[[str], None] = print, **wait_kwargs: Any) -> dict[str, Any]:
    """Create ``body`` and wait for it; returns the finished object."""
    meta = body["metadata"]
    api.create_namespaced_custom_object(kind.group, kind.version, meta["namespace"], kind.plural, dict(body))
    log(f"[anyflow] created {kind.kind} {meta['namespace']}/{meta['name']}")
    return wait_for_job(api, kind, meta["name"], meta["namespace"], timeout_s=timeout_s, poll_s=poll_s, log=log,
                        **wait_kwargs)


def in_cluster_namespace(default: str = "kubeflow") -> str:
    """The pod's own namespace (service-account mount), or ``default`` outside a cluster."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as fh:
            return fh.read().strip() or default
    except OSError:
        return default
