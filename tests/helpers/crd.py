"""Validate objects against the real upstream CRD schemas in ``tests/contracts/`` (strictly).

An API server *prunes* fields a structural CRD schema does not declare, silently: a misspelt or
version-skewed field in a TrainJob is dropped, not refused. So the check here is stricter than the
server's: every object schema that lists ``properties`` (and neither ``additionalProperties`` nor
``x-kubernetes-preserve-unknown-fields``) refuses unknown keys. ``x-kubernetes-int-or-string`` is honoured.
CEL rules (``x-kubernetes-validations``) are not evaluated: tests that depend on one say so.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CONTRACTS = Path(__file__).resolve().parent.parent / "contracts"

#: kind -> CRD file under tests/contracts/
CRD_FILES = {
    "TrainJob": "trainer-v2.3.0/trainer.kubeflow.org_trainjobs.yaml",
    "TrainingRuntime": "trainer-v2.3.0/trainer.kubeflow.org_trainingruntimes.yaml",
    "ClusterTrainingRuntime": "trainer-v2.3.0/trainer.kubeflow.org_clustertrainingruntimes.yaml",
    "PyTorchJob": "training-operator-v1.9.4/kubeflow.org_pytorchjobs.yaml",
    "WorkflowTaskResult": "argo-v4.0.5/argoproj.io_workflowtaskresults.yaml",
}


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd(kind: str) -> dict[str, Any]:
    """The CRD document for ``kind`` (parsed once)."""
    return yaml.safe_load((CONTRACTS / CRD_FILES[kind]).read_text())


@functools.cache
def _schema(kind: str, version: str) -> dict[str, Any]:
    doc = crd(kind)
    for v in doc["spec"]["versions"]:
        if v["name"] == version:
            if not v.get("served", False):
                raise AssertionError(f"{kind} {version} is not served by {CRD_FILES[kind]}")
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            # apiVersion/kind/metadata are the API server's own; metadata is checked loosely (ObjectMeta)
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            return _strict(schema)
    served = [v["name"] for v in doc["spec"]["versions"]]
    raise AssertionError(f"{CRD_FILES[kind]} has no version {version!r} (it has {served})")


def validate(obj: Mapping[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` (or AssertionError for a wrong group/version/kind)."""
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        raise AssertionError(f"no vendored CRD for kind {kind!r}; known: {sorted(CRD_FILES)}")
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    expected = crd(kind)["spec"]["group"]
    if group != expected:
        raise AssertionError(f"{kind}: apiVersion group {group!r}, the CRD's is {expected!r}")
    jsonschema.validate(dict(obj), _schema(kind, version))
