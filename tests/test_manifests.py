"""Kustomize overlays render with ``kubectl kustomize`` and every object validates against the Kubernetes
1.32 schemas (kubernetes-validate, strict: unknown fields fail). The one CRD kind, Argo's CronWorkflow,
is validated against a schema written here from the Argo CRD, and its embedded pod parts (containers,
volumes, security context) against the core Pod schema. RBAC is exactly the launcher's least privilege."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from anyflow.cron import to_kfp_cron
from pipelines.platform import Platform

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ["local", "gpu-cloud"]
K8S_VERSION = "1.32.0"
CRD_KINDS = {"CronWorkflow"}

CRONWORKFLOW_SCHEMA = {  # from argoproj.io_cronworkflows (v1alpha1): the fields we use, no unknown keys
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "argoproj.io/v1alpha1"}, "kind": {"const": "CronWorkflow"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["workflowSpec"], "additionalProperties": False, "properties": {
            "schedule": {"type": "string"}, "schedules": {"type": "array", "items": {"type": "string"}},
            "timezone": {"type": "string"}, "concurrencyPolicy": {"enum": ["Allow", "Forbid", "Replace"]},
            "startingDeadlineSeconds": {"type": "integer", "minimum": 0}, "suspend": {"type": "boolean"},
            "successfulJobsHistoryLimit": {"type": "integer", "minimum": 0},
            "failedJobsHistoryLimit": {"type": "integer", "minimum": 0},
            "workflowSpec": {"type": "object", "required": ["entrypoint", "templates"], "properties": {
                "entrypoint": {"type": "string"}, "serviceAccountName": {"type": "string"},
                "automountServiceAccountToken": {"type": "boolean"}, "securityContext": {"type": "object"},
                "volumes": {"type": "array"},
                "templates": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name"], "properties": {"name": {"type": "string"},
                                                                            "container": {"type": "object"}}}}}}}},
    },
}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl with built-in kustomize is not installed")
    res = subprocess.run([kubectl, "kustomize", str(ROOT / "manifests" / "overlays" / request.param)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return request.param, [d for d in yaml.safe_load_all(res.stdout) if d]


def _validate_core(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _cron_pod(cw: dict) -> dict:
    spec = cw["spec"]["workflowSpec"]
    tmpl = spec["templates"][0]["container"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cron-pod"},
            "spec": {"serviceAccountName": spec["serviceAccountName"], "securityContext": spec["securityContext"],
                     "automountServiceAccountToken": spec["automountServiceAccountToken"],
                     "volumes": spec["volumes"], "containers": [{"name": "main", **tmpl}]}}


def test_every_object_validates(rendered) -> None:
    overlay, objs = rendered
    kinds = [o["kind"] for o in objs]
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Secret", "PersistentVolumeClaim",
            "ConfigMap", "CronWorkflow"} <= set(kinds)
    crd = 0
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            jsonschema.validate(obj, CRONWORKFLOW_SCHEMA)
            _validate_core(_cron_pod(obj))
            crd += 1
        else:
            _validate_core(obj)
        assert obj["metadata"].get("namespace", "anyflow") == "anyflow" or obj["kind"] == "Namespace"
    assert crd == 1, f"{overlay}: expected exactly one CRD object (CronWorkflow), validated with our schema"


def test_validator_can_fail() -> None:
    import kubernetes_validate

    bad = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}, "automountToken": True}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_rbac_is_least_privilege(rendered) -> None:
    _, objs = rendered
    roles = [o for o in objs if o["kind"] in ("Role", "ClusterRole")]
    assert [r["kind"] for r in roles] == ["Role"]  # namespaced only, no ClusterRole
    assert roles[0]["rules"] == [
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "get", "watch", "delete"]},
        {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["create", "get", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    ]
    binding = next(o for o in objs if o["kind"] == "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "anyflow-launcher", "namespace": "anyflow"}]
    assert not any(o["kind"] == "ClusterRoleBinding" for o in objs)


def _pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for o in objs:
        if o["kind"] == "Deployment":
            out.append((o["metadata"]["name"], o["spec"]["template"]["spec"]))
        if o["kind"] == "CronWorkflow":
            out.append((o["metadata"]["name"], _cron_pod(o)["spec"]))
    return out


def test_pods_non_root_read_only(rendered) -> None:
    overlay, objs = rendered
    pods = _pod_specs(objs)
    assert pods, overlay
    for name, spec in pods:
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert not c["image"].endswith(":latest") and ":" in c["image"].rsplit("/", 1)[-1]


def test_secret_is_a_template_without_keys(rendered) -> None:
    _, objs = rendered
    secrets = [o for o in objs if o["kind"] == "Secret"]
    assert [s["metadata"]["name"] for s in secrets] == ["anyflow-s3"]
    assert set(secrets[0]["stringData"].values()) == {"REPLACE_ME"} and "data" not in secrets[0]


def test_platform_configmap_and_schedule(rendered) -> None:
    overlay, objs = rendered
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "anyflow-platform")
    platform = Platform.from_dict(yaml.safe_load(cm["data"]["platform.yaml"]) or {}, source=f"{overlay}/platform.yaml")
    cw = next(o for o in objs if o["kind"] == "CronWorkflow")
    to_kfp_cron(cw["spec"]["schedule"])  # a valid 5-field cron
    args = cw["spec"]["workflowSpec"]["templates"][0]["container"]["args"]
    assert "--platform=/etc/anyflow/platform.yaml" in args
    if overlay == "local":
        assert platform.for_stage("distill").gpus == 0 and platform.model_cache_pvc == ""
        assert "--preset=tiny" in args and any(o["kind"] == "Deployment" for o in objs)
    else:
        distill = platform.for_stage("distill")
        assert distill.gpus == 8 and distill.node_selector == {"cloud.google.com/gke-nodepool": "gpu-h100"}
        assert platform.for_stage("prepare_data").tolerations == ()
        pvc = next(o for o in objs if o["kind"] == "PersistentVolumeClaim")
        assert pvc["spec"]["resources"]["requests"]["storage"] == "1Ti"


def test_unknown_field_in_cronworkflow_is_caught(rendered) -> None:
    _, objs = rendered
    cw = copy.deepcopy(next(o for o in objs if o["kind"] == "CronWorkflow"))
    cw["spec"]["schedul"] = cw["spec"].pop("schedule")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cw, CRONWORKFLOW_SCHEMA)
