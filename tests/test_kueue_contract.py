"""What Kueue writes into anyflow's TrainJob when it admits it, checked against the vendored Trainer v2.3.0 CRD.

Kueue's TrainJob integration injects the admitted flavour's node selector, tolerations and scheduling gates into
the job (kubernetes-sigs/kueue ``pkg/controller/jobs/trainjob/trainjob_controller.go``, ``RunWithPodSetsInfo``):

* from v0.17.0 ("Add support for Kubeflow Trainer v2.2", kubernetes-sigs/kueue#10127; read at v0.19.2) as a
  ``spec.runtimePatches`` entry with manager ``kueue.x-k8s.io/manager`` that patches each replicated job's pod
  template (``ReplicatedJobPatch`` → ``JobTemplatePatch`` → ``JobSpecPatch`` → ``PodTemplatePatch``);
* v0.14.0 to v0.16.x (built against Trainer v2.0.1 / v2.1.0, ``go.mod``; read at v0.16.0) as
  ``spec.podTemplateOverrides`` entries (``targetJobs``, ``metadata``, ``spec``).

The two fixtures below are those shapes, written from that source. anyflow's queued TrainJob with the first is
accepted by the Trainer v2.3.0 CRD it is built for, with the second refused: so Kueue before v0.17 cannot admit
anyflow's TrainJobs, the minimum docs/cluster.md names.
"""

from __future__ import annotations

import copy

import jsonschema
import pytest
from helpers import crd
from test_trainjob_launcher import _job_args, _workers

from components.trainjob import launcher
from pipelines.platform import Platform

#: what Kueue's admission puts on every pod of the job (podset.PodSetInfo: node selector, tolerations, gates)
_NODE_SELECTOR = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
_LABELS = {"kueue.x-k8s.io/podset": "node"}


def _queued_trainjob() -> dict:
    body = launcher.build_trainjob(**_job_args(_workers(Platform.from_dict({"kueue_queue": "gpu-team-a"}))))
    crd.validate(body)
    assert body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team-a"
    return body


def test_kueue_v0_17_and_later_admission_patch_is_accepted_beside_ours() -> None:
    body = _queued_trainjob()
    admitted = copy.deepcopy(body)
    admitted["spec"]["runtimePatches"].append(
        {
            "manager": "kueue.x-k8s.io/manager",  # runtimePatchManagerName
            "trainingRuntimeSpec": {
                "template": {
                    "spec": {
                        "replicatedJobs": [
                            {
                                "name": launcher.TRAINER_REPLICATED_JOB,  # the podset = the runtime's replicated job
                                "template": {
                                    "spec": {
                                        "template": {
                                            "metadata": {"labels": _LABELS},
                                            "spec": {
                                                "nodeSelector": _NODE_SELECTOR,
                                                "tolerations": _TOLERATIONS,
                                                "schedulingGates": [{"name": "example.com/gate"}],
                                            },
                                        }
                                    }
                                },
                            }
                        ]
                    }
                }
            },
        }
    )
    crd.validate(admitted)
    managers = [p["manager"] for p in admitted["spec"]["runtimePatches"]]
    assert managers == [
        launcher.PATCH_MANAGER,
        "kueue.x-k8s.io/manager",
    ]  # ours is untouched, a separate entry


def test_kueue_before_v0_17_admission_override_is_refused_by_trainer_v2_3() -> None:
    admitted = _queued_trainjob()
    admitted["spec"]["podTemplateOverrides"] = [
        {
            "targetJobs": [{"name": launcher.TRAINER_REPLICATED_JOB}],
            "metadata": {"labels": _LABELS},
            "spec": {"nodeSelector": _NODE_SELECTOR, "tolerations": _TOLERATIONS},
        }
    ]
    with pytest.raises(jsonschema.ValidationError, match="podTemplateOverrides"):
        crd.validate(admitted)
