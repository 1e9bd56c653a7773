"""The partitioned prepare_data in the compiled pipelines: a bounded ``ParallelFor`` of prepare_partition pods
between the uncached source fingerprint task (which lists the partitions to encode) and the prepare_data (merge)
task, every object validated like the others
(tests/test_compiled_platform.py: KFP's Kubernetes executor schema and the pod the driver makes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.compile import compile_pipeline
from pipelines.platform import Platform, PlatformError
from tests.test_compiled_platform import _check

IMAGE = "r/anyflow-train@sha256:" + "0" * 64


def _docs(path: Path) -> tuple[dict, dict]:
    spec, platform = list(yaml.safe_load_all(path.read_text()))
    return spec, platform


def _tasks(spec: dict) -> dict[str, tuple[str, dict]]:
    out = {n: ("root", t) for n, t in spec["root"]["dag"]["tasks"].items()}
    for comp, body in spec["components"].items():
        out.update({n: (comp, t) for n, t in (body.get("dag") or {}).get("tasks", {}).items()})
    return out


@pytest.mark.parametrize(("name", "count"), [("anyflow-t2v", 2), ("anyflow-rerun-prepare-data", 1)])
def test_prepare_data_fans_out_in_a_bounded_parallel_for(name: str, count: int, tmp_path: Path) -> None:
    import dataclasses

    base = Platform()
    gpu = dataclasses.replace(
        base.stages["prepare_data"], gpus=1
    )  # the encoders on one GPU per partition pod
    plat = dataclasses.replace(base, partition_parallelism=3, stages={**base.stages, "prepare_data": gpu})
    out = compile_pipeline(name, tmp_path / "p.yaml", plat, image=IMAGE)
    spec, platform = _docs(out)
    assert _check(spec, platform) >= 3  # every executor, the partition tasks' included, is a valid pod
    tasks = _tasks(spec)
    execs = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    merges = {
        n: t for n, (_, t) in tasks.items() if t["componentRef"]["name"].startswith("comp-prepare-data")
    }
    assert len(merges) == count
    for merge_name, merge in merges.items():
        (loop_name,) = [d for d in merge["dependentTasks"] if d.startswith("for-loop")]
        loop = tasks[loop_name][1]
        assert loop["iteratorPolicy"] == {"parallelismLimit": 3}, merge_name
        # the loop runs over the partitions listed by the fingerprint task whose digest prepare_data takes
        (plan_name,) = loop["dependentTasks"]
        plan = tasks[plan_name][1]
        assert plan["componentRef"]["name"].startswith("comp-source-fingerprint")
        assert merge["inputs"]["parameters"]["source_fingerprint"]["taskOutputParameter"] == {
            "producerTask": plan_name,
            "outputParameterKey": "digest",
        }
        assert loop["parameterIterator"]["items"]["inputParameter"] == f"pipelinechannel--{plan_name}-Output"
        assert loop["inputs"]["parameters"][f"pipelinechannel--{plan_name}-Output"][
            "taskOutputParameter"
        ] == {"producerTask": plan_name, "outputParameterKey": "Output"}
        assert plan["cachingOptions"] == {}  # it reads the store: never cached
        store = plan["inputs"]["parameters"]["store"]["componentInputParameter"]
        assert store in ("store", "pipelinechannel--store")  # the pipeline's store (through a dsl.If's input)
        plan_exec = spec["components"][plan["componentRef"]["name"]]["executorLabel"]
        assert "accelerator" not in execs[plan_exec]["container"]["resources"]
        body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
        (encode,) = body.values()
        assert encode["componentRef"]["name"].startswith("comp-prepare-partition")
        assert encode["cachingOptions"] == {}  # never a KFP cache hit: its key does not see the store
        label = spec["components"][encode["componentRef"]["name"]]["executorLabel"]
        res = execs[label]["container"]["resources"]
        assert res["accelerator"]["resourceCount"] == "1" and res["resourceCpuLimit"] == gpu.cpu_limit
        assert k8s[label]["secretAsEnv"][0]["secretName"] == "anyflow-s3"  # publishes into the store
        assert merge["cachingOptions"] == {"enableCache": True}
    # one fingerprint task per dataset, as without partitions: the plan adds no task of its own
    fingerprints = [
        n for n, (_, t) in tasks.items() if t["componentRef"]["name"].startswith("comp-source-fingerprint")
    ]
    assert len(fingerprints) == count


def test_partition_parallelism_is_a_checked_platform_setting() -> None:
    assert Platform.from_dict({"partition_parallelism": 16}).partition_parallelism == 16
    for bad in (0, -1, "8", 1.5, True):
        with pytest.raises(PlatformError, match="partition_parallelism must be a whole number"):
            Platform.from_dict({"partition_parallelism": bad})


@pytest.mark.parametrize(("name", "count"), [("anyflow-t2v", 2), ("anyflow-rerun-prepare-data", 1)])
def test_prepare_fanout_merges_on_the_cpu_profile(name: str, count: int, tmp_path: Path) -> None:
    """``prepare_fanout: true``: the partition pods keep the prepare_data profile (its GPU), the task after the
    loop runs ``merge_only`` on the CPU-only ``prepare_merge`` profile, and the fingerprint task is told to refuse
    an unpartitioned run (issue 23, "Merge: a small CPU step")."""
    import dataclasses

    from pipelines.platform import MERGE_PROFILE

    base = Platform()
    gpu = dataclasses.replace(base.stages["prepare_data"], gpus=1, cpu_limit="12")
    plat = Platform.from_dict({"prepare_fanout": True, "partition_parallelism": 2,
                               "stages": {"prepare_data": {"gpus": 1, "cpu_limit": "12"},
                                          MERGE_PROFILE: {"cpu_limit": "3", "memory_limit": "6Gi"}}})
    spec, platform = _docs(compile_pipeline(name, tmp_path / "p.yaml", plat, image=IMAGE))
    assert _check(spec, platform) >= 3  # every executor is a valid KFP platform spec and Kubernetes pod
    tasks = _tasks(spec)
    execs = spec["deploymentSpec"]["executors"]
    merges = {n: t for n, (_, t) in tasks.items() if t["componentRef"]["name"].startswith("comp-prepare-data")}
    assert len(merges) == count
    for merge in merges.values():
        assert merge["inputs"]["parameters"]["merge_only"] == {"runtimeValue": {"constant": True}}
        res = execs[spec["components"][merge["componentRef"]["name"]]["executorLabel"]]["container"]["resources"]
        assert "accelerator" not in res and res["resourceCpuLimit"] == "3" and res["resourceMemoryLimit"] == "6Gi"
        (loop_name,) = [d for d in merge["dependentTasks"] if d.startswith("for-loop")]
        loop = tasks[loop_name][1]
        (encode,) = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"].values()
        label = spec["components"][encode["componentRef"]["name"]]["executorLabel"]
        enc = execs[label]["container"]["resources"]
        assert enc["accelerator"]["resourceCount"] == "1" and enc["resourceCpuLimit"] == gpu.cpu_limit
        (plan_name,) = loop["dependentTasks"]
        assert tasks[plan_name][1]["inputs"]["parameters"]["fanout"] == {"runtimeValue": {"constant": True}}
    # without the flag the same pipeline keeps one prepare_data task that encodes or merges, on its own profile
    spec, _ = _docs(compile_pipeline(name, tmp_path / "q.yaml", dataclasses.replace(plat, prepare_fanout=False),
                                     image=IMAGE))
    for n, (_, t) in _tasks(spec).items():
        assert "merge_only" not in t.get("inputs", {}).get("parameters", {}), n
        assert "fanout" not in t.get("inputs", {}).get("parameters", {}), n


def test_prepare_fanout_is_a_checked_platform_setting() -> None:
    assert Platform.from_dict({"prepare_fanout": True}).prepare_fanout is True
    assert Platform().prepare_fanout is False
    for key in ("prepare_fanout", "caching"):
        for bad in ("true", 1, None):
            with pytest.raises(PlatformError, match=f"{key} must be true or false"):
                Platform.from_dict({key: bad})
