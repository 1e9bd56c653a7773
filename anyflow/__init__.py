"""AnyFlow: any-step video flow-map distillation as a Kubeflow Pipelines workflow.

Layers (imports point down only): ``stages`` -> ``train`` / ``eval`` / ``data`` -> ``models`` ->
pure maths (``timesteps``, ``flowmap``, ``rollout``, ``dmd``) ; ``storage`` is the only URL boundary.
"""

__version__ = "0.1.0"
