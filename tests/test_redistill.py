"""Periodic re-distillation against a real S3 server (moto on 127.0.0.1): window, warm start, gate,
promotion, rejection, rollback, overlapping runs, the report and the KFP pipeline.

The gate decisions are re-derived here from the recorded metrics with plain arithmetic (not with
``registry.gate``), and window contents are checked against the keys stored in the dataset shards.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import uuid
from pathlib import Path

import pytest
from safetensors import safe_open

from anyflow import registry, storage
from anyflow.ops import steps
from anyflow.ops import window as W
from anyflow.ops.redistill import RedistillConfig, gate_all_nfes, plan_run, redistill

# tiny and fast: 1 distill step, 5 frames at 16×16, NFE sweep {1, 2}, 2 prompts, 8-step reference
EV = {"distill.train.steps": 1, "data.frames": 5, "data.height": 16, "data.width": 16,
      "evaluate.nfes": "1,2", "evaluate.reference_steps": 8, "evaluate.num_prompts": 2}
BROKEN = {"distill.generator_optim.lr": 1.0, "distill.train.ema_decay": 0.0}  # one huge step, no EMA


def _store(s3_server) -> str:
    return f"s3://{s3_server.bucket}/redistill-{uuid.uuid4().hex[:8]}"


def _dataset_keys(uri: str) -> list[str]:
    local = storage.fetch(uri)
    keys: list[str] = []
    for shard in sorted(local.glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            keys += json.loads(f.metadata()["keys"])
    return sorted(keys)


def _stored_record(rec: dict) -> dict:
    return storage.read_json(storage.join(rec["store"], "redistill", rec["name"], "runs", rec["run_id"], "record.json"))


def _expected_ok(cand: dict, base: dict, rel: float = 0.05) -> bool:
    """The gate rule, independently: lower coupled_mse is better, tolerance rel·|live| at every NFE."""
    return all(float(cand[n]["coupled_mse"]) - float(base[n]["coupled_mse"]) <= rel * abs(float(base[n]["coupled_mse"]))
               for n in base)


def _alias_bytes(s3_server, store: str, name: str) -> bytes:
    key = store.split(f"s3://{s3_server.bucket}/", 1)[1] + f"/models/{name}/promoted.json"
    return s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()


@pytest.mark.slow
def test_three_runs_promote_reject_and_rollback(tiny_chain: dict, s3_server, tmp_path: Path) -> None:
    store, name = _store(s3_server), "t2v"
    teacher, flowmap = tiny_chain["teacher"].uri, tiny_chain["flowmap"].uri
    cfg = RedistillConfig(name=name, overrides=EV)

    # 1. first run, through the KFP task functions (plan → distill → evaluate → decide → finish):
    #    every item is new, the generator starts from the flow map, promoted by default
    conf = json.dumps(cfg.to_json())
    action, plan_url = steps.plan_step(store, "procedural:n=4,seed=0", teacher, flowmap=flowmap, config_json=conf,
                                       run_id="run-1")
    assert action == "run"
    cand_url = steps.distill_step(plan_url)
    r1 = steps.decide_step(plan_url, cand_url, steps.evaluate_step(plan_url, cand_url))
    assert r1["status"] == "promoted", r1
    assert steps.finish_step(store, conf, "run-1") == "promoted"
    assert registry.Lease(store, name).holder()["released"]  # the run lease was given back
    live = registry.promoted(store, name)
    assert live["uri"] == r1["candidate"]["uri"] and live["manifest_sha256"] == r1["candidate"]["digest"]
    assert _dataset_keys(r1["dataset"]) == [f"procedural-0-{i:06d}" for i in range(4)]
    inputs1 = storage.read_manifest(r1["candidate"]["uri"])["extra"]["inputs"]
    assert inputs1["flowmap"] == flowmap and "critic" not in inputs1

    # 2. new procedural data: only the 2 new items + a replay of 2 older ones; warm start from the live model
    r2 = redistill(store, "procedural:n=6,seed=0", teacher, flowmap=flowmap, cfg=cfg, run_id="run-2")
    w2 = storage.read_json(r2["window_url"])
    assert w2["new"] == ["procedural-0-000004", "procedural-0-000005"]
    assert len(w2["replay"]) == 2 and set(w2["replay"]) <= {f"procedural-0-{i:06d}" for i in range(4)}
    assert _dataset_keys(r2["dataset"]) == sorted(w2["new"] + w2["replay"])
    inputs2 = storage.read_manifest(r2["candidate"]["uri"])["extra"]["inputs"]
    assert inputs2["flowmap"] == r1["candidate"]["uri"] and inputs2["critic"] == r1["candidate"]["uri"]
    stored2 = _stored_record(r2)
    # same protocol: the live model's evaluation is the very artifact run 1 produced for its candidate
    assert stored2["baseline"]["eval"] == r1["candidate"]["eval"]
    assert set(stored2["candidate"]["metrics"]) == set(stored2["baseline"]["metrics"]) == {"1", "2"}
    ok = _expected_ok(stored2["candidate"]["metrics"], stored2["baseline"]["metrics"])
    assert r2["status"] == ("promoted" if ok else "rejected")
    last = registry.history(store, name)[-1]
    assert last["event"] == ("promote" if ok else "reject") and last["uri"] == r2["candidate"]["uri"]
    for n in ("1", "2"):  # the metrics that decided it are recorded with the event
        assert last["metrics"][f"nfe{n}/coupled_mse"] == stored2["candidate"]["metrics"][n]["coupled_mse"]
        assert last["metrics"][f"baseline/nfe{n}/coupled_mse"] == stored2["baseline"]["metrics"][n]["coupled_mse"]
    assert ("within margin" in last["reason"]) if ok else ("NFE" in last["reason"])

    # 3. a deliberately broken candidate is rejected and the alias is byte-for-byte unchanged
    before = _alias_bytes(s3_server, store, name)
    live_before = registry.promoted(store, name)
    r3 = redistill(store, "procedural:n=8,seed=0", teacher, flowmap=flowmap,
                   cfg=dataclasses.replace(cfg, distill_overrides=BROKEN), run_id="run-3")
    assert r3["status"] == "rejected", r3["gate"]
    assert _alias_bytes(s3_server, store, name) == before
    stored3 = _stored_record(r3)
    assert stored3["baseline"]["digest"] == live_before["manifest_sha256"]
    assert not _expected_ok(stored3["candidate"]["metrics"], stored3["baseline"]["metrics"])
    last = registry.history(store, name)[-1]
    assert last["event"] == "reject" and "NFE" in last["reason"] and "coupled_mse" in last["reason"]
    prev_window = W.Window.from_json(storage.read_json((r2 if ok else r1)["window_url"]))
    assert storage.read_json(r3["window_url"])["previous"] == prev_window.digest()  # continues from the live model's
    html = storage.read_bytes(r3["report"]).decode()
    assert "Promotion history" in html and "candidate vs live" in html and "[reject]" in html
    assert html.count("<img") >= 3  # quality-vs-NFE plots + candidate-vs-live curves

    # 4. rollback restores the previous alias (promote run 2's candidate by hand first if the gate refused it)
    if not ok:
        registry.promote(store, name, r2["candidate"]["uri"], metrics={}, reason="manual", expected_current=live_before["manifest_sha256"])
    back = registry.rollback(store, name, reason="test")
    assert back["uri"] == r1["candidate"]["uri"] and back["manifest_sha256"] == r1["candidate"]["digest"]
    assert registry.history(store, name)[-1]["event"] == "rollback"

    # 5. the window follows the live model: after the rollback, run 1's 4 items are all it has seen
    r4 = redistill(store, "procedural:n=4,seed=0", teacher, flowmap=flowmap, cfg=cfg, run_id="run-4")
    assert r4["status"] == "skipped" and "0 new item" in r4["reason"]
    assert registry.promoted(store, name)["uri"] == r1["candidate"]["uri"]
    # 6. the teacher's bytes published again (a forced rerun that reproduces them: another manifest sha256) is
    #    the same teacher -- nothing new, so the run is skipped; other bytes (another content digest than the
    #    one in the live model's lineage) change the warm start
    same = f"{store}/teacher-republished"
    storage.publish(storage.fetch(teacher), same, kind="teacher", parents=[teacher], metrics={"rerun": 1})
    assert storage.manifest_digest(same) != storage.manifest_digest(teacher)
    plan = plan_run(store, "procedural:n=4,seed=0", same, flowmap=flowmap, cfg=cfg, run_id="run-5a")
    assert not plan["teacher_changed"] and plan["action"] == "skip", plan
    teacher2 = f"{store}/teacher-v2"
    changed = tmp_path / "teacher-v2"
    shutil.copytree(storage.fetch(teacher), changed, dirs_exist_ok=True)
    (changed / "retrained.txt").write_text("other bytes")
    storage.publish(changed, teacher2, kind="teacher", parents=[teacher])
    plan = plan_run(store, "procedural:n=4,seed=0", teacher2, flowmap=flowmap, cfg=cfg, run_id="run-5")
    assert plan["teacher_changed"] and plan["live_teacher_digest"] == storage.content_digest(teacher)
    assert plan["action"] == "run" and plan["distill_inputs"]["flowmap"] == flowmap
    assert "critic" not in plan["distill_inputs"] and plan["distill_inputs"]["teacher"] == teacher2
    assert plan["window"]["new"] == 0 and plan["window"]["replay"] == 4  # nothing new: retrain on a replay
    events = [e["event"] for e in registry.history(store, name)]
    assert events == ["promote", "promote" if ok else "reject", "reject", *([] if ok else ["promote"]), "rollback"]


@pytest.mark.slow
def test_overlapping_runs_leave_a_consistent_alias_and_complete_history(tiny_chain: dict, s3_server) -> None:
    store, name = _store(s3_server), "overlap"
    cfg = RedistillConfig(name=name, overrides=EV, run_lease=False)  # exercise the promotion lease + CAS
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(tag: str, source: str) -> None:
        try:
            results[tag] = redistill(store, source, tiny_chain["teacher"].uri, flowmap=tiny_chain["flowmap"].uri,
                                     cfg=cfg, run_id=f"run-{tag}")
        except BaseException as exc:  # re-raised below in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t, f"procedural:n=2,seed={s}")) for t, s in (("a", 1), ("b", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    statuses = {k: r["status"] for k, r in results.items()}
    assert sorted(statuses.values()) in (["promoted", "promoted"], ["promoted", "rejected"], ["conflict", "promoted"])
    live = registry.promoted(store, name)
    cands = {k: r["candidate"]["uri"] for k, r in results.items()}
    assert live["uri"] in cands.values()
    assert live["manifest_sha256"] == storage.manifest_digest(live["uri"])
    history = registry.history(store, name)
    assert sorted(e["uri"] for e in history) == sorted(cands.values())  # one event per run, none lost
    assert [e for e in history if e["event"] == "promote"][-1]["uri"] == live["uri"]
    first = next(r for r in results.values() if r["candidate"]["uri"] == history[0]["uri"])
    second = next(r for r in results.values() if r is not first)
    assert history[0]["event"] == "promote" and first["status"] == "promoted" and first["baseline"] is None
    if second["status"] in ("promoted", "rejected"):  # it re-evaluated and compared against the first's model
        assert second["baseline"]["uri"] == first["candidate"]["uri"]
        assert history[1]["metrics"]["baseline/nfe1/coupled_mse"] == second["baseline"]["metrics"][1]["coupled_mse"]


def test_run_skips_while_another_run_holds_the_lease(s3_server) -> None:
    store = _store(s3_server)
    other = registry.Lease(store, "busy", owner="someone-else", ttl_s=60)
    assert other.acquire()
    rec = redistill(store, "procedural:n=2,seed=0", "s3://nowhere/teacher", cfg=RedistillConfig(name="busy"),
                    run_id="r")
    assert rec["status"] == "skipped" and "someone-else" in rec["reason"]
    assert registry.promoted(store, "busy") is None and registry.history(store, "busy") == []
    assert _stored_record(rec)["status"] == "skipped"
    other.release()


def test_failed_run_changes_nothing_and_releases_the_lease(s3_server) -> None:
    store = _store(s3_server)
    with pytest.raises(storage.ArtifactError):
        redistill(store, "procedural:n=2,seed=0", f"{store}/no-teacher", cfg=RedistillConfig(name="m"), run_id="bad")
    assert registry.promoted(store, "m") is None and registry.history(store, "m") == []
    rec = storage.read_json(f"{store}/redistill/m/runs/bad/record.json")
    assert rec["status"] == "failed" and "no-teacher" in rec["reason"]
    assert registry.Lease(store, "m", owner="next-run").acquire()  # released


def test_window_procedural_new_replay_and_determinism() -> None:
    w1 = W.plan_window("procedural:n=10,seed=3", None)
    assert w1.new == [f"procedural-3-{i:06d}" for i in range(10)] and w1.replay == []
    w2 = W.plan_window("procedural:n=13,seed=3", w1, seed=5, replay_ratio=2.0)
    assert w2.new == [f"procedural-3-{i:06d}" for i in (10, 11, 12)]
    assert len(w2.replay) == 6 and set(w2.replay) <= set(w1.new)
    assert W.plan_window("procedural:n=13,seed=3", w1, seed=5, replay_ratio=2.0).replay == w2.replay
    assert W.plan_window("procedural:n=13,seed=3", w1, seed=5, replay_ratio=2.0, max_replay=4).replay.__len__() == 4
    assert [r.key for r in W.window_records(w2)] == w2.selected
    again = W.Window.from_json(json.loads(json.dumps(w2.to_json())))
    assert again.digest() == w2.digest() and W.plan_window("procedural:n=13,seed=3", again).new == []


def test_window_on_an_s3_prefix_by_key_and_etag(s3_server) -> None:
    prefix = _store(s3_server)
    c = s3_server.client()
    root = prefix.split(f"s3://{s3_server.bucket}/", 1)[1]

    def put(rel: str, body: bytes) -> None:
        c.put_object(Bucket=s3_server.bucket, Key=f"{root}/videos/{rel}", Body=body)

    for i in range(3):
        put(f"clip{i}.mp4", b"video%d" % i)
        put(f"clip{i}.txt", b"caption %d" % i)
    w1 = W.plan_window(f"{prefix}/videos", None)
    assert w1.kind == "folder" and w1.new == ["clip0.mp4", "clip1.mp4", "clip2.mp4"]
    put("clip3.mp4", b"video3")
    put("clip3.txt", b"caption 3")
    put("clip1.txt", b"a corrected caption")  # changed sidecar → the item is new again
    w2 = W.plan_window(f"{prefix}/videos", w1, replay_ratio=0.5)
    assert w2.new == ["clip1.mp4", "clip3.mp4"] and len(w2.replay) == 1 and w2.replay[0] in ("clip0.mp4", "clip2.mp4")
    recs = list(W.window_records(w2))
    assert sorted(r.key for r in recs) == w2.selected
    assert {r.key: r.caption for r in recs}["clip1.mp4"] == "a corrected caption"
    # a folder of webdataset shards: the window is the new shard list
    for s in ("shard-0.tar", "shard-1.tar"):
        c.put_object(Bucket=s3_server.bucket, Key=f"{root}/wds/{s}", Body=b"x")
    s1 = W.plan_window(f"{prefix}/wds", None)
    c.put_object(Bucket=s3_server.bucket, Key=f"{root}/wds/shard-2.tar", Body=b"y")
    s2 = W.plan_window(f"{prefix}/wds", s1, replay_ratio=0)
    assert s1.kind == "shards" and s1.new == ["shard-0.tar", "shard-1.tar"] and s2.new == ["shard-2.tar"]


def test_window_on_a_jsonl_index(tmp_path: Path) -> None:
    index = tmp_path / "index.jsonl"
    index.write_text("".join(json.dumps({"video": f"v{i}.mp4", "caption": f"c{i}"}) + "\n" for i in range(3)))
    w1 = W.plan_window(str(index), None)
    with index.open("a") as f:
        f.write(json.dumps({"video": "v3.mp4", "caption": "c3"}) + "\n")
    w2 = W.plan_window(str(index), w1, replay_ratio=0)
    assert w1.kind == "index" and w2.new == ["v3.mp4"] and [r.key for r in W.window_records(w2)] == ["v3.mp4"]


def test_gate_all_nfes_rejects_a_regression_at_any_nfe() -> None:
    cfg = RedistillConfig(margin=0.0, relative_margin=0.1)
    live = {1: {"coupled_mse": 1.0}, 2: {"coupled_mse": 0.5}, 4: {"coupled_mse": 0.2}}
    assert gate_all_nfes({1: {"coupled_mse": 1.09}, 2: {"coupled_mse": 0.4}, 4: {"coupled_mse": 0.21}}, live, cfg)[0]
    ok, why = gate_all_nfes({1: {"coupled_mse": 0.5}, 2: {"coupled_mse": 0.3}, 4: {"coupled_mse": 0.23}}, live, cfg)
    assert not ok and len(why) == 1 and why[0].startswith("NFE 4")  # better at 1 and 2 is not enough
    ok, why = gate_all_nfes({1: {"coupled_mse": 1.0}, 2: {"coupled_mse": 0.5}}, live, cfg)
    assert not ok and "NFE 4" in why[0]  # a missing NFE fails
    assert gate_all_nfes({1: {"coupled_mse": 9.0}}, None, cfg)[0]  # nothing live: promoted by default


def test_cli_and_pipeline_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    import yaml

    from anyflow.cli.redistill import add_cli
    from pipelines.compile import compile_pipeline_func
    from pipelines.redistill import build_redistill_pipeline

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["redistill", "--store", "s3://bkt/p", "--source", "procedural:n=4", "--teacher", "t",
                              "--metric", "psnr:higher", "--set", "evaluate.nfes=1,2"])
    assert args.func.__name__ == "cmd_redistill" and args.metric == ["psnr:higher"]
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    out = compile_pipeline_func(build_redistill_pipeline(), tmp_path / "redistill.yaml")
    spec = next(iter(yaml.safe_load_all(out.read_text())))
    assert spec["pipelineInfo"]["name"] == "anyflow-redistill"
    text = out.read_text()
    for task in ("redistill-plan", "redistill-distill", "redistill-evaluate", "redistill-decide", "redistill-finish"):
        assert task in text, task
    assert "from anyflow.ops.steps import" in text  # the components call the library
    tasks = spec["root"]["dag"]["tasks"]
    finish = tasks["redistill-finish"]  # the exit handler runs whatever happened to the training tasks
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finish["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    guarded = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]["condition-2"]
    assert "redistill-plan-action" in guarded["triggerPolicy"]["condition"]  # no GPU pod when nothing is new
    inner = spec["components"]["comp-condition-2"]["dag"]["tasks"]
    assert inner["redistill-decide"]["dependentTasks"] == ["redistill-distill", "redistill-evaluate"]
    # the distill pod's 8 GPUs (default platform) run 8 processes, not one on cuda:0
    nproc = inner["redistill-distill"]["inputs"]["parameters"]["nproc_per_node"]["runtimeValue"]["constant"]
    assert nproc == 8


def test_exit_handler_records_a_failed_task_and_releases_the_lease(s3_server) -> None:
    store = _store(s3_server)
    conf = json.dumps({"name": "m", "lease_ttl_s": 3600})
    assert registry.Lease(store, "m", owner="run-x", ttl_s=3600).acquire()  # as plan_step took it
    assert steps.finish_step(store, conf, "run-x") == "failed"
    assert storage.read_json(f"{store}/redistill/m/runs/run-x/record.json")["status"] == "failed"
    assert registry.Lease(store, "m", owner="another-run").acquire()  # released, not left to expire
    assert registry.promoted(store, "m") is None


def test_decision_markdown_has_the_candidate_vs_promoted_table() -> None:
    """The decide task's Markdown: outcome, reasons, and per NFE and metric candidate, promoted and their
    difference (computed here by hand), the gate metric first; JSON's string NFE keys match int ones."""
    from anyflow.ops.record import markdown_summary

    rec = {"run_id": "r7", "name": "m", "status": "rejected", "reason": "",
           "config": {"metrics": [["coupled_mse", False]]},
           "gate": {"reasons": ["coupled_mse worse at NFE 2: 0.5 > 0.42"]},
           "candidate": {"digest": "ab" * 32, "uri": "s3://b/artifacts/distill/c",
                         "metrics": {"1": {"psnr": 20.0, "coupled_mse": 0.25}, "2": {"coupled_mse": 0.5}}},
           "baseline": {"digest": "cd" * 32, "uri": "s3://b/artifacts/distill/p",
                        "metrics": {1: {"coupled_mse": 0.3, "psnr": 19.5}, 2: {"coupled_mse": 0.4}}}}
    md = markdown_summary(rec).splitlines()
    assert md[0] == "## Re-distillation r7 — m: **rejected**"
    assert "- coupled_mse worse at NFE 2: 0.5 > 0.42" in md
    assert "candidate: `gen-abababab` s3://b/artifacts/distill/c" in md
    assert "promoted (compared against): `gen-cdcdcdcd` s3://b/artifacts/distill/p" in md
    rows = [line for line in md if line.startswith("| ") and line[2].isdigit()]
    assert rows == ["| 1 | coupled_mse (gate) | 0.25 | 0.3 | -0.05 |", "| 1 | psnr | 20 | 19.5 | 0.5 |",
                    "| 2 | coupled_mse (gate) | 0.5 | 0.4 | 0.1 |"]


@pytest.mark.slow
def test_kfp_local_runner_runs_the_pipeline_then_skips(tiny_chain: dict, s3_server, tmp_path: Path) -> None:
    """The compiled components really call the library: a local KFP run promotes, a second run skips."""
    from pipelines.local import init_local
    from pipelines.redistill import build_redistill_pipeline

    store = _store(s3_server)
    init_local(tmp_path)
    from pipelines.platform import Platform

    # what the local runner runs on: one process on CPU, no retries (the default platform's 8-GPU distill would
    # start 8 torchrun processes)
    pipeline = build_redistill_pipeline(Platform.local_runner(), image="ghcr.io/anyflow/anyflow-train:v0.0.0-test")
    args = {"store": store, "source": "procedural:n=2,seed=7", "teacher_uri": tiny_chain["teacher"].uri,
            "flowmap_uri": tiny_chain["flowmap"].uri, "config_json": json.dumps({"name": "kfp", "overrides": EV})}
    pipeline(**args)
    live = registry.promoted(store, "kfp")
    assert live is not None and [e["event"] for e in registry.history(store, "kfp")] == ["promote"]
    # the decide task's Markdown artifact (what the KFP UI shows): the decision and the candidate's numbers
    (md_path,) = [p for p in (tmp_path / "kfp-local").rglob("decision") if p.is_file()]
    md = md_path.read_text(encoding="utf-8")
    (rec,) = [storage.read_json(u) for u in storage.list_prefix(f"{store}/redistill/kfp/runs") if u.endswith("record.json")]
    assert f"Re-distillation {rec['run_id']} — kfp: **promoted**" in md and "nothing (first promotion)" in md
    for n, row in rec["candidate"]["metrics"].items():
        assert f"| {n} | coupled_mse (gate) | {float(row['coupled_mse']):.6g} | — | — |" in md
    pipeline(**args)  # nothing new: plan skips, no training task runs
    runs = [storage.read_json(u) for u in storage.list_prefix(f"{store}/redistill/kfp/runs") if u.endswith("record.json")]
    assert sorted(r["status"] for r in runs) == ["promoted", "skipped"]
    assert registry.promoted(store, "kfp") == live and registry.Lease(store, "kfp").holder()["released"]


@pytest.mark.s3
def test_warm_start_sees_the_adapters_of_an_s3_checkpoint(s3_prefix: str, tmp_path) -> None:
    # On S3 a checkpoint's model.json lives under its publisher's staging prefix: read through the manifest,
    # or the critic of the live model is silently "missing" and the warm start drops it.
    import json as _json

    from anyflow import storage
    from anyflow.ops.redistill import _has_adapter

    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.json").write_text(_json.dumps({"adapters": {"generator": {}, "critic": {}}}))
    uri = storage.join(s3_prefix, "generator")
    storage.publish(src, uri, kind="generator")
    assert _has_adapter(uri, "critic") and not _has_adapter(uri, "teacher")
