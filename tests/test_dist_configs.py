"""The accelerate configs in configs/ load with accelerate's own config classes, name things that exist, and
the README's launch commands point at real files, stage modules and DeepSpeed configs (issue 4). No GPU and
no process group are needed. (anyflow's DeepSpeed configs are package data: tests/test_train_deepspeed.py.)"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACC = ROOT / "configs" / "accelerate"
EXPECTED = {
    "single_gpu.yaml": "NO",
    "multi_gpu_ddp.yaml": "MULTI_GPU",
    "fsdp_1.3b.yaml": "FSDP",
}


def _cluster(name: str):
    from accelerate.commands.config.config_args import ClusterConfig

    return ClusterConfig.from_yaml_file(str(ACC / name))


def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {o for a in launch_command_parser()._actions for o in a.option_strings}


def test_every_config_is_present_and_nothing_else() -> None:
    assert sorted(p.name for p in ACC.glob("*.yaml")) == sorted(EXPECTED)
    assert not (ROOT / "configs" / "deepspeed").exists()  # one copy: anyflow/train/deepspeed_configs/


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_loads(name: str) -> None:
    cfg = _cluster(name)
    assert cfg.distributed_type.value == EXPECTED[name]
    assert cfg.mixed_precision == "bf16"  # the big presets train in bf16 (docs/method.md §10)
    assert cfg.num_processes == 1 if EXPECTED[name] == "NO" else cfg.num_processes > 1
    assert cfg.num_machines >= 1 and cfg.num_processes % cfg.num_machines == 0
    # accelerate launch turns fsdp_config / deepspeed_config entries into --<key> options: each must be one
    opts = _launch_options()
    for key in [*(cfg.fsdp_config or {}), *(cfg.deepspeed_config or {})]:
        assert f"--{key}" in opts, f"{name}: {key} is not an accelerate launch option"


def test_fsdp_wraps_a_block_class_of_the_converted_model() -> None:
    """The auto-wrap class must be the AnyFlow block (what load_base returns), not Wan's."""
    from anyflow.models.loading import load_base

    fsdp = _cluster("fsdp_1.3b.yaml").fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp["fsdp_use_orig_params"] is True  # adapters addressed by name (switching, EMA, checkpoints)
    classes = {type(m).__name__ for m in load_base("builtin:tiny").transformer.modules()}
    wrap = fsdp["fsdp_transformer_layer_cls_to_wrap"]
    assert wrap in classes, f"{wrap} not among {sorted(c for c in classes if 'Block' in c)}"


def _readme_launches() -> list[list[str]]:
    text = (ROOT / "configs" / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = "\n".join(b.replace("\\\n", " ") for b in blocks)
    cmds = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [c for c in cmds if c[:2] == ["accelerate", "launch"]]


def test_readme_launch_commands_name_real_configs_and_stages() -> None:
    from anyflow.config import PRESETS
    from anyflow.stages import STAGES, add_stage_arguments

    cmds = _readme_launches()
    assert len(cmds) >= 4
    used, deepspeed = set(), set()
    opts = _launch_options()
    for cmd in cmds:
        cfg = cmd[cmd.index("--config_file") + 1]
        assert (ROOT / cfg).is_file(), cfg
        used.add(Path(cfg).name)
        m = cmd.index("-m")
        assert all(a.split("=")[0] in opts for a in cmd[2:m] if a.startswith("--")), cmd
        module = cmd[m + 1]
        assert module.startswith("anyflow.stages.") and module.split(".")[-1] in STAGES
        assert importlib.util.find_spec(module) is not None
        # the stage's own parser accepts the arguments after the module
        import argparse

        p = argparse.ArgumentParser()
        add_stage_arguments(p)
        args = p.parse_args([module.split(".")[-1], *cmd[m + 2:]])
        assert args.preset in PRESETS and (args.store or args.out) and args.inputs
        for override in args.overrides or []:  # --set <stage>.train.deepspeed=<name or file> names a real config
            key, _, value = override.partition("=")
            if key.endswith(".train.deepspeed"):
                from anyflow.train.deepspeed_zero import load_config

                load_config(value)
                deepspeed.add(value)
    assert used == set(EXPECTED), f"README never launches {set(EXPECTED) - used}"
    assert deepspeed, "README shows no train.deepspeed launch"
