"""The kustomize overlays, rendered with ``kubectl kustomize``, against upstream contracts.

* Every object validates: core kinds with kubernetes-validate (Kubernetes 1.32, strict: unknown fields
  fail), CRD kinds with ``tests/helpers/crd.py`` (the vendored upstream CRDs, strict).
* One namespace story: each install-mode overlay puts everything in the namespace where KFP runs pipeline
  pods and binds the launcher Role to the account KFP runs them as; no Namespace, Secret or
  ServiceAccount of ours, no object name that can clash with KFP's.
* RBAC: the runner account, with the vendored KFP 2.17.0 roles plus our Role, may make every Kubernetes
  API call Argo v4.0.5's executor, KFP 2.17.0's driver/launcher and our launcher make. The calls are data
  below, each citing the upstream source it was read from; the roles come from ``tests/contracts/``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.platform import Platform
from tests.helpers import crd

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
CONTRACTS = ROOT / "tests" / "contracts"
K8S_VERSION = "1.32.0"

#: The account KFP runs pipeline pods as, per install mode.
#: standalone: kubeflow/pipelines 2.17.0 backend/src/apiserver/common/const.go
#:   (DefaultPipelineRunnerServiceAccount = "pipeline-runner"), in KFP's namespace `kubeflow`;
#: multi-user: 2.17.0 manifests/kustomize/base/installs/multi-user/api-service/params.env
#:   (DEFAULTPIPELINERUNNERSERVICEACCOUNT=default-editor), in the user's profile namespace.
STANDALONE = ("kubeflow", "pipeline-runner")
PROFILE_PLACEHOLDER = "set-your-profile-namespace"
MULTI_USER = (PROFILE_PLACEHOLDER, "default-editor")
OVERLAYS = {"standalone": STANDALONE, "local": STANDALONE, "multi-user": MULTI_USER, "gpu-cloud": MULTI_USER}

Call = tuple[str, str, str]  # (API group, resource, verb)

#: Argo v4.0.5's executor (the `wait` container of every pipeline pod), argoproj/argo-workflows v4.0.5:
ARGO_EXECUTOR_CALLS: list[Call] = [
    # workflow/executor/taskresult.go createTaskResult (taskResultClient.Create); docs/workflow-rbac.md
    ("argoproj.io", "workflowtaskresults", "create"),
    # workflow/executor/taskresult.go patchTaskResult, patchTaskResultLabels (taskResultClient.Patch)
    ("argoproj.io", "workflowtaskresults", "patch"),
    # workflow/executor/executor.go GetSecrets: artifact-repository keys; KFP 2.17.0's controller config
    # (vendored workflow-controller-configmap-patch.yaml) sets archiveLogs with secret mlpipeline-minio-artifact
    ("", "secrets", "get"),
    # (executor.go AddAnnotation patches pods, but nothing in v4.0.5 calls it: no pods/patch needed)
]
#: KFP 2.17.0's driver and launcher (kubeflow/pipelines 2.17.0):
KFP_DRIVER_LAUNCHER_CALLS: list[Call] = [
    ("", "configmaps", "get"),  # backend/src/v2/config/env.go FromConfigMap: ConfigMaps(ns).Get("kfp-launcher")
    ("", "secrets", "get"),  # backend/src/v2/objectstore/object_store.go: Secrets(ns).Get (bucket credentials)
    # backend/src/v2/component/launcher_v2.go retryIndexFromPodAnnotation; backend/src/v2/driver/k8s.go (own pod)
    ("", "pods", "get"),
    # backend/src/v2/driver/k8s.go createPVC / deletePVC (kfp-kubernetes CreatePVC/DeletePVC tasks)
    ("", "persistentvolumeclaims", "create"),
    ("", "persistentvolumeclaims", "get"),
    ("", "persistentvolumeclaims", "delete"),
]
#: anyflow's multi-node launcher (components/trainjob/launcher.py): create, poll, patch, delete its job.
LAUNCHER_CALLS: list[Call] = [(g, r, v) for g, r in (("trainer.kubeflow.org", "trainjobs"),
                                                      ("kubeflow.org", "pytorchjobs"))
                              for v in ("create", "get", "patch", "delete")]
ALL_CALLS = ARGO_EXECUTOR_CALLS + KFP_DRIVER_LAUNCHER_CALLS + LAUNCHER_CALLS
#: Multi-user: `default-editor` is bound (by the profile controller) to the cluster role kubeflow-edit,
#: which aggregates kubeflow-pipelines-edit (vendored) and kubeflow-kubernetes-edit/-view from
#: kubeflow/manifests common/kubeflow-roles/base/cluster-roles.yaml (NOT vendored). These calls are
#: covered only by the latter (read there: configmaps/pods/persistentvolumeclaims get via
#: kubeflow-kubernetes-view; secrets get, persistentvolumeclaims create/delete via kubeflow-kubernetes-edit).
MULTI_USER_FROM_KUBEFLOW_EDIT: set[Call] = {
    ("", "configmaps", "get"), ("", "secrets", "get"), ("", "pods", "get"),
    ("", "persistentvolumeclaims", "create"), ("", "persistentvolumeclaims", "get"),
    ("", "persistentvolumeclaims", "delete")}


def _render(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl with built-in kustomize is not installed")
    res = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, _render(MANIFESTS / "overlays" / request.param)


def _validate_core(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _vendored(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CONTRACTS / path).read_text()) if d]


def _allows(rules: list[dict], call: Call) -> bool:
    group, resource, verb = call
    return any((group in r.get("apiGroups", []) or "*" in r.get("apiGroups", []))
               and (resource in r.get("resources", []) or "*" in r.get("resources", []))
               and (verb in r.get("verbs", []) or "*" in r.get("verbs", []))
               and not r.get("resourceNames") for r in rules)


def _aggregated_rules(roles: list[dict], name: str) -> list[dict]:
    """The rules of cluster role ``name`` with its aggregationRule resolved within ``roles``."""
    by_name = {r["metadata"]["name"]: r for r in roles}
    role = by_name[name]
    rules = list(role.get("rules") or [])
    for selector in (role.get("aggregationRule") or {}).get("clusterRoleSelectors", []):
        labels = selector["matchLabels"]
        for other in roles:
            if other is not role and labels.items() <= (other["metadata"].get("labels") or {}).items():
                rules += _aggregated_rules(roles, other["metadata"]["name"])
    return rules


def _runner_rules(mode: tuple[str, str]) -> list[dict]:
    if mode == STANDALONE:
        (role,) = _vendored("kfp-2.17.0/pipeline-runner-role.yaml")
        return role["rules"]
    return _aggregated_rules(_vendored("kfp-2.17.0/view-edit-cluster-roles.yaml"), "kubeflow-pipelines-edit")


def _our_rules_for(objs: list[dict], namespace: str, account: str) -> list[dict]:
    """Rules of our Roles that a RoleBinding grants to ``namespace/account``."""
    roles = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Role"}
    out = []
    for b in (o for o in objs if o["kind"] == "RoleBinding"):
        if {"kind": "ServiceAccount", "name": account, "namespace": namespace} in b["subjects"]:
            assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                    "name": b["roleRef"]["name"]}
            out += roles[b["roleRef"]["name"]]["rules"]
    return out


def test_every_object_validates(rendered) -> None:
    overlay, objs = rendered
    namespace, _ = OVERLAYS[overlay]
    assert objs
    for obj in objs:
        if obj["kind"] in crd.CRD_FILES:
            crd.validate(obj)
        else:
            _validate_core(obj)
        assert obj["metadata"]["namespace"] == namespace, (overlay, obj["kind"], obj["metadata"]["name"])
    # namespaces belong to KFP / the profile controller; accounts to KFP; secrets to the user; the
    # schedule is a KFP recurring run (docs/cluster.md)
    assert not {"Namespace", "ServiceAccount", "Secret", "CronWorkflow", "ClusterRole",
                "ClusterRoleBinding"} & {o["kind"] for o in objs}


def test_validator_can_fail() -> None:
    import kubernetes_validate

    bad = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}, "automountToken": True}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_no_secret_anywhere_in_manifests() -> None:
    """`kubectl apply -k` must never overwrite the user's S3 secret: no Secret object or generator in
    any file under manifests/ (rendered or not)."""
    for path in MANIFESTS.rglob("*.yaml"):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
        for doc in docs:
            assert doc.get("kind") != "Secret" and "secretGenerator" not in doc, path


def test_object_names_cannot_clash_with_kfp(rendered) -> None:
    """Our objects share KFP's namespace (standalone) or a profile's; an anyflow- prefix on every name
    keeps `kubectl apply -k` from replacing one of theirs (minio-service, seaweedfs, ml-pipeline*, ...)."""
    overlay, objs = rendered
    for obj in objs:
        assert obj["metadata"]["name"].startswith("anyflow-"), (overlay, obj["kind"], obj["metadata"]["name"])


def test_rbac_is_exactly_the_launcher_calls(rendered) -> None:
    overlay, objs = rendered
    namespace, account = OVERLAYS[overlay]
    (role,) = [o for o in objs if o["kind"] == "Role"]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert granted == set(LAUNCHER_CALLS)
    assert not any(rule.get("resourceNames") for rule in role["rules"])
    (binding,) = [o for o in objs if o["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "anyflow-launcher"}


def test_runner_account_can_make_every_call(rendered) -> None:
    overlay, objs = rendered
    mode = OVERLAYS[overlay]
    ours = _our_rules_for(objs, *mode)
    missing = {c for c in ALL_CALLS if not _allows(_runner_rules(mode) + ours, c)}
    if mode == STANDALONE:
        assert missing == set(), f"{overlay}: pipeline-runner cannot {sorted(missing)}"
    else:  # the rest comes from kubeflow-edit's Kubernetes part, which is not vendored (see above)
        assert missing == MULTI_USER_FROM_KUBEFLOW_EDIT, f"{overlay}: default-editor cannot {sorted(missing)}"
    # our Role is what adds the TrainJob calls: neither KFP role grants them
    assert not any(_allows(_runner_rules(mode), c) for c in LAUNCHER_CALLS if c[0] == "trainer.kubeflow.org")


def test_call_coverage_check_can_fail() -> None:
    rules = [r for r in _runner_rules(STANDALONE) if "workflowtaskresults" not in r["resources"]]
    assert not _allows(rules, ("argoproj.io", "workflowtaskresults", "create"))
    assert not _allows([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"], "resourceNames": ["x"]}],
                       ("", "pods", "get"))


def test_argo_calls_name_the_vendored_crd() -> None:
    """The executor's workflowtaskresults calls use the group and plural of Argo v4.0.5's CRD."""
    doc = crd.crd("WorkflowTaskResult")
    assert {(g, r) for g, r, _ in ARGO_EXECUTOR_CALLS if g != ""} == {(doc["spec"]["group"], doc["spec"]["names"]["plural"])}


def test_profile_namespace_is_set_in_one_place(tmp_path: Path) -> None:
    """`kustomize edit set namespace alice` in the multi-user or gpu-cloud overlay moves every object
    and the RoleBinding's subject (kustomize's namespace: alone leaves ServiceAccount subjects)."""
    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy)
    for overlay in ("multi-user", "gpu-cloud"):
        kfile = copy / "overlays" / overlay / "kustomization.yaml"
        data = yaml.safe_load(kfile.read_text())
        data["namespace"] = "alice"  # what `kustomize edit set namespace alice` writes
        kfile.write_text(yaml.safe_dump(data))
        objs = _render(copy / "overlays" / overlay)
        assert {o["metadata"]["namespace"] for o in objs} == {"alice"}
        assert _our_rules_for(objs, "alice", "default-editor"), overlay
        assert PROFILE_PLACEHOLDER not in yaml.safe_dump_all(objs)


def test_pods_non_root_read_only(rendered) -> None:
    overlay, objs = rendered
    pods = [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objs if o["kind"] == "Deployment"]
    assert bool(pods) == (overlay == "local"), overlay  # only the local overlay runs a pod (MinIO)
    for name, spec in pods:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"} and spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert not c["image"].endswith(":latest") and ":" in c["image"].rsplit("/", 1)[-1]


def _platform(overlay: str) -> Platform:
    return Platform.from_yaml(MANIFESTS / "overlays" / overlay / "platform.yaml")


def test_local_platform_points_at_the_rendered_minio() -> None:
    objs = _render(MANIFESTS / "overlays" / "local")
    (svc,) = [o for o in objs if o["kind"] == "Service"]
    (port,) = [p["port"] for p in svc["spec"]["ports"]]
    endpoint = f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port}"
    assert _platform("local").s3_endpoint == endpoint
    assert Platform.local().s3_endpoint == endpoint
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
           if "valueFrom" in e}
    # MinIO's root keys are the pipeline pods' S3 keys: the same secret and keys the platform hands to them
    local = _platform("local")
    assert {(r["name"], r["key"]) for r in env.values()} == {(local.s3_secret, k) for k in local.s3_secret_keys}
    # emptyDir model cache: no model-cache PVC rendered, none referenced
    assert local.model_cache_pvc == "" and local.for_stage("distill").gpus == 0
    assert "anyflow-model-cache" not in {o["metadata"]["name"] for o in objs}


def test_gpu_cloud_platform_uses_the_rendered_cache() -> None:
    objs = _render(MANIFESTS / "overlays" / "gpu-cloud")
    plat = _platform("gpu-cloud")
    (pvc,) = [o for o in objs if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == plat.model_cache_pvc]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Ti" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    distill = plat.for_stage("distill")
    assert distill.gpus == 8 and distill.node_selector == {"cloud.google.com/gke-nodepool": "gpu-h100"}
    assert plat.for_stage("prepare_data").tolerations == ()


def test_gpu_cloud_keeps_every_cpu_only_profile_off_the_gpu_pool() -> None:
    """The overlay's ``defaults`` put every profile on the H100 pool; each profile that asks for no GPU (the
    prepare_merge, record, launcher and export tasks, CPU prepare_data) must be moved back to the CPU pool."""
    plat = _platform("gpu-cloud")
    cpu_only = [name for name, res in plat.stages.items() if res.gpus == 0]
    assert {"prepare_data", "prepare_merge", "record_stage", "trainjob", "export"} <= set(cpu_only)
    for name in cpu_only:
        res = plat.for_stage(name)
        assert res.node_selector == {"cloud.google.com/gke-nodepool": "cpu-highmem"} and not res.tolerations, name
