"""Presets carry the paper's hyperparameters (docs/method.md §10); overrides are strict."""

from __future__ import annotations

import pytest

from anyflow.config import ConfigError, apply_overrides, from_dict, get_preset, parse_override_args, to_dict


def test_wan_presets_match_the_released_hyperparameters() -> None:
    for name, batch, iters in (("wan2.1-t2v-1.3b", 2, 6000), ("wan2.1-t2v-14b", 1, 4000)):
        p = get_preset(name)
        assert (p.data.frames, p.data.height, p.data.width, p.data.fps) == (81, 480, 832, 16)
        assert (p.model.lora_rank, p.model.lora_alpha, p.model.gate_value) == (256, 256.0, 0.25)
        for stage in (p.teacher, p.flowmap):
            assert stage.train.steps == iters and stage.train.batch_size == batch
            assert (stage.optim.lr, stage.optim.beta1, stage.optim.beta2, stage.optim.warmup_steps) == (5e-5, 0.9, 0.95, 1000)
            assert (stage.train.ema_decay, stage.train.ema_warmup_step) == (0.999, 1000)
        d = p.distill
        assert d.train.steps == 1200 and (d.train.ema_decay, d.train.ema_warmup_step) == (0.99, 200)
        for o in (d.generator_optim, d.critic_optim):
            assert (o.lr, o.beta1, o.beta2, o.warmup_steps, o.grad_clip) == (2e-6, 0.0, 0.999, 0, 1.0)
        assert d.steps_list == (2, 4, 8, 16, 50) and d.update_ratio == 1 and d.real_guidance_scale == 3.0
        loss = p.flowmap.loss
        assert (loss.shift, loss.guidance_scale, loss.fd_epsilon, loss.weight_type, loss.text_dropout) == (5.0, 3.0, 5.0, "beta08", 0.1)
        assert (loss.diffusion_ratio, loss.consistency_ratio) == (0.5, 0.25)
        assert p.evaluate.samples_per_prompt == 5 and p.evaluate.num_prompts == 946


def test_overrides_are_coerced_and_strict() -> None:
    p = apply_overrides(get_preset("tiny"), parse_override_args(
        ["distill.train.steps=7", "evaluate.nfes=1,2", "model.gradient_checkpointing=true", "flowmap.optim.lr=0.5"]
    ))
    assert p.distill.train.steps == 7 and p.evaluate.nfes == (1, 2)
    assert p.model.gradient_checkpointing is True and p.flowmap.optim.lr == 0.5
    p2 = apply_overrides(get_preset("tiny"), {"data": {"height": 64, "width": 48}})
    assert (p2.data.height, p2.data.width) == (64, 48)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"distill.train.stepz": 3}, r"unknown config key 'distill.train.stepz'.*valid keys there: steps"),
        ({"bogus": 1}, r"unknown config key 'bogus'.*valid keys there: name, variant, model"),
        ({"distill.train.steps": "many"}, r"distill.train.steps: expected an integer"),
        ({"data.frames": 10}, r"data.frames=10: must be 4k\+1"),
        ({"data.height": 30}, r"multiples of 16"),
        ({"model": 3}, r"model: expected a mapping"),
    ],
)
def test_bad_overrides_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("tiny"), overrides)


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'; valid presets: demo, far-1\.3b, far-14b, far-tiny, tiny, wan2\.1-t2v-1\.3b"):
        get_preset("huge")


def test_resolved_config_round_trips() -> None:
    p = apply_overrides(get_preset("wan2.1-t2v-14b"), {"distill.train.steps": 5})
    assert from_dict(to_dict(p)) == p


def test_unknown_vbench_dimension_is_refused_before_any_sampling() -> None:
    with pytest.raises(ConfigError, match=r"evaluate\.vbench_dimensions: unknown \['temporal_flicker'\]"):
        apply_overrides(get_preset("tiny"), {"evaluate.vbench_dimensions": "temporal_flicker"})
    for name in ("wan2.1-t2v-1.3b", "far-14b"):  # the presets' 16 dimensions are all valid
        apply_overrides(get_preset(name), {})


def test_merge_overrides_later_layers_win_and_nested_keys_merge() -> None:
    from anyflow.config import apply_overrides, get_preset, merge_overrides

    common = {"data": {"height": 64, "width": 64}, "distill.train.steps": 3}
    finetune = {"data": {"source": "procedural:n=8,seed=3", "width": 48}}
    merged = merge_overrides(common, finetune)
    assert merged["data"] == {"height": 64, "width": 48, "source": "procedural:n=8,seed=3"}
    data = apply_overrides(get_preset("tiny"), merged).data
    assert (data.height, data.width, data.source) == (64, 48, "procedural:n=8,seed=3")
    # dotted after nested (and the other way round): the later layer wins
    assert apply_overrides(get_preset("tiny"), merge_overrides({"data": {"height": 64}}, {"data.height": 48})).data.height == 48
    assert apply_overrides(get_preset("tiny"), merge_overrides({"data.height": 64}, {"data": {"height": 48}})).data.height == 48
    assert apply_overrides(get_preset("tiny"), merge_overrides({"data.height": 64}, {"data.height": 48})).data.height == 48
    assert merge_overrides(None, {}) == {}


def test_declared_choices_match_the_code_that_reads_them() -> None:
    from anyflow.config import WEIGHT_TYPES
    from anyflow.timesteps import WEIGHT_KINDS

    assert WEIGHT_TYPES == WEIGHT_KINDS


def test_every_preset_satisfies_its_declared_ranges() -> None:
    from anyflow.config import PRESETS, validate

    for name in PRESETS:
        validate(get_preset(name))  # raises ConfigError naming the key on a value out of its range
    # control: the same call refuses a preset with one value out of range
    import dataclasses

    from anyflow.config import ConfigError

    tiny = get_preset("tiny")
    bad = dataclasses.replace(tiny, data=dataclasses.replace(tiny.data, fps=0))
    with pytest.raises(ConfigError, match=r"data\.fps"):
        validate(bad)
