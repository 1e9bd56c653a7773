"""Compile-golden tests: every pipeline equals its committed YAML; platform settings reach the YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.compile import COMPILED_DIR, PIPELINES, compile_pipeline, compile_pipeline_func
from pipelines.platform import Platform, PlatformError
from pipelines.rerun import RerunError, build_rerun_pipeline


@pytest.fixture(autouse=True)
def _release_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)  # goldens use the release tag
    monkeypatch.delenv("ANYFLOW_EVAL_IMAGE", raising=False)


def _docs(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_compile_matches_golden(name: str, tmp_path: Path) -> None:
    out = compile_pipeline(name, tmp_path / f"{name}.yaml")
    golden = COMPILED_DIR / f"{name}.yaml"
    assert golden.is_file(), f"missing golden {golden}; run python -m pipelines.compile"
    assert out.read_text() == golden.read_text(), f"{name}: compiled YAML differs from {golden}; run python -m pipelines.compile"


def test_compile_is_deterministic(tmp_path: Path) -> None:
    a = compile_pipeline("anyflow-t2v", tmp_path / "a.yaml").read_bytes()
    b = compile_pipeline("anyflow-t2v", tmp_path / "b.yaml").read_bytes()
    assert a == b


def test_t2v_structure_and_platform_settings() -> None:
    spec, plat = _docs(COMPILED_DIR / "anyflow-t2v.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    assert {"prepare-data", "train-teacher", "train-flowmap", "distill", "evaluate"} <= set(tasks)
    assert tasks["distill"]["dependentTasks"] == ["prepare-data", "train-flowmap", "train-teacher"]
    (ft,) = [t for t in tasks.values() if t["taskInfo"]["name"] == "finetune-enabled"]
    assert "finetune" in ft["triggerPolicy"]["condition"]
    inner = spec["components"][ft["componentRef"]["name"]]["dag"]["tasks"]
    assert {"finetune", "evaluate-2", "prepare-data-2"} <= set(inner)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["preset"]["defaultValue"] == "tiny" and params["finetune"]["defaultValue"] is False

    execs = spec["deploymentSpec"]["executors"]
    for name, exe in execs.items():
        image = exe["container"]["image"]
        # evaluate steps run on the eval image (the train image + VBench's own venv), with the same tag
        repo = "anyflow-eval" if name.startswith("exec-evaluate") else "anyflow-train"
        # the committed YAML names the placeholder, never a tag the build does not push (submit injects --image)
        assert image == f"ghcr.io/anyflow/{repo}:unset-pass-image", (name, image)
        assert "pip install" not in " ".join(exe["container"]["command"])  # no packages_to_install
    gpu = execs["exec-distill"]["container"]["resources"]
    assert gpu["accelerator"]["resourceType"] == "nvidia.com/gpu" and gpu["accelerator"]["resourceCount"] == "8"
    assert gpu["resourceMemoryLimit"] == "512Gi"
    assert "accelerator" not in execs["exec-prepare-data"]["container"]["resources"]
    assert tasks["distill"]["retryPolicy"] == {"backoffDuration": "60s", "backoffFactor": 2.0,
                                               "backoffMaxDuration": "3600s", "maxRetryCount": 2}
    assert tasks["distill"]["cachingOptions"]["enableCache"] is True

    k8s = plat["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    d = k8s["exec-distill"]
    assert d["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    # no GPU-type selector by default: a label only some clusters carry would leave the pod Pending
    assert "nodeSelector" not in d, d.get("nodeSelector")
    assert d["secretAsEnv"][0]["secretName"] == "anyflow-s3"
    assert {e["envVar"] for e in d["secretAsEnv"][0]["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "64Gi", "volumeName": "dshm"} in d["emptyDirMounts"]
    assert d["pvcMount"][0]["constant"] == "anyflow-model-cache" and d["pvcMount"][0]["mountPath"] == "/cache/models"
    assert d["imagePullPolicy"] == "IfNotPresent"
    assert d["securityContext"]["runAsNonRoot"] is True
    assert d["activeDeadlineSeconds"] == str(72 * 3600)
    assert "tolerations" not in k8s["exec-prepare-data"]
    # Every task learns its KFP run from the pod's Argo workflow label: a retry's bad-input marker (issue 9),
    # and the multi-node launcher's job name per (run, stage), also without retries (issue 16).
    run_env = {"name": "ANYFLOW_KFP_RUN", "fieldPath": "metadata.labels['workflows.argoproj.io/workflow']"}
    assert run_env in d["fieldPathAsEnv"]
    for task_name, task in tasks.items():
        exe = task.get("componentRef", {}).get("name", "").replace("comp-", "exec-")
        if exe in k8s:
            assert run_env in k8s[exe].get("fieldPathAsEnv", []), task_name


RUN_ID = "{{$.pipeline_job_uuid}}"  # what dsl.PIPELINE_JOB_ID_PLACEHOLDER compiles to
#: The record entries each golden writes (one record task per stage task); redistill keeps no stage records.
RECORD_ENTRIES = {
    "anyflow-t2v": {"prepare_data", "train_teacher", "train_flowmap", "distill", "evaluate",
                    "prepare_finetune_data", "finetune", "evaluate_finetuned"},
    "anyflow-evaluate-only": {"evaluate"},
    **{f"anyflow-rerun-{s.replace('_', '-')}": {s} for s in
       ("prepare_data", "train_teacher", "train_flowmap", "distill", "finetune", "evaluate")},
}
RECORD_ENTRIES["anyflow-far"] = RECORD_ENTRIES["anyflow-t2v"]


def _walk_tasks(spec: dict):
    """``(dag component name, task name, task)`` for every task of the root DAG and of every sub-DAG."""
    yield from (("root", n, t) for n, t in spec["root"]["dag"]["tasks"].items())
    for comp, body in spec["components"].items():
        for n, t in (body.get("dag") or {}).get("tasks", {}).items():
            yield comp, n, t


def _stage_and_record_tasks(spec: dict) -> tuple[dict, dict]:
    """Stage tasks (a container executor that is not record_stage) and record tasks, by task name, plus for
    each record task the task whose output it records (through its ``dsl.If`` sub-DAG's input)."""
    comps = spec["components"]
    stages, records = {}, {}
    for dag, name, task in _walk_tasks(spec):
        ref = task["componentRef"]["name"]
        if "dag" in comps[ref] or "importer" in spec["deploymentSpec"]["executors"][comps[ref]["executorLabel"]]:
            continue
        if ref.startswith("comp-source-fingerprint"):  # not a stage: test_prepare_data_takes_the_uncached_...
            continue
        if ref.startswith("comp-prepare-partition"):  # not a stage of its own: tests/test_pipeline_partitions.py
            continue
        if ref.startswith("comp-export"):  # the optional export step, not a stage: tests/test_export.py
            continue
        (records if ref.startswith("comp-record-stage") else stages)[name] = (dag, task)
    parents = {t["componentRef"]["name"]: t for _, _, t in _walk_tasks(spec) if "dag" in comps[t["componentRef"]["name"]]}
    producers = {}
    for name, (dag, task) in records.items():
        channel = task["inputs"]["artifacts"]["artifact"]["componentInputArtifact"]
        producers[name] = parents[dag]["inputs"]["artifacts"][channel]["taskOutputArtifact"]["producerTask"]
    return stages, {n: (*records[n], producers[n]) for n in records}


@pytest.mark.parametrize("name", sorted(RECORD_ENTRIES))
def test_stage_tasks_are_cacheable_and_record_tasks_always_run(name: str) -> None:
    """No stage task receives the run id (its KFP cache key is the same in every run, so KFP's cache can
    skip it and no GPU pod starts); the run id goes only to one CPU-only, never-cached record task per
    stage task, which runs only when a store is given."""
    spec, plat = _docs(COMPILED_DIR / f"{name}.yaml")
    execs = spec["deploymentSpec"]["executors"]
    k8s = plat["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    stages, records = _stage_and_record_tasks(spec)
    comps = spec["components"]
    for task_name, (_dag, task) in stages.items():
        assert RUN_ID not in yaml.safe_dump(task["inputs"]), f"{name}: {task_name} receives the run id"
        assert not {"run_id", "record_as"} & set(comps[task["componentRef"]["name"]]["inputDefinitions"]["parameters"])
        assert task["cachingOptions"] == {"enableCache": True}, task_name
    assert sorted(p for *_, p in records.values()) == sorted(stages)  # one record task per stage task
    entries = set()
    for task_name, (dag, task, _producer) in records.items():
        params = task["inputs"]["parameters"]
        assert params["run_id"]["runtimeValue"]["constant"] == RUN_ID
        entries.add(params["entry"]["runtimeValue"]["constant"])
        assert task["cachingOptions"] == {}, f"{name}: {task_name} may be skipped by KFP's cache"
        exe = comps[task["componentRef"]["name"]]["executorLabel"]
        res = execs[exe]["container"]["resources"]
        assert "accelerator" not in res and res["resourceCpuLimit"] == "500m" and res["resourceMemoryLimit"] == "1Gi"
        assert "tolerations" not in k8s[exe] and "nodeSelector" not in k8s[exe]
        assert k8s[exe]["secretAsEnv"][0]["secretName"] == "anyflow-s3"  # writes the record into the store
        (guard,) = [t for _, _, t in _walk_tasks(spec) if t["componentRef"]["name"] == dag]
        assert guard["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--store'] != ''"
    assert entries == RECORD_ENTRIES[name]


def test_far_pipeline_is_the_training_dag_with_a_far_preset() -> None:
    far, _ = _docs(COMPILED_DIR / "anyflow-far.yaml")
    t2v, _ = _docs(COMPILED_DIR / "anyflow-t2v.yaml")
    assert far["pipelineInfo"]["name"] == "anyflow-far"
    params = far["root"]["inputDefinitions"]["parameters"]
    assert params["preset"]["defaultValue"] == "far-tiny"
    assert "far-1.3b" in params["preset"]["description"]
    # the same stages and wiring; the preset's variant picks the causal methods inside the stages
    strip = lambda tasks: {k: {kk: vv for kk, vv in v.items() if kk != "taskInfo"} for k, v in tasks.items()}  # noqa: E731
    assert strip(far["root"]["dag"]["tasks"]) == strip(t2v["root"]["dag"]["tasks"])


def test_platform_yaml_overrides_reach_compiled_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "platform.yaml"
    cfg.write_text(
        "s3_endpoint: http://minio.example:9000\nmodel_cache_pvc: ''\ncaching: false\n"
        "defaults: {retries: 0}\n"
        "stages:\n  distill:\n    gpus: 2\n    gpu_product: NVIDIA-A100-SXM4-80GB\n"
        "    tolerations: [{key: pool, operator: Equal, value: a100, effect: NoExecute}]\n"
    )
    from pipelines.anyflow_t2v import build_t2v_pipeline

    out = compile_pipeline_func(build_t2v_pipeline(Platform.from_yaml(cfg)), tmp_path / "p.yaml")
    spec, plat = _docs(out)
    assert spec["deploymentSpec"]["executors"]["exec-distill"]["container"]["resources"]["accelerator"]["resourceCount"] == "2"
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"]["exec-distill"]["container"]["env"]}
    assert env["AWS_ENDPOINT_URL"] == "http://minio.example:9000"
    d = plat["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-distill"]
    assert d["tolerations"] == [{"effect": "NoExecute", "key": "pool", "operator": "Equal", "value": "a100"}]
    assert d["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert "pvcMount" not in d and any(m["mountPath"] == "/cache/models" for m in d["emptyDirMounts"])
    tasks = spec["root"]["dag"]["tasks"]
    assert "retryPolicy" not in tasks["distill"] and tasks["distill"]["cachingOptions"] == {}
    # no retries, yet the run tag: a launcher started again for the same run must find its job by name
    assert d["fieldPathAsEnv"] == [{"name": "ANYFLOW_KFP_RUN",
                                    "fieldPath": "metadata.labels['workflows.argoproj.io/workflow']"}]


@pytest.mark.parametrize("text, key", [
    ("gpu_count: 1\n", "gpu_count"),
    ("stages: {distil: {gpus: 1}}\n", "distil"),
    ("stages: {distill: {gpu: 1}}\n", "gpu"),
    ("defaults: {tolerations: [{key: a, effct: NoSchedule}]}\n", "effct"),
])
def test_platform_unknown_keys_are_errors(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(PlatformError, match=repr(key)):
        Platform.from_yaml(cfg)


def test_rerun_pipeline_passes_given_uris_as_string_parameters(tmp_path: Path) -> None:
    # No importers (their metadata is not resolved by the backend and their artifacts are downloaded whole):
    # each <role>_uri pipeline parameter goes straight to the stage task (tests/test_rerun_backend.py).
    uris = {"dataset": "s3://b/artifacts/prepare_data/k1", "teacher": "s3://b/artifacts/train_teacher/k2",
            "flowmap": "s3://b/artifacts/train_flowmap/k3"}
    out = compile_pipeline_func(build_rerun_pipeline("distill", uris), tmp_path / "r.yaml")
    spec, k8s = _docs(out)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"distill", "condition-1"}  # the stage and its record task
    assert tasks["condition-1"]["taskInfo"]["name"] == "record-distill"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {r: params[f"{r}_uri"]["defaultValue"] for r in uris} == uris
    assert not [e for e in spec["deploymentSpec"]["executors"].values() if "importer" in e]
    inputs = tasks["distill"]["inputs"]
    assert "artifacts" not in inputs
    assert {r: inputs["parameters"][f"{r}_uri"] for r in uris} == {
        r: {"componentInputParameter": f"{r}_uri"} for r in uris}
    # a training stage's pod runs one process per GPU the platform gives it (8 by default), with a sized /dev/shm
    gpus = spec["deploymentSpec"]["executors"]["exec-distill"]["container"]["resources"]["accelerator"]
    assert inputs["parameters"]["nproc_per_node"]["runtimeValue"]["constant"] == int(gpus["resourceCount"]) == 8
    shm = k8s["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-distill"]["emptyDirMounts"]
    assert {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "64Gi", "volumeName": "dshm"} in shm


def test_one_pod_training_stages_get_a_process_per_gpu(tmp_path: Path) -> None:
    from pipelines.anyflow_t2v import build_t2v_pipeline

    plat = Platform.from_dict({"stages": {"train_teacher": {"gpus": 4}, "train_flowmap": {"gpus": 0}}})
    spec, _ = _docs(compile_pipeline_func(build_t2v_pipeline(plat), tmp_path / "p.yaml"))
    tasks = {n: t for _, n, t in _walk_tasks(spec)}
    nproc = {n: t["inputs"]["parameters"].get("nproc_per_node", {}).get("runtimeValue", {}).get("constant")
             for n, t in tasks.items() if "parameters" in t.get("inputs", {})}
    assert nproc["train-teacher"] == 4 and nproc["train-flowmap"] == 1  # no GPUs: one process
    assert nproc["distill"] == 8 and nproc["finetune"] == 8
    assert nproc["prepare-data"] is None and nproc["evaluate"] is None  # not training stages


def test_rerun_rejects_unknown_stage_and_role() -> None:
    with pytest.raises(RerunError, match="unknown stage 'distil'"):
        build_rerun_pipeline("distil")
    with pytest.raises(RerunError, match="no input role 'teacher'"):
        build_rerun_pipeline("train_flowmap", {"teacher": "s3://b/x"})


def test_multinode_stage_becomes_trainjob_launcher(tmp_path: Path) -> None:
    from pipelines.anyflow_t2v import build_t2v_pipeline

    plat = Platform.from_dict({"trainjob_api": "pytorchjob", "stages": {"distill": {"num_nodes": 4, "gpus": 8}}})
    spec, k8s = _docs(compile_pipeline_func(build_t2v_pipeline(plat), tmp_path / "mn.yaml"))
    tasks = spec["root"]["dag"]["tasks"]
    assert "distill" not in tasks and "trainjob" in tasks
    params = {k: v["runtimeValue"]["constant"] for k, v in tasks["trainjob"]["inputs"]["parameters"].items()
              if "runtimeValue" in v}
    assert params["stage"] == "distill" and params["num_nodes"] == 4 and params["gpus_per_node"] == 8
    assert params["api"] == "pytorchjob" and params["image"] == "ghcr.io/anyflow/anyflow-train:unset-pass-image"  # the workers run the pipeline image
    gen = tasks["evaluate"]["inputs"]["artifacts"]["generator"]["taskOutputArtifact"]
    assert gen == {"outputArtifactKey": "result", "producerTask": "trainjob"}
    assert RUN_ID not in yaml.safe_dump(tasks["trainjob"]["inputs"])  # cacheable like a one-pod stage
    records = _stage_and_record_tasks(spec)[1]
    assert {p for *_, p in records.values()} >= {"trainjob"}  # its result is recorded like any stage output
    launcher = spec["deploymentSpec"]["executors"]["exec-trainjob"]["container"]["resources"]
    assert "accelerator" not in launcher  # the launcher pod needs no GPU; the job's workers get them
    assert "tolerations" not in k8s["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-trainjob"]
    with pytest.raises(PlatformError, match="num_nodes"):
        Platform.from_dict({"stages": {"distill": {"num_nodes": 0}}})


def test_eval_image_follows_the_train_image(monkeypatch, tmp_path: Path) -> None:
    from components import eval_image_for
    from pipelines.anyflow_t2v import build_t2v_pipeline
    from pipelines.redistill import build_redistill_pipeline

    monkeypatch.delenv("ANYFLOW_EVAL_IMAGE", raising=False)
    train = "registry.example/team/anyflow-train:v0.1.0-0123456789ab"
    assert eval_image_for(train) == "registry.example/team/anyflow-eval:v0.1.0-0123456789ab"
    assert eval_image_for("registry.example/my-image:v1") == "registry.example/my-image:v1"  # not ours: as is
    digest = "registry.example/anyflow-train@sha256:" + "a" * 64
    assert eval_image_for(digest) == digest  # a digest belongs to one repository
    for build in (build_t2v_pipeline, build_redistill_pipeline):
        spec, _ = _docs(compile_pipeline_func(build(image=train), tmp_path / "p.yaml"))
        images = {n: e["container"]["image"] for n, e in spec["deploymentSpec"]["executors"].items()}
        evaluate = {n for n in images if "evaluate" in n}
        assert evaluate and all(images[n] == eval_image_for(train) for n in evaluate), images
        assert all(images[n] == train for n in set(images) - evaluate), images
    monkeypatch.setenv("ANYFLOW_EVAL_IMAGE", "registry.example/vbench-eval:v2")
    assert eval_image_for(train) == "registry.example/vbench-eval:v2"
    monkeypatch.setenv("ANYFLOW_EVAL_IMAGE", "registry.example/vbench-eval:latest")
    with pytest.raises(ValueError, match="immutable tag"):
        eval_image_for(train)


@pytest.mark.parametrize(("name", "count"), [("anyflow-t2v", 2), ("anyflow-far", 2), ("anyflow-rerun-prepare-data", 1)])
def test_prepare_data_takes_the_uncached_source_fingerprint(name: str, count: int, tmp_path: Path) -> None:
    # KFP keys a task on its inputs (kubeflow/pipelines 2.17.0 backend/src/v2/cacheutils/cache.go: parameter
    # values, artifact names, image, command), never on what a URL holds. Every prepare_data task must take the
    # output of a fingerprint task that is never cached, or new videos under the same prefix are a cache hit.
    spec, _ = _docs(compile_pipeline(name, tmp_path / "p.yaml", Platform()))
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    tasks = {name: task for dag in dags for name, task in dag["tasks"].items()}
    prepares = {n: t for n, t in tasks.items() if t["componentRef"]["name"].startswith("comp-prepare-data")}
    assert len(prepares) == count, sorted(prepares)  # t2v/far: training data and the fine-tuning branch's data
    for name, task in prepares.items():
        source = task["inputs"]["parameters"]["source_fingerprint"]["taskOutputParameter"]["producerTask"]
        producer = tasks[source]
        assert producer["componentRef"]["name"].startswith("comp-source-fingerprint"), name
        assert not producer.get("cachingOptions", {}).get("enableCache"), (name, producer.get("cachingOptions"))
        assert task["cachingOptions"]["enableCache"] is True  # prepare_data itself stays cacheable
