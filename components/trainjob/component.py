"""KFP component: trainjob — run one training stage across nodes as a Kubeflow Trainer job."""

from kfp.dsl import Dataset, Input, Model, Output


def trainjob(
    stage: str,
    store: str,
    image: str,
    result: Output[Model],
    dataset: Input[Dataset] = None,
    teacher: Input[Model] = None,
    flowmap: Input[Model] = None,
    generator: Input[Model] = None,
    dataset_uri: str = "",
    teacher_uri: str = "",
    flowmap_uri: str = "",
    generator_uri: str = "",
    preset: str = "tiny",
    overrides_json: str = "{}",
    num_nodes: int = 2,
    gpus_per_node: int = 8,
    workers_json: str = "{}",
    api: str = "trainer",
    runtime: str = "torch-distributed",
    timeout_s: int = 345600,
    poll_s: int = 30,
) -> None:
    """Launch ``stage`` on ``num_nodes`` nodes (torchrun) as a TrainJob / PyTorchJob and wait for it.

    The launcher pod itself needs no GPU; it runs as KFP's runner account, which manifests/ binds to the
    ``anyflow-launcher`` Role to create, get, patch and delete the job, which it creates in its own namespace, owned by
    its own pod. A retried attempt of the same KFP run adopts the job instead of starting a second one; a
    cancelled run (SIGTERM) deletes it. The workers publish into ``store``; after the job succeeds the
    launcher resolves the same content-addressed artifact (a cache hit, no recompute).

    Args:
        stage: Stage to run: train_teacher, train_flowmap, distill or finetune.
        store: Content-addressed store URL (s3://…) the workers publish into (required).
        image: Worker image (the project train image, an immutable tag).
        dataset: Dataset artifact (all training stages).
        teacher: Teacher checkpoint (distill).
        flowmap: Flow-map checkpoint (distill).
        generator: Generator checkpoint (finetune).
        dataset_uri: The dataset's store URL instead of the artifact (reruns: no importers).
        teacher_uri: The teacher's store URL instead of the artifact.
        flowmap_uri: The flow map's store URL instead of the artifact.
        generator_uri: The generator's store URL instead of the artifact.
        preset: Preset name.
        overrides_json: JSON object of dotted config overrides.
        num_nodes: Number of nodes.
        gpus_per_node: GPUs (= torchrun processes) per node.
        workers_json: The workers' placement as JSON (``Platform.worker_settings``: CPU/memory, GPU
            resource, node selector, tolerations, /dev/shm, model cache, user, S3 secret and endpoint).
        api: ``trainer`` (Kubeflow Trainer v2 TrainJob) or ``pytorchjob`` (training operator v1).
        runtime: ClusterTrainingRuntime name for TrainJob.
        timeout_s: Give up (and delete the job) after this many seconds.
        poll_s: Seconds between status polls.

    Returns:
        result: Output artifact pointing at the published stage artifact.
    """
    import json
    import os
    import uuid

    from kubernetes import client, config

    from anyflow.stages import RUN_ENV
    from anyflow.stages.processes import launch_and_collect
    from components._io import parse_overrides, record_output, stage_inputs
    from components.trainjob import launcher

    if not store:
        raise ValueError("trainjob needs store=s3://… (workers on other nodes publish there).")
    if api not in launcher.KINDS:
        raise ValueError(f"api must be one of {sorted(launcher.KINDS)}, got {api!r}.")
    overrides = parse_overrides(overrides_json)
    workers = launcher.Workers.from_dict(json.loads(workers_json))
    inputs = stage_inputs({"dataset": dataset, "teacher": teacher, "flowmap": flowmap, "generator": generator},
                          {"dataset": dataset_uri, "teacher": teacher_uri, "flowmap": flowmap_uri,
                           "generator": generator_uri})
    command = launcher.stage_command(stage, preset=preset, overrides=overrides, inputs=inputs, store=store)
    # One job per (run, stage, command): a launcher started again for the same run adopts it (every task's pod
    # gets its run from Platform.apply). Without a run (outside a cluster) there is nothing to adopt: a fresh name.
    run = os.environ.get(RUN_ENV, "")
    key = launcher.job_key(run or uuid.uuid4().hex, stage, command)
    name = launcher.job_name(stage, key)
    common = dict(name=name, namespace=launcher.in_cluster_namespace(), image=image, command=command,
                  num_nodes=num_nodes, gpus_per_node=gpus_per_node, workers=workers,
                  env=launcher.worker_env(workers, run=run), owner=launcher.owner_reference(os.environ),
                  labels={launcher.STAGE_LABEL: stage, launcher.KEY_LABEL: key})
    if api == "trainer":
        body = launcher.build_trainjob(runtime=runtime, **common)
    else:
        body = launcher.build_pytorchjob(**common)

    def launch() -> None:
        config.load_incluster_config()
        launcher.launch(client.CustomObjectsApi(), launcher.KINDS[api], body, timeout_s=timeout_s, poll_s=poll_s)

    # Before asking for GPU nodes: already in the store -> no job; this run's earlier attempt failed on bad input
    # -> stop now. After the job: the artifact under the job's key (its process count), never computed here.
    res = launch_and_collect(stage, launch, store=store, world_size=launcher.job_world_size(num_nodes, gpus_per_node),
                             preset=preset, overrides=overrides, inputs=inputs,
                             launched=f"the {api} job {name} ({num_nodes} nodes x {gpus_per_node} GPUs)")
    record_output(result, res, store, stage, inputs=inputs)
