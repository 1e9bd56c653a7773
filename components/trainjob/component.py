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
    preset: str = "tiny",
    overrides_json: str = "{}",
    num_nodes: int = 2,
    gpus_per_node: int = 8,
    api: str = "trainer",
    runtime: str = "torch-distributed",
    namespace: str = "",
    s3_secret: str = "anyflow-s3",
    s3_endpoint: str = "",
    timeout_s: int = 345600,
    poll_s: int = 30,
) -> None:
    """Launch ``stage`` on ``num_nodes`` nodes (torchrun) as a TrainJob / PyTorchJob and wait for it.

    The launcher pod itself needs no GPU; it needs the ``anyflow-launcher`` service account (see
    manifests/) to create, watch and delete the job. The workers publish into ``store``; after the job
    succeeds the launcher resolves the same content-addressed artifact (a cache hit, no recompute).

    Args:
        stage: Stage to run: train_teacher, train_flowmap, distill or finetune.
        store: Content-addressed store URL (s3://…) the workers publish into (required).
        image: Worker image (the project train image, an immutable tag).
        dataset: Dataset artifact (all training stages).
        teacher: Teacher checkpoint (distill).
        flowmap: Flow-map checkpoint (distill).
        generator: Generator checkpoint (finetune).
        preset: Preset name.
        overrides_json: JSON object of dotted config overrides.
        num_nodes: Number of nodes.
        gpus_per_node: GPUs (= torchrun processes) per node.
        api: ``trainer`` (Kubeflow Trainer v2 TrainJob) or ``pytorchjob`` (training operator v1).
        runtime: ClusterTrainingRuntime name for TrainJob.
        namespace: Namespace for the job; empty = the launcher pod's namespace.
        s3_secret: Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the workers.
        s3_endpoint: S3 endpoint URL for the workers (empty = provider default).
        timeout_s: Give up (and delete the job) after this many seconds.
        poll_s: Seconds between status polls.

    Returns:
        result: Output artifact pointing at the published stage artifact.
    """
    import os
    import uuid

    from kubernetes import client, config

    from anyflow.stages import RUN_ENV, prelaunch_check, run_stage
    from components._io import input_uri, parse_overrides, record_output
    from components.trainjob import launcher

    if not store:
        raise ValueError("trainjob needs store=s3://… (workers on other nodes publish there).")
    if api not in launcher.KINDS:
        raise ValueError(f"api must be one of {sorted(launcher.KINDS)}, got {api!r}.")
    overrides = parse_overrides(overrides_json)
    given = {"dataset": dataset, "teacher": teacher, "flowmap": flowmap, "generator": generator}
    inputs = {role: input_uri(art) for role, art in given.items() if art is not None}
    ns = namespace or launcher.in_cluster_namespace()
    name = launcher.job_name(stage, uuid.uuid4().hex[:8])
    command = launcher.stage_command(stage, preset=preset, overrides=overrides, inputs=inputs, store=store)
    env = launcher.s3_env(s3_secret, ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"], s3_endpoint,
                          run=os.environ.get(RUN_ENV, ""))
    common = dict(name=name, namespace=ns, image=image, command=command, num_nodes=num_nodes,
                  gpus_per_node=gpus_per_node, env=env, labels={"anyflow/stage": stage})
    if api == "trainer":
        body = launcher.build_trainjob(runtime=runtime, **common)
    else:
        body = launcher.build_pytorchjob(**common)
    # Before asking for GPU nodes: already in the store -> no job; this run's earlier attempt failed on bad
    # input -> stop now (a KFP retry cannot fix it).
    world = launcher.job_world_size(num_nodes, gpus_per_node)  # the job's processes: part of the key
    check = dict(preset=preset, overrides=overrides, inputs=inputs, store=store, world_size=world)
    if prelaunch_check(stage, **check) is None:
        config.load_incluster_config()
        launcher.launch(client.CustomObjectsApi(), launcher.KINDS[api], body, timeout_s=timeout_s, poll_s=poll_s)
        # Never fall back to computing the stage here (one small CPU pod, and under the job's key).
        if prelaunch_check(stage, **check) is None:
            raise RuntimeError(
                f"{stage}: the {api} job {name} succeeded but published no artifact for this stage's key in {store} "
                f"(did its workers run with WORLD_SIZE={world}, i.e. {num_nodes} nodes x the GPUs per node?)"
            )
    res = run_stage(stage, out=None, **check)  # a store cache hit: collects the artifact's metrics
    record_output(result, res, store, stage, inputs=inputs)
