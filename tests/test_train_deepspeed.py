"""DeepSpeed ZeRO for the training loop (``train.deepspeed``, anyflow/train/deepspeed_zero.py), issue 4.

The multi-rank cases (ZeRO-1, ZeRO-2, ZeRO-2 with CPU offload; interrupted, resumed and crossing layouts
against plain AdamW) are in tests/test_train_zero.py. Here: one process (DeepSpeed gets a one-rank process
group), gradient accumulation with several backward passes per micro-batch under bf16 autocast, a NaN,
and the config checks that name the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from helpers.states import random_adapter_state as _random_state
from helpers.states import trained_state

from anyflow.config import ConfigError, get_preset
from anyflow.data.shards import LatentDataset
from anyflow.models.loading import load_base
from anyflow.train.adapters import AdapterModel
from anyflow.train.deepspeed_zero import BUILTIN, engine_config, load_config
from anyflow.train.loop import TrainingDiverged, fit
from anyflow.train.methods import OnPolicyMethod

pytest.importorskip("deepspeed")


def _onpolicy(dataset: str, update_ratio: int = 1, **train):
    preset = get_preset("tiny")
    models = AdapterModel(load_base("builtin:tiny").transformer, rank=4, alpha=4.0, gradient_checkpointing=True)
    probe = AdapterModel(load_base("builtin:tiny").transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
    probe.add("t", "teacher")
    probe.add("g", "generator")
    data = LatentDataset(dataset, batch_size=1, seed=0)
    tr = dataclasses.replace(preset.distill.train, steps=3, batch_size=1, checkpoint_every=2, ema_warmup_step=2, **train)
    method = OnPolicyMethod(
        models,
        dataclasses.replace(preset.distill, train=tr, steps_list=(2, 4), update_ratio=update_ratio,
                            critic_optim=dataclasses.replace(preset.distill.critic_optim, weight_decay=0.01)),
        data.negative_embedding(), teacher=_random_state(probe, "t", 1), generator=_random_state(probe, "g", 2),
    )
    return method, tr, data, models


@pytest.mark.slow
def test_one_process_zero2_with_accumulation_under_bf16_equals_plain_adamw(tiny_chain, tmp_path: Path,
                                                                              monkeypatch) -> None:
    # grad_accum 2: the generator update backpropagates the DMD loss and the co-trained forward loss of each
    # micro-batch separately (4 backward passes per step), all summed before DeepSpeed's one reduction
    from accelerate.state import AcceleratorState

    dataset = tiny_chain["dataset"].uri
    runs = {}
    for mode in ("", "zero2"):
        monkeypatch.setattr(AcceleratorState, "_shared_state", {})  # the precision is process-wide in accelerate
        method, tr, data, _ = _onpolicy(dataset, grad_accum=2, mixed_precision="bf16", deepspeed=mode)
        result = fit(method, tr, data, work_dir=tmp_path / (mode or "plain"), progress=False)
        runs[mode] = (trained_state(result, method), result)
    plain, zero = runs[""][0], runs["zero2"][0]
    assert plain.keys() == zero.keys()
    for k in plain:
        assert torch.equal(plain[k], zero[k]), k
    assert runs["zero2"][1].optimizer_shard["local_params"] == runs["zero2"][1].optimizer_shard["params"]
    # the grad norm DeepSpeed reports (before clipping) is the one plain clipping reports
    logs = {m: [json.loads(x) for x in (tmp_path / (m or "plain") / "log.jsonl").read_text().splitlines()]
            for m in runs}
    for a, b in zip(logs[""], logs["zero2"], strict=True):
        for k in ("grad_norm/generator", "grad_norm/critic"):
            if k in a:
                assert math.isclose(a[k], b[k], rel_tol=1e-5), (k, a[k], b[k])
    # the control: the runs trained (the adapters moved from their start)
    method0, *_ = _onpolicy(dataset)
    assert any(not torch.equal(p, plain[f"param/generator/{k}"]) for k, p in method0.models.params("generator").items())


@pytest.mark.slow
def test_generator_updated_every_other_step_under_zero1_equals_plain_adamw(tiny_chain, tmp_path: Path) -> None:
    # update_ratio 2: the generator's engine sits out every other iteration while the critic's steps
    dataset = tiny_chain["dataset"].uri
    got = {}
    for mode in ("", "zero1"):
        method, tr, data, _ = _onpolicy(dataset, update_ratio=2, deepspeed=mode)
        got[mode] = trained_state(fit(method, tr, data, work_dir=tmp_path / (mode or "plain"), progress=False), method)
    assert got[""].keys() == got["zero1"].keys()
    assert all(torch.equal(got[""][k], got["zero1"][k]) for k in got[""])
    # the generator really sat one of the 3 iterations out: AdamW step counts 2 (generator) and 3 (critic)
    from safetensors.torch import load_file

    ckpt = tmp_path / "zero1" / "checkpoint"
    def step_count(group: str) -> float:  # the moments are keyed by parameter name: all share one step count
        saved = load_file(str(ckpt / f"optim-{group}.safetensors"))
        counts = {float(v) for k, v in saved.items() if k.startswith("state.") and k.endswith(".step")}
        assert len(counts) == 1, (group, counts)
        return counts.pop()

    steps = {g: step_count(g) for g in ("generator", "critic")}
    assert steps == {"generator": 2.0, "critic": 3.0}


@pytest.mark.slow
def test_nan_under_deepspeed_stops_with_the_step_and_last_checkpoint(tiny_chain, tmp_path: Path) -> None:
    method, tr, data, models = _onpolicy(tiny_chain["dataset"].uri, deepspeed="zero1")
    step = method.train_step

    def poisoned(ctx, i):
        if i == 2:  # the third step: one generator tensor's gradient becomes NaN
            p = next(iter(models.params("generator").values()))
            p.register_hook(lambda g: torch.full_like(g, float("nan")))
        return step(ctx, i)

    method.train_step = poisoned
    with pytest.raises(TrainingDiverged, match=r"step 3; last good checkpoint: .*checkpoint"):
        fit(method, tr, data, work_dir=tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 2


def test_builtin_configs_pass_deepspeeds_own_parser() -> None:
    """Filled for the 14B on-policy stage: its batch, accumulation (ours: the engine sees 1) and clipping."""
    from deepspeed.runtime.config import DeepSpeedConfig

    p = get_preset("wan2.1-t2v-14b").distill
    for name in BUILTIN:
        raw, source = load_config(name)
        cfg = DeepSpeedConfig(engine_config(raw, source, micro_batch=p.train.batch_size,
                                            grad_clip=p.generator_optim.grad_clip, grad_accum=p.train.grad_accum))
        assert cfg.zero_optimization_stage == int(name[4]), name
        assert cfg.train_micro_batch_size_per_gpu == p.train.batch_size and cfg.gradient_accumulation_steps == 1
        assert cfg.gradient_clipping == p.generator_optim.grad_clip
        assert not cfg.bfloat16_config.enabled and not cfg.float16_config.enabled
        assert (cfg.zero_config.offload_optimizer is not None) == name.endswith("offload"), name


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"zero_optimization": {"stage": 3}}, r"zero_optimization.stage=3.*train.sharding=fsdp"),
        ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, r"bf16.enabled=True.*mixed_precision"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, r"sets 'optimizer'"),
        ({"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5}, r"gradient_clipping=0.5 but the optimiser's grad_clip is 1.0"),
        ({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 8}, r"train.batch_size is 2"),
        ([1, 2], r"must hold a JSON object"),
        ({"zero_optimization": {"stage": 2}, "bf16": True}, r"bf16.enabled=True"),
        ({"zero_optimization": {"stage": 2}, "train_batch_size": 64}, r"train_batch_size=64.*per rank"),
        ({"zero_optimization": {"stage": 2}, "communication_data_type": "bf16"}, r"communication_data_type='bf16'"),
        ({"zero_optimization": {"stage": 2, "cpu_offload": True}}, r"old zero_optimization.cpu_offload.*offload_optimizer"),
        ({"zero_optimization": {"stage": 1}, "gradient_clipping": "1.0"}, r"gradient_clipping='1.0'; use \"auto\""),
    ],
)
def test_bad_deepspeed_config_names_the_file_and_field(tmp_path: Path, content, match: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=match) as info:
        raw, source = load_config(str(path))
        engine_config(raw, source, micro_batch=2, grad_clip=1.0, grad_accum=1)
    assert "train.deepspeed" in str(info.value) and str(path) in str(info.value)


def test_missing_or_broken_deepspeed_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.deepspeed='zero4': no such file.*zero1, zero2, zero2_offload"):
        load_config("zero4")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad.json is not valid JSON"):
        load_config(str(tmp_path / "bad.json"))


def test_a_stage_key_holds_the_deepspeed_config_content(tmp_path: Path) -> None:
    """Off adds nothing (keys from before the field stay valid); on, the key holds the config's content, so the
    same content under another name is the same artifact and an edited file is not."""
    from anyflow.config import apply_overrides
    from anyflow.stages import cache_key, stage_module

    sections = stage_module("distill").SECTIONS

    def key(spec: str | None) -> str:
        over = {} if spec is None else {"distill.train.deepspeed": spec}
        return cache_key("distill", apply_overrides(get_preset("tiny"), over), sections, {"dataset": "d"})

    off = key(None)
    assert key("") == off
    copy = tmp_path / "mine.json"
    copy.write_text(json.dumps(load_config("zero2")[0], indent=4))
    assert key("zero2") == key(str(copy)) != off
    edited = json.loads(copy.read_text())
    edited["zero_optimization"]["reduce_bucket_size"] = 1e6
    copy.write_text(json.dumps(edited))
    assert key(str(copy)) not in (key("zero2"), off)
    assert key("zero1") not in (key("zero2"), off)


def test_without_the_deepspeed_package_the_setting_is_named(monkeypatch) -> None:
    import sys

    from anyflow.train.deepspeed_zero import make_groups

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an install without it gives: ImportError
    with pytest.raises(ConfigError, match=r"train.deepspeed='zero2' needs the deepspeed package"):
        make_groups("zero2", {}, micro_batch=1, grad_accum=1, device=torch.device("cpu"))


def test_group_sums_aliased_gradients_correctly_and_lets_go_of_its_tensors() -> None:
    """autograd.grad may return one tensor for two inputs (both sides of an add) or a broadcast view (a sum):
    the group's sum must still be each tensor's own gradient. Reference: plain backward into .grad."""
    from anyflow.config import OptimConfig
    from anyflow.train.deepspeed_zero import DeepSpeedGroup

    def losses(a, b, c, x):
        return [((a + b) * x).sum() + c.sum(), ((a + b) * x * 2).sum() + 3 * c.sum()]

    torch.manual_seed(0)
    x = torch.randn(5)
    ref = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    for loss in losses(*ref, x):
        loss.backward()
    params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in zip("abc", ref, strict=True)}
    raw, source = load_config("zero2")
    group = DeepSpeedGroup("g", params, OptimConfig(lr=0.0, weight_decay=0.0, grad_clip=1e9), raw, source,
                           micro_batch=1, grad_accum=2, device=torch.device("cpu"))
    for loss in losses(*params.values(), x):
        group.accumulate(loss)
    for n, p in zip("abc", ref, strict=True):
        assert torch.equal(group._grads[n], p.grad), n
    norm = group.step()
    assert math.isclose(norm, torch.stack([p.grad.norm() for p in ref]).norm().item(), rel_tol=1e-6)
    with pytest.raises(RuntimeError, match=r"group 'g': the loss depends on none of its tensors"):
        group.accumulate((x * 2).sum().requires_grad_())

    group.destroy()  # what fit does at its end: no DeepSpeed hook or link left on the tensors
    assert all(getattr(p, "_hp_mapping", None) is None for p in params.values())
    (params["a"] * x).sum().backward()
    assert torch.equal(params["a"].grad, x)  # a plain backward is the plain gradient again


def test_cpu_start_never_builds_deepspeeds_shared_memory_extension(monkeypatch) -> None:
    """DeepSpeed's CPU backend compiles a C++ all-reduce op (deepspeed_shm_comm) when it starts, minutes on a fresh
    2-core machine; anyflow's ZeRO training never uses it (its collectives are torch.distributed's), so a CPU run
    starts without building it -- and trains as before (the equality tests above)."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # not the attribute: that is the torch package

    from anyflow.config import OptimConfig
    from anyflow.train.deepspeed_zero import make_groups

    def build():  # what DeepSpeed would call to compile the op
        raise AssertionError("DeepSpeed tried to build its shared-memory extension")

    monkeypatch.setattr(ds_torch, "build_shm_op", build)
    import deepspeed.comm.comm as ds_comm

    monkeypatch.setattr(ds_comm, "cdb", None)  # a process whose DeepSpeed backend is not started yet
    p = torch.nn.Parameter(torch.ones(4))
    groups = make_groups("zero1", {"g": ({"p": p}, OptimConfig(lr=1e-3))}, micro_batch=1, grad_accum=1,
                         device=torch.device("cpu"))
    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None
    assert ds_torch.build_shm_op is build  # put back as found
    assert set(groups) == {"g"}
