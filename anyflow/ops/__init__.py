"""Operations on top of the stages: periodic re-distillation with a data window, warm start, an
evaluation gate and atomic promotion (``anyflow.ops.redistill``; see docs/operations.md)."""
