"""Make building a pipeline cost what KFP's work costs, not what the caller's stack depth costs.

KFP 2.17's ``PipelineTask`` setters (``set_cpu_request``, ``set_memory_limit``, ``set_env_variable``, …; every
one :meth:`pipelines.platform.Platform.apply` calls) start with ``_ensure_container_spec_exists``, which calls
``inspect.stack()[1][3]`` only to name the setter in an error message (kfp 2.17.3,
``kfp/dsl/pipeline_task.py``, ``_ensure_container_spec_exists``). ``inspect.stack()`` reads the source line of
every frame on the stack (``getframeinfo`` → ``findsource`` → ``getmodule``, which walks ``sys.modules``): the
deeper the caller and the more modules loaded, the slower. Building ``anyflow-t2v`` makes 117 such calls; from
a shallow ``anyflow compile`` that is ~0.9 s of a ~2 s build, from inside pytest (or a notebook, or any
program that builds pipelines from a deep stack with many modules loaded) it was 35 s of 37 s.

:func:`install` gives that module an ``inspect`` whose ``stack()`` returns the same records without reading
source (``code_context`` and ``index`` ``None``, what ``inspect.stack(context=0)`` gives, but without the
per-frame file lookups); every other name is the real ``inspect``'s. Only ``pipeline_task``'s global is
replaced — no other module, and ``inspect`` itself, are touched. The compiled YAML does not depend on it
(the goldens and ``tests/test_kfp_speed.py`` check both that and that KFP's error still names the setter).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any


class _CallerNamesOnly:
    """``inspect`` with a ``stack()`` that names frames without reading their source."""

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    @staticmethod
    def stack(context: int = 1) -> list[inspect.FrameInfo]:
        frame = sys._getframe(1)  # the caller of stack(), as inspect.stack() starts
        records = []
        while frame is not None:
            records.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name,
                                             None, None))
            frame = frame.f_back
        return records


def install() -> None:
    """Give ``kfp.dsl.pipeline_task`` the fast ``inspect`` (idempotent; a KFP without that global is left as is)."""
    from kfp.dsl import pipeline_task

    if isinstance(getattr(pipeline_task, "inspect", None), type(inspect)):
        pipeline_task.inspect = _CallerNamesOnly()
