"""KFP pipelines for AnyFlow: the full T2V pipeline, single-stage reruns, evaluation only.

Pipelines are built by functions taking a :class:`~pipelines.platform.Platform` and an image, so
``anyflow compile --platform … --image …`` changes the cluster settings without editing code.
"""

from pipelines.platform import Platform, PlatformError, StageResources, Toleration

__all__ = ["Platform", "PlatformError", "StageResources", "Toleration"]
