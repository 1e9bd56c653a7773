"""scripts/cluster-acceptance.sh --dry-run: every command and object it would run or apply, no cluster.

A fake ``kubectl`` first on PATH records every call and refuses all but ``kubectl kustomize`` (the only
call that needs no API server), so a dry run that touched a cluster fails here. The printed objects are
checked against the rendered local overlay, the printed anyflow commands against ``anyflow <cmd> --help``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cluster-acceptance.sh"
ANYFLOW = ROOT / ".venv" / "bin" / "anyflow"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[list[str]]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl with built-in kustomize is not installed")
    bindir = tmp_path_factory.mktemp("bin")
    log = bindir / "kubectl.log"
    fake = bindir / "kubectl"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {shlex.quote(str(log))}\n'
                    f'[ "$1" = kustomize ] || {{ echo "fake kubectl: $* needs a cluster" >&2; exit 99; }}\n'
                    f'exec {shlex.quote(kubectl)} "$@"\n')
    fake.chmod(0o755)
    for tool in ("curl", "kind"):  # nothing else may reach a server either
        (bindir / tool).write_text(f"#!/bin/sh\necho 'fake {tool}: called' >&2\nexit 99\n")
        (bindir / tool).chmod(0o755)
    (bindir / "rm").write_text("#!/bin/sh\nexit 0\n")  # keep the script's work folder (its platform files)
    (bindir / "rm").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "KFP_HOST": "http://kfp.test:8888",
           "ANYFLOW_BUCKET": "accept-bucket", "TMPDIR": str(tmp_path_factory.mktemp("work"))}
    env.pop("ANYFLOW_IMAGE", None)
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--image", "registry.test/anyflow-train:1.0-abc",
                          "--namespace", "team-a", "--kueue-queue", "gpu-team-a"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    calls = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return res.stdout, calls


def _commands(out: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _anyflow(out: str, sub: str) -> list[list[str]]:
    return [c[1:] for c in _commands(out) if c and c[0].endswith("anyflow") and len(c) > 1 and c[1] == sub]


def test_dry_run_calls_no_cluster(dry_run) -> None:
    out, calls = dry_run
    assert calls and all(c[0] == "kustomize" for c in calls), calls
    assert "ALL CHECKS PASSED (dry run" in out


def test_dry_run_prints_the_objects_it_applies(dry_run) -> None:
    out, _ = dry_run
    docs = [d for d in yaml.safe_load_all(out.split("+ kubectl kustomize ", 1)[1].split("\n", 1)[1]
                                          .split("\n+ kubectl apply", 1)[0]) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert kinds == {("Role", "anyflow-launcher"), ("RoleBinding", "anyflow-launcher"), ("Service", "anyflow-minio"),
                     ("Deployment", "anyflow-minio"), ("PersistentVolumeClaim", "anyflow-minio-data")}
    assert {d["metadata"]["namespace"] for d in docs} == {"team-a"}
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "team-a"}]
    assert not any(d["kind"] == "Secret" for d in docs)
    # the platform the pipeline pods get points at that MinIO, in that namespace
    assert "s3_endpoint: http://anyflow-minio.team-a.svc.cluster.local:9000" in out


def test_dry_run_steps_in_order(dry_run) -> None:
    out, _ = dry_run
    steps = re.findall(r"^== step \d+: (.*)$", out, flags=re.M)
    keys = ["prerequisites", "S3 secret", "local overlay", "tiny pipeline", "cached rerun", "forced rerun",
            "partitioned prepare_data", "schedule", "2-node CPU TrainJob", "cancel", "Kueue"]
    assert len(steps) == len(keys) and all(k in s for k, s in zip(keys, steps, strict=True)), steps
    assert out.count("check: ") >= 10
    for install in ("kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=$PIPELINE_VERSION",
                    "PIPELINE_VERSION=2.17.0", "trainer.git/manifests/overlays/manager?ref=v2.3.0"):
        assert install in out


def test_secret_is_created_not_applied_and_keys_not_printed(dry_run) -> None:
    out, _ = dry_run
    (create,) = [c for c in _commands(out) if c[:2] == ["kubectl", "-n"] and "secret" in c]
    assert create[2:6] == ["team-a", "create", "secret", "generic"] and create[6] == "anyflow-s3"
    assert {a.split("=")[0] for a in create if a.startswith("--from-literal=")} == {
        "--from-literal"} and "AWS_ACCESS_KEY_ID=<access key>" in " ".join(create)


def _flags(sub: str) -> set[str]:
    res = subprocess.run([str(ANYFLOW), sub, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return set(re.findall(r"(--[a-z][a-z-]*)", res.stdout))


@pytest.mark.parametrize("sub", ["compile", "submit", "rerun", "schedule", "status"])
def test_anyflow_commands_use_existing_flags(dry_run, sub: str) -> None:
    if not ANYFLOW.exists():
        pytest.skip("no .venv/bin/anyflow")
    out, _ = dry_run
    cmds = _anyflow(out, sub)
    assert cmds, sub
    known = _flags(sub) | {"--namespace"}
    for cmd in cmds:
        assert {a.split("=")[0] for a in cmd if a.startswith("--")} <= known, (sub, cmd)


def test_the_runs_it_checks(dry_run) -> None:
    out, _ = dry_run
    (submit,) = _anyflow(out, "submit")
    assert ["--pipeline", "anyflow-t2v"] == submit[submit.index("--pipeline"):][:2]
    assert "--preset" in submit and submit[submit.index("--preset") + 1] == "tiny"
    assert submit[submit.index("--store") + 1] == "s3://accept-bucket/acceptance"
    assert submit[submit.index("--host") + 1] == "http://kfp.test:8888"
    assert submit[submit.index("--image") + 1] == "registry.test/anyflow-train:1.0-abc"
    reruns = _anyflow(out, "rerun")
    assert [r[r.index("--stage") + 1] for r in reruns] == ["evaluate", "evaluate", "prepare_data", "prepare_data",
                                                           "prepare_data",
                                                           "train_teacher", "train_teacher", "train_teacher"]
    assert all(r[r.index("--run") + 1] == "RUN_ID" for r in reruns if "--run" in r)
    assert ["--force" in r for r in reruns] == [False, True, False, False, False, False, False, False]
    (schedule,) = _anyflow(out, "schedule")
    assert schedule[schedule.index("--pipeline") + 1] == "anyflow-redistill"
    assert schedule[schedule.index("--cron") + 1] == "* * * * *"
    assert "num_nodes: 2\n    gpus: 0" in out
    cmds = [" ".join(c) for c in _commands(out)]
    assert any("recurringruns/RECURRING_RUN_ID:disable" in c for c in cmds)
    assert any("runs/CANCEL_RUN_ID:terminate" in c for c in cmds)
    assert any(c.startswith("kubectl -n team-a wait --for=delete trainjob.trainer.kubeflow.org/") for c in cmds)


def test_script_fails_loudly_without_an_image() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ANYFLOW_IMAGE"}
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 2 and "ANYFLOW_IMAGE" in res.stderr


def test_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    res = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("sub", ["submit", "schedule"])
def test_the_printed_kfp_commands_are_accepted_by_the_cli(dry_run, sub: str, monkeypatch) -> None:
    # Each submit/schedule the script runs goes through the real CLI and the real kfp.Client to a recording KFP
    # API (a double for the server, not evidence about it): every flag, parameter and platform file is accepted
    # and the request carries the run's arguments. Catches what --help cannot: a flag the pipeline has no
    # parameter for, a missing required parameter, the image check.
    from helpers.kfp_api import Recorder, serve

    from anyflow import cli

    out, _ = dry_run
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    monkeypatch.setenv("KUBECONFIG", "/nonexistent")
    rec = Recorder()
    with serve(rec) as url:
        for cmd in _anyflow(out, sub):
            argv = [sub, *cmd[1:]]
            argv[argv.index("--host") + 1] = url
            argv = [a.replace("TEACHER_URI", "s3://accept-bucket/acceptance/artifacts/train_teacher/k") for a in argv]
            assert cli.main(argv) == 0, argv
    posted = [r for r in rec.requests if r["method"] == "POST" and "/experiments" not in r["path"]]
    assert len(posted) == len(_anyflow(out, sub)) >= 1
    for request in posted:
        body = request["body"]
        assert body["pipeline_spec"]  # the compiled pipeline went with it
        spec = body["pipeline_spec"].get("pipeline_spec", body["pipeline_spec"])
        images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
        assert "registry.test/anyflow-train:1.0-abc" in images
    experiments = [r["body"] for r in rec.requests if r["method"] == "POST" and "/experiments" in r["path"]]
    assert experiments and all(e["namespace"] == "team-a" for e in experiments)


def test_the_printed_store_reads_are_the_commands_it_runs(dry_run) -> None:
    # A pasted read of a run record must work: the printed command sets MinIO's alias with the root keys first
    # (mc's default "local" alias has no credentials), exactly as the script's own read does.
    out, _ = dry_run
    reads = [c for c in _commands(out) if c[:1] == ["kubectl"] and "exec" in c and "deploy/anyflow-minio" in c]
    cat = [c for c in reads if any("mc --config-dir /tmp/mc cat" in a for a in c)]
    assert len(cat) == 3, reads
    for cmd in cat:
        assert cmd[-3:-1] == ["sh", "-c"] and cmd[-1].startswith("mc --config-dir /tmp/mc alias set local "), cmd
        assert "$MINIO_ROOT_USER" in cmd[-1] and "/acceptance/runs/" in cmd[-1]


def test_the_new_cluster_checks_read_what_upstream_writes(dry_run) -> None:
    # The forced rerun, the partition loop and the Kueue step read objects KFP/Argo/Kueue create; the names they
    # look for are the upstream ones (kubeflow/pipelines 2.17.0 backend/src/common/util/consts.go
    # LabelKeyWorkflowRunId "pipeline/runid", argocompiler/argo.go paramCachedDecision "cached-decision",
    # argocompiler/dag.go iterator template "<component>-<task>-iterator" and task "iteration-iterations";
    # kubernetes-sigs/kueue pkg/controller/constants QueueLabel).
    out, _ = dry_run
    cmds = [" ".join(c) for c in _commands(out)]
    workflows = [c for c in cmds if c.startswith("kubectl -n team-a get workflows.argoproj.io -l pipeline/runid=")]
    assert [c.split("pipeline/runid=")[1].split()[0] for c in workflows] == [
        "FORCE_RUN_ID", "PARTITIONS1_RUN_ID", "PARTITIONS2_RUN_ID", "PARTITIONS3_RUN_ID"]
    script = SCRIPT.read_text()
    for name in ('"cached-decision"', '-iterator")', r"iteration-iterations\(\d+", "kueue.x-k8s.io/queue-name"):
        assert name in script, name
    assert "partition_parallelism: 2\nprepare_fanout: true" in out and "kueue_queue: gpu-team-a" in out
    assert "kubectl -n team-a get localqueues.kueue.x-k8s.io gpu-team-a" in cmds
    pods = [c for c in cmds if c.startswith("kubectl -n team-a get pods -l workflows.argoproj.io/workflow=")]
    assert pods == ["kubectl -n team-a get pods -l workflows.argoproj.io/workflow=WORKFLOW_OF_PARTITIONS1_RUN_ID -o json"]
    assert "workflows.argoproj.io/node-id" in script  # Argo v4.0.5 common.AnnotationKeyNodeID
    parts = [r for r in _anyflow(out, "rerun") if r[r.index("--stage") + 1] == "prepare_data"]
    assert [r[r.index("--set") + 1] for r in parts] == ["data.partition_size=4"] * 2 + ["data.partition_size=0"]
    assert all(r[r.index("--platform") + 1].endswith("platform-partitions.yaml") for r in parts)


def _submitted_tasks(argv: list[str], monkeypatch) -> list[tuple[str, bool]]:
    """(task name, caching_options.enable_cache) of every task of the spec the CLI submits, read with the upstream
    kfp-pipeline-spec protobuf (``PipelineSpec``, strict: an unknown field fails)."""
    from google.protobuf import json_format
    from helpers.kfp_api import Recorder, serve
    from kfp.pipeline_spec import pipeline_spec_pb2

    from anyflow import cli

    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    monkeypatch.setenv("KUBECONFIG", "/nonexistent")
    rec = Recorder()
    with serve(rec) as url:
        assert cli.main([*argv, "--host", url]) == 0, argv
    (body,) = [r["body"] for r in rec.requests if r["method"] == "POST" and "/experiments" not in r["path"]]
    assert "enable_caching" not in json.dumps(body)  # no run-level override of the tasks' own options
    raw = body["pipeline_spec"].get("pipeline_spec", body["pipeline_spec"])
    spec = json_format.ParseDict(raw, pipeline_spec_pb2.PipelineSpec())
    dags = [spec.root.dag, *(c.dag for c in spec.components.values() if c.HasField("dag"))]
    return [(name, task.caching_options.enable_cache) for dag in dags for name, task in dag.tasks.items()
            if not spec.components[task.component_ref.name].HasField("dag")]


def test_forced_rerun_submits_every_task_uncached(tmp_path: Path, monkeypatch) -> None:
    # KFP 2.17.0's driver reuses a cached execution only if the task's caching_options.enable_cache is true
    # (backend/src/v2/driver/container.go); rerun --force must submit every container task with it false, while
    # the same rerun without --force keeps the stage task cacheable (so this test can tell them apart).
    argv = ["rerun", "--stage", "prepare_data", "--store", str(tmp_path / "store"), "--namespace", "team-a",
            "--preset", "tiny", "--image", "registry.test/anyflow-train:1.0-abc", "--set", "data.partition_size=4"]
    plain = _submitted_tasks(argv, monkeypatch)
    forced = _submitted_tasks([*argv, "--force"], monkeypatch)
    assert {n for n, _ in plain} == {n for n, _ in forced} and len(forced) >= 3  # fingerprint, partition, merge
    assert dict(plain)["prepare-data"] is True
    assert not any(cached for _, cached in forced), forced


def _check_program(function: str) -> str:
    """The Python program inside the script's shell function ``function`` (its ``python3 -c '...'``)."""
    body = SCRIPT.read_text().split(f"{function}() {{", 1)[1].split("\n}\n", 1)[0]
    return body.split("python3 -c '\nimport", 1)[1].split("' \"$wf\"", 1)[0].join(["import", ""])


@pytest.mark.parametrize("case", ["ok", "gpu", "other-profile", "retry-node"])
def test_the_merge_pod_check_finds_the_executor_pod_and_its_resources(tmp_path: Path, case: str) -> None:
    # check_cpu_merge's parsing, on the shapes Argo v4.0.5 writes (status.nodes by id with displayName / type /
    # children; pods annotated workflows.argoproj.io/node-id; a task with retries has a Retry node whose children
    # are the pods). A partition pod with a GPU must not count; the merge pod's own GPU, or resources that are not
    # the prepare_merge profile's, must fail it.
    retry = case == "retry-node"
    nodes = {
        "wf-1": {"displayName": "prepare-data-driver", "type": "Pod", "children": []},
        "wf-2": {"displayName": "prepare-data", "type": "DAG", "children": ["wf-3"]},
        "wf-3": {"displayName": "executor", "type": "Retry" if retry else "Pod",
                 "children": ["wf-5", "wf-6"] if retry else []},
        "wf-4": {"displayName": "executor", "type": "Pod", "children": []},  # a partition iteration's pod
        "wf-5": {"displayName": "executor(0)", "type": "Pod", "children": []},
        "wf-6": {"displayName": "executor(1)", "type": "Pod", "children": []},
    }
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"items": [{"metadata": {"name": "wf"}, "status": {"nodes": nodes}}]}))
    gpu_res = {"limits": {"nvidia.com/gpu": "1", "memory": "3Gi"}, "requests": {"cpu": "300m"}}
    merge_res = {"requests": {"cpu": "0.3", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "3221225472"}}
    merge_res = {"gpu": gpu_res, "other-profile": {"requests": {"cpu": "500m"}, "limits": {"memory": "4Gi"}}}.get(
        case, merge_res)

    def pod(node: str, res: dict) -> dict:
        return {"metadata": {"name": f"pod-{node}", "annotations": {"workflows.argoproj.io/node-id": node}},
                "spec": {"containers": [{"name": "wait"}, {"name": "main", "resources": res}]}}

    merge_pods = ["wf-5", "wf-6"] if retry else ["wf-3"]
    pods = {"items": [pod("wf-1", {}), *(pod(n, merge_res) for n in merge_pods), pod("wf-4", gpu_res)]}

    def check(listing: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _check_program("check_cpu_merge"), str(wf), "300m", "3Gi"],
                              input=json.dumps(listing), capture_output=True, text=True, timeout=60)

    res = check(pods)
    assert res.returncode == (0 if case in ("ok", "retry-node") else 1), res.stdout + res.stderr
    assert f"merge pods: {[f'pod-{n}' for n in merge_pods]}" in res.stdout
    assert check({"items": [pod("wf-4", {})]}).returncode == 1  # no merge pod found is a failure, not a pass


def test_the_partition_platform_gives_the_merge_its_own_resources() -> None:
    # What step 7 appends to the local platform parses, and only prepare_merge gets 300m / 3Gi / one retry.
    from pipelines.platform import Platform

    text = (ROOT / "manifests" / "overlays" / "local" / "platform.yaml").read_text()
    appended = re.search(r"printf '(partition_parallelism: 2.*?)' >>\"\$PLATFORMP\"", SCRIPT.read_text())
    text += appended.group(1).encode().decode("unicode_escape")
    plat = Platform.from_dict(yaml.safe_load(text), source="platform-partitions.yaml")
    merge = plat.stages["prepare_merge"]
    assert (merge.cpu_request, merge.memory_limit, merge.retries, merge.gpus) == ("300m", "3Gi", 1, 0)
    assert all((r.cpu_request, r.memory_limit) != ("300m", "3Gi") for n, r in plat.stages.items() if n != "prepare_merge")
    assert plat.prepare_fanout is True and plat.partition_parallelism == 2
