"""The platform layer, in one place: a frozen ``Platform`` config → kfp-kubernetes task settings.

Everything cluster-specific (GPU count and type, CPU/memory, node pools, tolerations, S3
credentials, model cache, ``/dev/shm``, retries, timeouts, pull policy, caching) lives here and is
applied to a pipeline task by :meth:`Platform.apply`. Pipelines never call kfp-kubernetes directly.
Defaults describe a typical cloud GPU pool (NVIDIA GPU operator labels and taints).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anyflow.stages import RUN_ENV

#: Secret key → environment variable, for ``use_secret_as_env`` (keys of manifests' S3 secret).
DEFAULT_S3_SECRET_KEYS: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
#: Platform profile of the ``record_stage`` tasks (``stages.record_stage:`` in a platform YAML).
RECORD_PROFILE = "record_stage"
#: Platform profile of the optional ``export`` task (``stages.export:`` in a platform YAML).
EXPORT_PROFILE = "export"
#: Platform profile of the partition merge task of a fanned-out prepare_data (``Platform.prepare_fanout``;
#: ``stages.prepare_merge:`` in a platform YAML).
MERGE_PROFILE = "prepare_merge"
#: Where Kubernetes takes the pod env anyflow.stages.RUN_ENV (the KFP run of a stage attempt) from:
#: Argo labels every pod of a workflow (= one KFP run) with its name.
RUN_FIELD_PATH = "metadata.labels['workflows.argoproj.io/workflow']"
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
#: The label that hands a workload to a Kueue LocalQueue of its namespace (Kueue's job and pod integrations).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: A Kubernetes label value that is also a LocalQueue (object) name: a DNS-1123 label, at most 63 characters.
_QUEUE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class PlatformError(ValueError):
    """A platform YAML value is wrong; the message names the field and what to do."""


@dataclass(frozen=True)
class Toleration:
    """A Kubernetes toleration (``operator`` Exists ignores ``value``)."""

    key: str
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = "NoSchedule"


@dataclass(frozen=True)
class StageResources:
    """What one stage's pod asks for."""

    gpus: int = 0  # per node
    num_nodes: int = 1  # > 1: the pipeline launches the stage as a TrainJob/PyTorchJob (components/trainjob)
    gpu_resource: str = "nvidia.com/gpu"
    gpu_product: str = ""  # node-selector value for ``gpu_product_label``; "" = any GPU
    gpu_product_label: str = "nvidia.com/gpu.product"
    cpu_request: str = "2"
    cpu_limit: str = "4"
    memory_request: str = "8Gi"
    memory_limit: str = "16Gi"
    shm_size: str = "2Gi"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    timeout_s: int = 6 * 3600
    retries: int = 1
    backoff: str = "60s"
    backoff_factor: float = 2.0
    backoff_max: str = "1h"


def _gpu_pool(gpus: int, timeout_s: int, cpu: str, memory: str, shm: str) -> StageResources:
    return StageResources(
        # No GPU-type selector by default: the label differs per cluster (the NVIDIA GPU operator's
        # nvidia.com/gpu.product, GKE's cloud.google.com/gke-accelerator, ...) and a selector no node carries
        # leaves the pod Pending forever; the GPU request alone lands it on a GPU node. Platform files name
        # the type with the cluster's own label (manifests/overlays/gpu-cloud/platform.yaml: GKE).
        gpus=gpus, cpu_request=cpu, cpu_limit=cpu,
        memory_request=memory, memory_limit=memory, shm_size=shm,
        tolerations=(Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),),
        timeout_s=timeout_s, retries=2,
    )


def _default_stages() -> dict[str, StageResources]:
    return {
        "prepare_data": StageResources(gpus=0, cpu_request="4", cpu_limit="8", memory_request="16Gi",
                                       memory_limit="32Gi", timeout_s=4 * 3600, retries=2),
        "train_teacher": _gpu_pool(8, 48 * 3600, "64", "512Gi", "64Gi"),
        "train_flowmap": _gpu_pool(8, 48 * 3600, "64", "512Gi", "64Gi"),
        "distill": _gpu_pool(8, 72 * 3600, "64", "512Gi", "64Gi"),
        "finetune": _gpu_pool(8, 24 * 3600, "64", "512Gi", "64Gi"),
        "evaluate": _gpu_pool(1, 6 * 3600, "8", "64Gi", "16Gi"),
        "trainjob": StageResources(gpus=0, cpu_request="250m", cpu_limit="1", memory_request="512Mi",
                                   memory_limit="1Gi", timeout_s=96 * 3600, retries=0),
        # the optional export step (components/export): CPU only; merging the LoRA copies the transformer once
        # (a 14B model in bf16: 2 x 28 GB, plus the text encoder)
        EXPORT_PROFILE: StageResources(gpus=0, cpu_request="4", cpu_limit="8", memory_request="96Gi",
                                       memory_limit="160Gi", timeout_s=6 * 3600, retries=2),
        # the merge after a fanned-out prepare_data (prepare_fanout: true): CPU only; per partition it reads the
        # manifest, lists the objects (sizes only: anyflow.data.partitions.cached_partition) and reads index.json,
        # then writes one index over them (a 10^5-clip dataset: ~7 MB of index)
        MERGE_PROFILE: StageResources(gpus=0, cpu_request="500m", cpu_limit="2", memory_request="2Gi",
                                      memory_limit="8Gi", shm_size="64Mi", timeout_s=2 * 3600, retries=2),
        # the record task after every stage task (pipelines/records.py): CPU only, reads one manifest
        RECORD_PROFILE: StageResources(gpus=0, cpu_request="100m", cpu_limit="500m", memory_request="256Mi",
                                       memory_limit="1Gi", shm_size="64Mi", timeout_s=1800, retries=2,
                                       backoff="10s", backoff_max="5m"),
    }


@dataclass(frozen=True)
class Platform:
    """Cluster settings for every stage; see ``pipelines/README.md`` for the YAML form."""

    stages: Mapping[str, StageResources] = field(default_factory=_default_stages)
    s3_secret: str = "anyflow-s3"
    s3_secret_keys: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_S3_SECRET_KEYS))
    s3_endpoint: str = ""  # "" = the cloud provider's default endpoint
    model_cache_pvc: str = "anyflow-model-cache"  # "" = an emptyDir per pod
    model_cache_path: str = "/cache/models"
    image_pull_policy: str = "IfNotPresent"
    caching: bool = True
    run_as_user: int = 1000
    trainjob_api: str = "trainer"  # "trainer" (Kubeflow Trainer v2 TrainJob) or "pytorchjob" (training operator v1)
    trainjob_runtime: str = "torch-distributed"  # ClusterTrainingRuntime for TrainJobs
    # Kueue LocalQueue (in the pipeline's namespace) for the GPU stages' pods and the multi-node jobs; "" = no Kueue
    kueue_queue: str = ""
    # partitioned prepare_data (data.partition_size > 0): at most this many prepare_partition pods at a time (the
    # ParallelFor's parallelism, fixed at compile time; each pod has the prepare_data settings)
    partition_parallelism: int = 8
    # True: prepare_data always fans out (docs/interfaces.md "Fan-out on KFP"): the ParallelFor's
    # prepare_partition pods (the prepare_data profile: give it the GPU) encode, and the task after the loop only
    # merges, on the CPU-only prepare_merge profile; every run then needs data.partition_size > 0 and a store (the
    # source_fingerprint task says so before any pod starts). False: prepare_data encodes an unpartitioned source
    # itself and merges a partitioned one, in its own (prepare_data) pod.
    prepare_fanout: bool = False

    def for_stage(self, stage: str) -> StageResources:
        """The resources of ``stage`` (unknown stages are an error naming the valid ones)."""
        if stage not in self.stages:
            raise PlatformError(f"platform has no settings for stage {stage!r}; known: {sorted(self.stages)}.")
        return self.stages[stage]

    def apply(self, task: Any, stage: str) -> Any:
        """Apply every platform setting of ``stage`` to a KFP ``PipelineTask``; returns the task."""
        from kfp import kubernetes

        from pipelines import _kfp_speed

        _kfp_speed.install()  # KFP's setters below otherwise read the source of every frame on the stack

        res = self.for_stage(stage)
        if res.gpus > 0:
            task.set_accelerator_type(res.gpu_resource).set_accelerator_limit(res.gpus)
            if res.gpu_product:
                kubernetes.add_node_selector(task, res.gpu_product_label, res.gpu_product)
        task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
        task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
        for key, value in sorted(res.node_selector.items()):
            kubernetes.add_node_selector(task, key, value)
        for tol in res.tolerations:
            kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect)
        kubernetes.use_secret_as_env(task, self.s3_secret, dict(self.s3_secret_keys))
        if self.s3_endpoint:
            task.set_env_variable("AWS_ENDPOINT_URL", self.s3_endpoint)
            task.set_env_variable("AWS_ENDPOINT_URL_S3", self.s3_endpoint)
        if self.model_cache_pvc:
            kubernetes.mount_pvc(task, pvc_name=self.model_cache_pvc, mount_path=self.model_cache_path)
        else:
            kubernetes.empty_dir_mount(task, volume_name="model-cache", mount_path=self.model_cache_path)
        task.set_env_variable("ANYFLOW_CACHE_DIR", self.model_cache_path)  # storage cache: base models + artifacts
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=res.shm_size)
        kubernetes.set_image_pull_policy(task, self.image_pull_policy)
        kubernetes.set_security_context(task, run_as_user=self.run_as_user, run_as_group=self.run_as_user,
                                        run_as_non_root=True)
        kubernetes.set_timeout(task, res.timeout_s)
        if res.retries > 0:
            task.set_retry(num_retries=res.retries, backoff_duration=res.backoff,
                           backoff_factor=res.backoff_factor, backoff_max_duration=res.backoff_max)
        # Every pod knows its run (the Argo workflow every pod of the run is labelled with): a KFP retry of a
        # bad-input failure stops at once (anyflow.stages: FAILED.json), and a multi-node launcher names its
        # job after (run, stage), so a launcher started again for the same run adopts its job instead of
        # starting a second one. A pod env, not a task input: the cache key is unchanged.
        kubernetes.use_field_path_as_env(task, RUN_ENV, RUN_FIELD_PATH)
        # Kueue admits the GPU pods through its queue (its plain-pod integration); the CPU tasks (prepare_data,
        # the trainjob launcher, record_stage) hold no GPU and are not queued: a launcher gated behind its own
        # job's quota could never start it. The label is pod metadata, not a task input: the cache key is unchanged.
        if self.kueue_queue and res.gpus > 0:
            kubernetes.add_pod_label(task, KUEUE_QUEUE_LABEL, self.kueue_queue)
        # A record task must run in every run (after a KFP cache hit of its stage too): never cached.
        task.set_caching_options(enable_caching=self.caching and stage != RECORD_PROFILE)
        return task

    def worker_settings(self, stage: str) -> dict[str, Any]:
        """The settings :meth:`apply` gives a task, for the worker pods of ``stage``'s multi-node job
        (JSON-serialisable: the launcher task gets them as a parameter, ``components/trainjob``). The GPU
        count is not here: the launcher's ``gpus_per_node`` (part of the stage's cache key) sets it."""
        res = self.for_stage(stage)
        selector = dict(res.node_selector)
        if res.gpus > 0 and res.gpu_product:
            selector[res.gpu_product_label] = res.gpu_product
        tolerations = [{k: v for k, v in dataclasses.asdict(t).items() if v is not None} for t in res.tolerations]
        # the queue only when set: an unqueued platform hands the launcher the same parameter as before
        queue = {"kueue_queue": self.kueue_queue} if self.kueue_queue else {}
        return {**queue,
            "gpu_resource": res.gpu_resource,
            "cpu_request": res.cpu_request, "cpu_limit": res.cpu_limit,
            "memory_request": res.memory_request, "memory_limit": res.memory_limit,
            "shm_size": res.shm_size, "node_selector": selector, "tolerations": tolerations,
            "model_cache_pvc": self.model_cache_pvc, "model_cache_path": self.model_cache_path,
            "run_as_user": self.run_as_user, "s3_secret": self.s3_secret,
            "s3_secret_keys": dict(self.s3_secret_keys), "s3_endpoint": self.s3_endpoint,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "platform") -> Platform:
        """Build from a mapping; unknown keys are errors naming the key. Stage entries merge over
        ``defaults`` (if given) and then over the built-in defaults of that stage."""
        data = dict(data or {})
        top = {f.name for f in dataclasses.fields(cls)} | {"defaults"}
        _check_keys(data, top, source)
        base = cls()
        common = data.pop("defaults", None) or {}
        _check_keys(common, _resource_fields(), f"{source}: defaults")
        stage_cfg = data.pop("stages", None) or {}
        stages = dict(base.stages)
        for name in stage_cfg:
            if name not in stages:
                raise PlatformError(f"{source}: unknown stage {name!r} under 'stages'; valid: {sorted(stages)}.")
        for name, current in stages.items():
            own = stage_cfg.get(name) or {}
            _check_keys(own, _resource_fields(), f"{source}: stages.{name}")
            stages[name] = _resources(current, {**common, **own}, f"{source}: stages.{name}")
        if data.get("trainjob_api", "trainer") not in ("trainer", "pytorchjob"):
            raise PlatformError(f"{source}: trainjob_api must be 'trainer' or 'pytorchjob', got {data['trainjob_api']!r}.")
        par = data.get("partition_parallelism", 8)
        if isinstance(par, bool) or not isinstance(par, int) or not 1 <= par <= 1000:
            raise PlatformError(f"{source}: partition_parallelism must be a whole number in [1, 1000] (prepare_partition "
                                f"pods at a time), got {par!r}.")
        for flag in ("prepare_fanout", "caching"):
            if flag in data and not isinstance(data[flag], bool):
                raise PlatformError(f"{source}: {flag} must be true or false, got {data[flag]!r}.")
        if "image_pull_policy" in data and data["image_pull_policy"] not in _PULL_POLICIES:
            raise PlatformError(f"{source}: image_pull_policy must be one of {_PULL_POLICIES}, got {data['image_pull_policy']!r}.")
        queue = data.get("kueue_queue", "")
        if not isinstance(queue, str) or (queue and not (len(queue) <= 63 and _QUEUE_NAME.fullmatch(queue))):
            raise PlatformError(f"{source}: kueue_queue must be a LocalQueue name (lowercase letters, digits and '-', "
                                f"at most 63 characters) or empty, got {queue!r}.")
        return dataclasses.replace(base, stages=stages, **data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Platform:
        """Load a platform YAML file (examples: ``manifests/overlays/*/platform.yaml``)."""
        import yaml

        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise PlatformError(f"{path}: a platform file must be a YAML mapping, got {type(data).__name__}.")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def local_runner(cls) -> Platform:
        """What ``anyflow run`` and a local rerun compile with (KFP's local runner): :meth:`local` without its
        in-cluster S3 endpoint. The local runner's stage processes inherit this process's environment, so the
        endpoint follows the one rule of local runs: ``--s3-endpoint`` > ``ANYFLOW_S3_ENDPOINT`` >
        ``AWS_ENDPOINT_URL_S3`` > ``AWS_ENDPOINT_URL`` (``anyflow._storage_s3``); a platform's endpoint applies
        in cluster pods only."""
        return dataclasses.replace(cls.local(), s3_endpoint="")

    @classmethod
    def local(cls) -> Platform:
        """A small platform for kind/minikube: no GPUs, no tolerations, emptyDir model cache."""
        small = StageResources(cpu_request="500m", cpu_limit="2", memory_request="1Gi", memory_limit="4Gi",
                               shm_size="512Mi", timeout_s=3600, retries=0)
        return cls(stages=dict.fromkeys(_default_stages(), small), model_cache_pvc="",
                   s3_endpoint="http://anyflow-minio.kubeflow.svc.cluster.local:9000")


def _resource_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(StageResources)}


def _check_keys(data: Mapping[str, Any], valid: set[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise PlatformError(f"{where}: expected a mapping, got {type(data).__name__}.")
    for key in data:
        if key not in valid:
            raise PlatformError(f"{where}: unknown key {key!r}; valid keys: {sorted(valid)}.")


def _resources(current: StageResources, values: Mapping[str, Any], where: str) -> StageResources:
    values = dict(values)
    if "tolerations" in values:
        tols = []
        for i, tol in enumerate(values["tolerations"] or []):
            _check_keys(tol, {"key", "operator", "value", "effect"}, f"{where}.tolerations[{i}]")
            if tol.get("effect") not in (None, *_EFFECTS):
                raise PlatformError(f"{where}.tolerations[{i}].effect must be one of {_EFFECTS}, got {tol['effect']!r}.")
            tols.append(Toleration(**tol))
        values["tolerations"] = tuple(tols)
    if "node_selector" in values:
        values["node_selector"] = {str(k): str(v) for k, v in (values["node_selector"] or {}).items()}
    if "num_nodes" in values and (not isinstance(values["num_nodes"], int) or values["num_nodes"] < 1):
        raise PlatformError(f"{where}.num_nodes must be an integer >= 1, got {values['num_nodes']!r}.")
    for key in ("gpus", "timeout_s", "retries"):
        if key in values and (not isinstance(values[key], int) or values[key] < 0):
            raise PlatformError(f"{where}.{key} must be a non-negative integer, got {values[key]!r}.")
    return dataclasses.replace(current, **values)
