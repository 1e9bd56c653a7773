"""Why the partition merge is not a CPU task of its own (issue 23, "Merge"): the upstream limit it waits on.

Splitting ``prepare_data`` into a CPU merge (partitioned runs) and a GPU encode (``data.partition_size`` 0)
chosen at run time needs ``dsl.If``/``dsl.Else`` and ``dsl.OneOf`` to hand downstream one ``dataset`` artifact
(a task outside a ``dsl.If`` may not depend on one inside it: the compiler's InvalidTopologyException). KFP
2.17.3's local runner, which ``anyflow run`` uses, resolves a ``dsl.OneOf`` of parameters but not of artifacts:
``kfp/local/orchestrator/orchestrator_utils.py`` ``get_dag_output_artifacts`` refuses an
``ArtifactSelectorSpec`` with more than one selector. This test builds that shape with KFP's own compiler and
feeds the compiled branch DAG's outputs to the local runner's resolver; when it starts passing (a KFP upgrade),
the split can be made (docs/interfaces.md, "Fan-out on KFP")."""

import pytest  # no `from __future__ import annotations`: KFP reads the components' annotations as types


def _branches_outputs():
    from kfp import dsl
    from kfp.dsl import Dataset, Input, Output

    @dsl.component
    def flag(x: int) -> bool:
        return x > 0

    @dsl.component
    def make(tag: str, dataset: Output[Dataset]):
        pass

    @dsl.component
    def use(dataset: Input[Dataset]):
        pass

    @dsl.pipeline
    def merge_or_encode(x: int):
        f = flag(x=x)
        with dsl.If(f.output == True):  # noqa: E712 (a KFP condition, not a Python comparison)
            merge = make(tag="merge")
        with dsl.Else():
            encode = make(tag="encode")
        use(dataset=dsl.OneOf(merge.outputs["dataset"], encode.outputs["dataset"]))

    spec = merge_or_encode.pipeline_spec
    (name,) = [n for n in spec.components if n.startswith("comp-condition-branches")]
    return spec.components[name].dag.outputs


def test_local_runner_cannot_resolve_an_artifact_one_of() -> None:
    from kfp.local import io
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    outputs = _branches_outputs()
    (selector,) = outputs.artifacts.values()
    assert len(selector.artifact_selectors) == 2  # the compiled contract: one selector per branch
    store = io.IOStore()
    # the branch that ran put its dataset; the other branch put nothing
    taken = selector.artifact_selectors[0]
    store.put_task_output(taken.producer_subtask, taken.output_artifact_key, object())
    with pytest.raises(ValueError, match=r"Expected 1 artifact in ArtifactSelectorSpec\. Got: 2"):
        OrchestratorUtils.get_dag_output_artifacts(dag_outputs_spec=outputs, io_store=store)
