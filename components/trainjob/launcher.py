"""Multi-node stages: build a Kubeflow Trainer v2 ``TrainJob`` (or a legacy ``PyTorchJob``) that runs
``python -m anyflow.stages.<stage>`` under torchrun on every node, create (or adopt) it, and wait for it.

Pure functions build the objects (tested against the vendored upstream CRDs and the core Kubernetes
schema); :func:`launch` drives a ``kubernetes.client.CustomObjectsApi``-compatible object with only the
verbs the launcher's Role grants (create, get, patch, delete):

* transient API errors (429/5xx, connection resets) are retried with bounded backoff; permanent ones
  (403, 404 on create, 422, …) raise :class:`TrainJobFailed` at once, naming the job;
* the job's name is derived from the KFP run, the stage and its command, so a retried launcher pod of
  the same run gets 409 on create and *adopts* the job it (or its predecessor) started;
* the job is owned by the launcher pod (``ownerReferences``): deleting the run's pods garbage-collects it;
* SIGTERM (run cancelled, pod deleted) deletes the job and fails the step, freeing the GPUs at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

#: Downward-API env vars KFP 2.17's compiler sets on every executor container (pod name and uid):
#: kubeflow/pipelines 2.17.0 backend/src/v2/compiler/argocompiler/common.go ``commonEnvs``.
POD_NAME_ENV = "KFP_POD_NAME"
POD_UID_ENV = "KFP_POD_UID"
#: ``spec.runtimePatches[].manager`` of our TrainJob patch (Trainer validates it as a domain-prefixed path).
PATCH_MANAGER = "anyflow.github.io/trainjob-launcher"
#: Replicated job and container of the ``torch-distributed`` runtime that run the trainer
#: (kubeflow/trainer v2.3.0 manifests/base/runtimes/torch_distributed.yaml; constants.Node = "node").
TRAINER_REPLICATED_JOB = "node"
TRAINER_CONTAINER = "node"
#: The container name the training operator requires in PyTorchJob replicas.
PYTORCH_CONTAINER = "pytorch"
STAGE_LABEL = "anyflow/stage"
KEY_LABEL = "anyflow/job-key"
#: Kueue's queue label (``pipelines.platform.KUEUE_QUEUE_LABEL``): on the job, Kueue admits all its nodes at once.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
_NAME = re.compile(r"[^a-z0-9-]+")
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class JobKind:
    """Where a job kind lives in the API, which conditions end it, and how its pods are labelled."""

    group: str
    version: str
    plural: str
    kind: str
    success: str
    pod_selector: str
    failure: str = "Failed"


TRAINJOB = JobKind("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", success="Complete",
                   pod_selector="jobset.sigs.k8s.io/jobset-name")
PYTORCHJOB = JobKind("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", success="Succeeded",
                     pod_selector="training.kubeflow.org/job-name")
KINDS: dict[str, JobKind] = {"trainer": TRAINJOB, "pytorchjob": PYTORCHJOB}


class TrainJobFailed(RuntimeError):
    """The training job failed, was deleted, timed out, or the API refused a call; the message names it."""


class Cancelled(TrainJobFailed):
    """The launcher got SIGTERM (run cancelled or pod deleted) while it owned a job."""


@dataclass(frozen=True)
class Workers:
    """Placement of the job's worker pods: ``pipelines.platform.Platform.worker_settings(stage)``, which
    the pipeline passes to the launcher as JSON so workers and KFP tasks share one platform config."""

    gpu_resource: str = "nvidia.com/gpu"
    cpu_request: str = "16"
    cpu_limit: str = "16"
    memory_request: str = "128Gi"
    memory_limit: str = "128Gi"
    shm_size: str = "2Gi"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    model_cache_pvc: str = ""  # "" = an emptyDir per pod
    model_cache_path: str = "/cache/models"
    run_as_user: int = 1000
    s3_secret: str = "anyflow-s3"
    s3_secret_keys: Mapping[str, str] = field(default_factory=lambda: {
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
    s3_endpoint: str = ""
    kueue_queue: str = ""  # a Kueue LocalQueue: the job's queue label; "" = none

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Workers:
        """Strict: an unknown key means the pipeline and the launcher image disagree; say which."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"worker settings: unknown keys {sorted(unknown)}; valid: {sorted(f.name for f in fields(cls))}.")
        return cls(**data)


# ------------------------------------------------------------------------------------------ naming


def job_key(run: str, stage: str, command: Sequence[str]) -> str:
    """A digest of (KFP run, stage, worker command): equal for every launcher attempt of one task, so a
    retried attempt finds the job its predecessor created; another run or other inputs get another job."""
    return hashlib.sha256("\0".join([run, stage, *command]).encode()).hexdigest()[:32]


#: Longest job name. Trainer v2 names the JobSet after the TrainJob, and JobSet's admission webhook refuses a
#: JobSet whose longest pod name, ``<jobset>-<replicated job>-<job index>-<pod index>-<5 random>``, exceeds 63
#: characters (kubernetes-sigs/jobset ``podNameTooLongErrorMsg``); ``-node-0-999-abcde`` is 17 of them. A
#: PyTorchJob's pods are ``<name>-worker-<i>``. 40 leaves room for both, up to 1000 nodes.
MAX_JOB_NAME = 40
#: Hex digits of the (run, stage, command) key in the name (the whole key is the job's label).
_NAME_KEY = 12


def job_name(stage: str, suffix: str) -> str:
    """A DNS-1123 name ``anyflow-<stage>-<suffix[:12]>`` of at most :data:`MAX_JOB_NAME` characters."""
    suffix = _NAME.sub("-", suffix.lower()).strip("-")[:_NAME_KEY].strip("-")
    prefix = _NAME.sub("-", f"anyflow-{stage}".lower()).strip("-")[: MAX_JOB_NAME - 1 - len(suffix)].rstrip("-")
    return f"{prefix}-{suffix}"


def owner_reference(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The launcher pod as the job's owner, from the KFP downward-API env vars; None outside KFP."""
    name, uid = environ.get(POD_NAME_ENV, ""), environ.get(POD_UID_ENV, "")
    if not (name and uid):
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


# ------------------------------------------------------------------------------------------ objects


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
        # strings as given, the rest as JSON: the workers must read back the launcher's exact values (the key of
        # the artifact it waits for); str() of a list or a mapping is a Python repr that would not parse as one
        cmd += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return cmd


def worker_env(workers: Workers, run: str = "") -> list[dict[str, Any]]:
    """Env vars of the job's workers, as ``Platform.apply`` gives a KFP task: S3 credentials from the
    secret, the endpoint when set, the storage cache dir, and the launcher's KFP run
    (``anyflow.stages.RUN_ENV``) so a worker's bad-input marker is tagged with it and a retry stops at once."""
    from anyflow.stages import RUN_ENV

    env: list[dict[str, Any]] = [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": workers.s3_secret, "key": key}}}
        for key, var in sorted(workers.s3_secret_keys.items())
    ]
    if workers.s3_endpoint:
        env += [{"name": "AWS_ENDPOINT_URL", "value": workers.s3_endpoint},
                {"name": "AWS_ENDPOINT_URL_S3", "value": workers.s3_endpoint}]
    env.append({"name": "ANYFLOW_CACHE_DIR", "value": workers.model_cache_path})
    if run:
        env.append({"name": RUN_ENV, "value": run})
    return env


def resources_per_node(workers: Workers, gpus_per_node: int) -> dict[str, dict[str, str]]:
    """CPU, memory and GPUs of one worker pod (GPUs: request = limit, as extended resources require)."""
    requests = {"cpu": workers.cpu_request, "memory": workers.memory_request}
    limits = {"cpu": workers.cpu_limit, "memory": workers.memory_limit}
    if gpus_per_node:
        requests[workers.gpu_resource] = limits[workers.gpu_resource] = str(gpus_per_node)
    return {"requests": requests, "limits": limits}


def pod_settings(workers: Workers) -> dict[str, Any]:
    """Pod-level placement and hardening of a worker: tolerations, node selector, ``/dev/shm``, the model
    cache (PVC or emptyDir) and a non-root security context."""
    cache: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": workers.model_cache_pvc}} if workers.model_cache_pvc
        else {"emptyDir": {}})
    settings: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": workers.run_as_user,
                            "runAsGroup": workers.run_as_user},
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": workers.shm_size}},
                    {"name": "model-cache", **cache}],
    }
    if workers.node_selector:
        settings["nodeSelector"] = dict(sorted(workers.node_selector.items()))
    if workers.tolerations:
        settings["tolerations"] = [dict(t) for t in workers.tolerations]
    return settings


def container_settings(workers: Workers) -> dict[str, Any]:
    """Container-level parts of a worker: the volume mounts and a container security context."""
    return {
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "model-cache", "mountPath": workers.model_cache_path}],
    }


def job_labels(workers: Workers, labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """The job's labels: ``labels`` plus, with a Kueue queue, ``kueue.x-k8s.io/queue-name``. Kueue's TrainJob and
    PyTorchJob integrations read it from the job's metadata, suspend the job and admit it as one workload when the
    quota of every node is free (gang admission), so no node's GPUs sit idle waiting for the others."""
    queue = {KUEUE_QUEUE_LABEL: workers.kueue_queue} if workers.kueue_queue else {}
    return {**(labels or {}), **queue}


def _metadata(name: str, namespace: str, labels: Mapping[str, str],
              owner: Mapping[str, str] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace,
                            "labels": {"app.kubernetes.io/part-of": "anyflow", **labels}}
    if owner:
        meta["ownerReferences"] = [dict(owner)]
    return meta


def _check_size(num_nodes: int, gpus_per_node: int) -> None:
    if num_nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"num_nodes must be >= 1 and gpus_per_node >= 0, got {num_nodes} and {gpus_per_node}.")


def build_trainjob(*, name: str, namespace: str, image: str, command: Sequence[str], num_nodes: int,
                   gpus_per_node: int, workers: Workers, env: Sequence[Mapping[str, Any]] = (),
                   runtime: str = "torch-distributed", labels: Mapping[str, str] | None = None,
                   owner: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A ``trainer.kubeflow.org/v1alpha1`` TrainJob on a ClusterTrainingRuntime such as torch-distributed.

    Resources go in ``spec.trainer.resourcesPerNode``, env in ``spec.trainer.env`` (Trainer v2.3's
    validator refuses env in a runtime patch of the ``node`` container); placement, volumes and security
    context go in a ``spec.runtimePatches`` entry (new in Trainer v2.3) patching the runtime's ``node``
    replicated job, whose containers accept only name/env/securityContext/volumeMounts.
    """
    _check_size(num_nodes, gpus_per_node)
    pod = pod_settings(workers)
    pod["containers"] = [{"name": TRAINER_CONTAINER, **container_settings(workers)}]
    patch = {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": TRAINER_REPLICATED_JOB, "template": {"spec": {"template": {"spec": pod}}}}]}}}}
    return {
        "apiVersion": f"{TRAINJOB.group}/{TRAINJOB.version}",
        "kind": TRAINJOB.kind,
        "metadata": _metadata(name, namespace, job_labels(workers, labels), owner),
        "spec": {
            "runtimeRef": {"name": runtime, "apiGroup": TRAINJOB.group, "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": image,
                "command": list(command),
                "numNodes": int(num_nodes),
                "numProcPerNode": procs_per_node(gpus_per_node),
                "resourcesPerNode": resources_per_node(workers, gpus_per_node),
                "env": [dict(e) for e in env],
            },
            "runtimePatches": [patch],
        },
    }


def build_pytorchjob(*, name: str, namespace: str, image: str, command: Sequence[str], num_nodes: int,
                     gpus_per_node: int, workers: Workers, env: Sequence[Mapping[str, Any]] = (),
                     labels: Mapping[str, str] | None = None,
                     owner: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A legacy ``kubeflow.org/v1`` PyTorchJob (training operator v1): one Master + ``num_nodes - 1``
    Workers, each pod template carrying the same settings as a TrainJob's patched runtime."""
    _check_size(num_nodes, gpus_per_node)
    container = {"name": PYTORCH_CONTAINER, "image": image, "command": list(command), "env": [dict(e) for e in env],
                 "resources": resources_per_node(workers, gpus_per_node), **container_settings(workers)}

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "OnFailure",
                "template": {"spec": {**pod_settings(workers), "containers": [dict(container)]}}}

    specs = {"Master": replica(1)}
    if num_nodes > 1:
        specs["Worker"] = replica(num_nodes - 1)
    return {
        "apiVersion": f"{PYTORCHJOB.group}/{PYTORCHJOB.version}",
        "kind": PYTORCHJOB.kind,
        "metadata": _metadata(name, namespace, job_labels(workers, labels), owner),
        "spec": {
            "nprocPerNode": str(procs_per_node(gpus_per_node)),
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 0},
            "pytorchReplicaSpecs": specs,
        },
    }


# ------------------------------------------------------------------------------------------ API calls


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, an API server or proxy hiccup, or a dropped connection."""
    import urllib3.exceptions

    if getattr(exc, "status", None) in _TRANSIENT_STATUS:
        return True
    return isinstance(exc, (ConnectionError, TimeoutError, urllib3.exceptions.ProtocolError,
                            urllib3.exceptions.MaxRetryError, urllib3.exceptions.TimeoutError))


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


@dataclass
class _Job:
    """One job's API calls, each retried on transient errors with bounded exponential backoff."""

    api: Any
    kind: JobKind
    name: str
    namespace: str
    log: Callable[[str], None]
    sleep: Callable[[float], None]
    tries: int = 8  # 1+2+4+8+16+30+30 s ≈ 1.5 min of API trouble before giving up
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0

    @property
    def ref(self) -> str:
        return f"{self.kind.kind} {self.namespace}/{self.name}"

    def _call(self, verb: str, method: str, *args: Any, **kwargs: Any) -> Any:
        k = self.kind
        fn = getattr(self.api, method)
        for attempt in range(self.tries):
            try:
                return fn(k.group, k.version, self.namespace, k.plural, *args, **kwargs)
            except Exception as exc:  # classified: re-raised unless transient
                if not is_transient(exc) or attempt == self.tries - 1:
                    raise
                delay = min(self.backoff_s * 2**attempt, self.backoff_max_s)
                self.log(f"[anyflow] {verb} {self.ref}: {_describe(exc)}; retry {attempt + 1}/{self.tries - 1} "
                         f"in {delay:.0f}s")
                self.sleep(delay)
        raise AssertionError("unreachable")

    def _raise(self, verb: str, exc: Exception) -> NoReturn:
        """Re-raise an API error as :class:`TrainJobFailed` naming the job (other exceptions unchanged)."""
        if _status(exc) is None and not is_transient(exc):
            raise exc
        hint = {403: f"the launcher's service account may not {verb} {self.kind.plural}.{self.kind.group} "
                     "(manifests/: Role anyflow-launcher)",
                422: "the API server rejected the object"}.get(_status(exc) or 0, "")
        if verb == "create" and _status(exc) == 404:
            hint = (f"{self.kind.group}/{self.kind.version} {self.kind.plural} is not served: is "
                    f"{'Kubeflow Trainer >= v2.3' if self.kind is TRAINJOB else 'the training operator v1'} installed?")
        raise TrainJobFailed(f"{verb} {self.ref} failed: {_describe(exc)}" + (f"; {hint}" if hint else "")) from exc

    def create(self, body: Mapping[str, Any]) -> bool:
        """Create the job; False when it already exists (409)."""
        try:
            self._call("create", "create_namespaced_custom_object", dict(body))
        except Exception as exc:
            if _status(exc) == 409:
                return False
            self._raise("create", exc)
        return True

    def get(self) -> dict[str, Any] | None:
        """The job, or None when it does not exist."""
        try:
            return self._call("get", "get_namespaced_custom_object", self.name)
        except Exception as exc:
            if _status(exc) == 404:
                return None
            self._raise("get", exc)

    def set_owners(self, owners: Sequence[Mapping[str, str]]) -> None:
        """Replace the job's ownerReferences (a JSON merge patch replaces the whole list)."""
        try:
            self._call("patch", "patch_namespaced_custom_object", self.name,
                       {"metadata": {"ownerReferences": [dict(o) for o in owners]}})
        except Exception as exc:
            self._raise("patch", exc)

    def delete(self) -> None:
        """Delete the job and, in the background, its pods (a job already gone is fine)."""
        try:
            self._call("delete", "delete_namespaced_custom_object", self.name, propagation_policy="Background")
        except Exception as exc:
            if _status(exc) == 404:
                return
            self._raise("delete", exc)


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    reason = getattr(exc, "reason", None) or type(exc).__name__
    return f"HTTP {status} {reason}" if status else f"{reason}: {exc}"


def _conditions(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list((obj.get("status") or {}).get("conditions") or [])


def _finished(kind: JobKind, obj: Mapping[str, Any]) -> str | None:
    """``kind.success`` / ``kind.failure`` when the job has ended, else None."""
    for cond in _conditions(obj):
        if cond.get("status") == "True" and cond.get("type") in (kind.success, kind.failure):
            return str(cond["type"])
    return None


# ------------------------------------------------------------------------------------------ lifecycle


def _ensure_job(job: _Job, body: Mapping[str, Any], *, clock: Callable[[], float], poll_s: float = 5.0,
                gone_timeout_s: float = 600.0) -> None:
    """Create the job, or adopt the one an earlier attempt of this launcher created (409).

    Adopting checks the job is ours (same stage and job key labels), moves its ownerReference to this
    pod (the earlier pod may be garbage-collected), and waits on it. A job that already failed or is
    being deleted is replaced: a retry exists to run the stage again, not to re-report the old failure.
    """
    labels = body["metadata"]["labels"]
    owners = body["metadata"].get("ownerReferences")
    while True:
        if job.create(body):
            job.log(f"[anyflow] created {job.ref}" + ("" if owners else
                    f" without an ownerReference ({POD_NAME_ENV}/{POD_UID_ENV} unset: not a KFP pod)"))
            return
        existing = job.get()
        if existing is None:  # deleted between our create and get: create again
            continue
        meta = existing.get("metadata") or {}
        theirs = meta.get("labels") or {}
        if any(theirs.get(k) != labels[k] for k in (STAGE_LABEL, KEY_LABEL)):
            raise TrainJobFailed(f"{job.ref} exists but is not this launcher's job (labels {theirs}); "
                                 "delete it or rename the stage's job.")
        if meta.get("deletionTimestamp") or _finished(job.kind, existing) == job.kind.failure:
            job.log(f"[anyflow] {job.ref} from an earlier attempt failed or is being deleted; replacing it")
            job.delete()
            _wait_gone(job, poll_s=poll_s, timeout_s=gone_timeout_s, clock=clock)
            continue
        job.log(f"[anyflow] adopted {job.ref} from an earlier attempt of this run")
        if owners and meta.get("ownerReferences") != owners:
            job.set_owners(owners)
        return


def _wait_gone(job: _Job, *, poll_s: float, timeout_s: float, clock: Callable[[], float]) -> None:
    deadline = clock() + timeout_s
    while job.get() is not None:
        if clock() >= deadline:
            raise TrainJobFailed(f"{job.ref} was still being deleted after {timeout_s:.0f}s.")
        job.sleep(poll_s)


def _wait(job: _Job, *, timeout_s: float, poll_s: float, clock: Callable[[], float]) -> dict[str, Any]:
    """Poll the job until its success condition (returns the object) or failure/timeout (raises; a job
    that timed out is deleted, a failed one kept for its logs until its owner pod is collected)."""
    deadline = clock() + timeout_s
    seen: set[tuple[str, str]] = set()
    while True:
        obj = job.get()
        if obj is None:
            raise TrainJobFailed(f"{job.ref} disappeared (deleted?) while waiting.")
        for cond in _conditions(obj):
            key = (str(cond.get("type")), str(cond.get("status")))
            if key not in seen:
                seen.add(key)
                job.log(f"[anyflow] {job.kind.kind} {job.name}: {key[0]}={key[1]} {cond.get('reason', '')} "
                        f"{cond.get('message', '')}".rstrip())
        ended = _finished(job.kind, obj)
        if ended == job.kind.success:
            return obj
        if ended == job.kind.failure:
            cond = next(c for c in _conditions(obj) if c.get("type") == ended and c.get("status") == "True")
            raise TrainJobFailed(
                f"{job.ref} failed: {cond.get('reason', '')} {cond.get('message', '')}".rstrip()
                + f"; see 'kubectl -n {job.namespace} logs -l {job.kind.pod_selector}={job.name}'.")
        if clock() >= deadline:
            job.delete()
            raise TrainJobFailed(f"{job.ref} did not finish within {timeout_s:.0f}s; deleted it.")
        job.sleep(poll_s)


@contextlib.contextmanager
def _sigterm_raises(log: Callable[[str], None]) -> Iterator[None]:
    """Turn SIGTERM into :class:`Cancelled` in the main thread (kubelet's SIGTERM on pod deletion reaches
    the component: Argo's emissary forwards it to the process group of KFP's launcher and its child)."""

    def handler(signum: int, frame: Any) -> None:
        raise Cancelled("SIGTERM (run cancelled or pod deleted)")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: nothing can cancel us by signal
        log("[anyflow] not in the main thread: SIGTERM will not delete the job")
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch(api: Any, kind: JobKind, body: Mapping[str, Any], *, timeout_s: float, poll_s: float = 30.0,
           log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Create (or adopt, taking over as its owner) ``body`` and wait for it; returns the finished object.
    On SIGTERM the job is deleted and :class:`Cancelled` raised (the step fails, the GPUs are freed)."""
    meta = body["metadata"]
    job = _Job(api, kind, meta["name"], meta["namespace"], log=log, sleep=sleep)
    with _sigterm_raises(log):
        try:
            _ensure_job(job, body, clock=clock)
            return _wait(job, timeout_s=timeout_s, poll_s=poll_s, clock=clock)
        except Cancelled:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the delete
            log(f"[anyflow] SIGTERM: deleting {job.ref}")
            job.delete()
            raise


def in_cluster_namespace(default: str = "kubeflow") -> str:
    """The pod's own namespace (service-account mount), or ``default`` outside a cluster."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as fh:
            return fh.read().strip() or default
    except OSError:
        return default
