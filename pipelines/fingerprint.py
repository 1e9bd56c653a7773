"""The ``source_fingerprint`` task before each ``prepare_data`` task: how a pipeline sees new data.

KFP keys a task on its inputs (parameter values, input artifact names, image, command: kubeflow/pipelines
2.17.0 ``backend/src/v2/cacheutils/cache.go``), never on what a URL points at. So a ``prepare_data`` task whose
``data.source`` prefix gained videos would be a KFP cache hit and the run would train on the old dataset.
:func:`prepared` adds a small CPU task with caching disabled (``components/source_fingerprint``; platform
profile ``record_stage``) that digests the source's listing, and hands the digest to ``prepare_data`` as its
``source_fingerprint`` parameter. The stage's own store key holds the same digest. The same task lists the
partitions a partitioned prepare_data still has to encode (its ``Output`` output, see :func:`prepared`).
"""

from __future__ import annotations

from typing import Any

from pipelines.platform import MERGE_PROFILE, RECORD_PROFILE, Platform


def build_partition_component(image: str) -> Any:
    """The ``prepare_partition`` component built on ``image`` (``components/prepare_partition``)."""
    from components import make_component
    from components.prepare_partition.component import prepare_partition

    return make_component(prepare_partition, image)


def prepared(prepare_data: Any, fingerprint: Any, platform: Platform, *, name: str, preset: Any, overrides_json: Any,
             store: Any, extra_overrides_json: Any = "{}", partition: Any = None, **component_args: Any) -> Any:
    """Add ``fingerprint_<name>`` and then the ``prepare_data`` task ``name`` fed by it; returns the latter.

    ``prepare_data`` / ``fingerprint`` are the built components (``components.build_components()["prepare_data"]``,
    :func:`components.build_fingerprint_component`); the other arguments are pipeline parameters or constants.

    ``partition`` (:func:`build_partition_component`): fan the encoding out first (``data.partition_size`` > 0,
    docs/interfaces.md "Partitioned data preparation"). The fingerprint task (CPU, never cached) also lists the
    partitions not in the store yet; a ``dsl.ParallelFor`` with ``parallelism=platform.partition_parallelism``
    encodes each in its own ``prepare_partition`` pod (the platform's ``prepare_data`` settings: a GPU there if it
    has one), and the ``prepare_data`` task after the loop merges them (every partition is then a cache hit: no
    model is loaded). With ``data.partition_size`` 0 or no store the list is empty: no pod runs in the loop and
    ``prepare_data`` encodes the source itself, after the same one fingerprint task as without partitions.

    ``platform.prepare_fanout`` (compile time): the task after the loop only merges (``merge_only``) on the
    CPU-only ``prepare_merge`` profile, and the fingerprint task refuses a run that is not partitioned. Without it
    the merge keeps the ``prepare_data`` profile, since that task must also encode an unpartitioned source; choosing
    a CPU merge or a GPU encode at *run* time would need ``dsl.If``/``dsl.Else`` and a ``dsl.OneOf`` of their
    ``dataset`` artifacts, which KFP 2.17.3's local runner cannot resolve (tests/test_kfp_local_oneof.py;
    docs/interfaces.md "Fan-out on KFP").
    """
    from kfp import dsl

    fanout = partition is not None and platform.prepare_fanout
    fp = fingerprint(preset=preset, overrides_json=overrides_json, extra_overrides_json=extra_overrides_json,
                     store=store, **({"fanout": True} if fanout else {}))
    platform.apply(fp, RECORD_PROFILE).set_display_name(f"fingerprint_{name}")  # CPU only, never cached
    loop_task = None
    if partition is not None:
        # fp's "Output" is the partition list (named so for KFP's local runner: components/source_fingerprint)
        with dsl.ParallelFor(fp.outputs["Output"], parallelism=platform.partition_parallelism,
                             name=f"{name.replace('_', '-')}-partitions") as item:
            loop_task = platform.apply(partition(partition=item, preset=preset, overrides_json=overrides_json,
                                                 store=store, extra_overrides_json=extra_overrides_json),
                                       "prepare_data")
            # never from KFP's cache: its key is the item ("<index>:<listing>"), not what the store holds, so a
            # partition deleted from the store would be listed again and skipped as a cache hit; the fingerprint
            # lists only partitions not in the store, so nothing stored is encoded twice
            loop_task.set_display_name(f"{name}_partition").set_caching_options(enable_caching=False)
    task = prepare_data(preset=preset, overrides_json=overrides_json, store=store,
                        extra_overrides_json=extra_overrides_json, source_fingerprint=fp.outputs["digest"],
                        **({"merge_only": True} if fanout else {}), **component_args)
    if loop_task is not None:
        task.after(loop_task)  # the merge waits for every partition pod of the loop
    return platform.apply(task, MERGE_PROFILE if fanout else "prepare_data").set_display_name(name)
