"""Evaluation: metrics without downloaded weights, the VBench adapter and the HTML report.

* :mod:`anyflow.eval.metrics` — coupled error, PSNR/SSIM, temporal flicker, energy distance / MMD,
  procedural prompt adherence, :class:`~anyflow.eval.metrics.MetricTable`.
* :mod:`anyflow.eval.vbench` — VBench file naming, prompt sets, running VBench in its own
  environment, Quality / Semantic / Total aggregation (docs/method.md §11).
* :mod:`anyflow.eval.report` — one self-contained ``report.html``.

Kept import-light: submodules import torch / matplotlib only when used.
"""
