"""The ``source_fingerprint`` task before each ``prepare_data`` task: how a pipeline sees new data.

KFP keys a task on its inputs (parameter values, input artifact names, image, command: kubeflow/pipelines
2.17.0 ``backend/src/v2/cacheutils/cache.go``), never on what a URL points at. So a ``prepare_data`` task whose
``data.source`` prefix gained videos would be a KFP cache hit and the run would train on the old dataset.
:func:`prepared` adds a small CPU task with caching disabled (``components/source_fingerprint``; platform
profile ``record_stage``) that digests the source's listing, and hands the digest to ``prepare_data`` as its
``source_fingerprint`` parameter. The stage's own store key holds the same digest.
"""

from __future__ import annotations

from typing import Any

from pipelines.platform import RECORD_PROFILE, Platform


def prepared(prepare_data: Any, fingerprint: Any, platform: Platform, *, name: str, preset: Any, overrides_json: Any,
             store: Any, extra_overrides_json: Any = "{}", **component_args: Any) -> Any:
    """Add ``fingerprint_<name>`` and then the ``prepare_data`` task ``name`` fed by it; returns the latter.

    ``prepare_data`` / ``fingerprint`` are the built components (``components.build_components()["prepare_data"]``,
    :func:`components.build_fingerprint_component`); the other arguments are pipeline parameters or constants.
    """
    fp = fingerprint(preset=preset, overrides_json=overrides_json, extra_overrides_json=extra_overrides_json)
    platform.apply(fp, RECORD_PROFILE).set_display_name(f"fingerprint_{name}")  # CPU only, never cached
    task = prepare_data(preset=preset, overrides_json=overrides_json, store=store,
                        extra_overrides_json=extra_overrides_json, source_fingerprint=fp.output, **component_args)
    return platform.apply(task, "prepare_data").set_display_name(name)
