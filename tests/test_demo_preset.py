"""The ``demo`` preset (issue 19 item 2): it validates, is listed, builds its models, and its data and evaluation
prompts come from the small procedural class set (``simple=1``) that its report scores adherence on.

The demo run itself (~10 minutes) is not run here; README.md "The demo preset" has its measured numbers.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anyflow.config import apply_overrides, get_preset, validate
from anyflow.data.procedural import measure_attributes
from anyflow.data.sources import open_source, parse_procedural
from anyflow.data.video import VideoSpec
from anyflow.models.tiny import DEMO_WAN_DIR, build_tiny_wan, load_demo_wan


def test_demo_preset_validates_and_is_listed() -> None:
    from anyflow.cli import main

    cfg = apply_overrides(get_preset("demo"), {})
    validate(cfg)
    assert cfg.name == "demo" and cfg.variant == "bidirectional" and cfg.model.base == "builtin:demo"
    assert parse_procedural(cfg.data.source) == {"n": 512, "seed": 0, "simple": 1}
    # more training than tiny in every stage, on the same model
    tiny = get_preset("tiny")
    for stage in ("teacher", "flowmap", "distill"):
        assert getattr(cfg, stage).train.steps > 5 * getattr(tiny, stage).train.steps, stage
    # stage 2's real score aims at the guidance the flow map fuses (cond + w·(cond − uncond) is standard CFG 1 + w),
    # and its critic learns faster than the generator (README "The demo preset": the measured reasons)
    d = cfg.distill
    assert 1 + d.real_guidance_scale == cfg.flowmap.loss.guidance_scale == d.loss.guidance_scale == 3.0
    assert d.critic_optim.lr >= 10 * d.generator_optim.lr
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["presets"]) == 0
    assert any(line.split()[0] == "demo" for line in buf.getvalue().splitlines())


def test_simple_procedural_clips_show_their_caption() -> None:
    """Every clip of the small class set is a red/green/blue shape moving left/right or still on black, alone, and
    ``measure_attributes`` (the reader evaluation scores adherence with) reads its caption's colour and motion off
    the rendered frames; the full set (no ``simple``) has clips outside it."""
    records = list(open_source("procedural:n=40,seed=3,simple=1"))
    assert records[0].key == "procedural-simple-3-000000"
    seen = set()
    for r in records:
        a = r.meta
        assert a["colour"] in ("red", "green", "blue") and a["motion"] in ("left", "right", "static"), a
        assert a["background"] == "black" and a["second_shape"] is None, a
        seen.add((a["colour"], a["motion"]))
        x = r.load(VideoSpec(frames=9, fps=16, height=32, width=32))  # (3, T, H, W) in [-1, 1]
        video = ((x.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        got = measure_attributes(video)
        assert (got["colour"], got["motion"], got["background"]) == (a["colour"], a["motion"], "black"), (
            r.caption,
            got,
        )
        assert r.caption.startswith(
            f"a {a['colour']} {a['shape']} moving {a['motion']}"
            if a["motion"] != "static"
            else f"a still {a['colour']} {a['shape']}"
        ) and r.caption.endswith("on a black background")
    assert len(seen) == 9  # all 3 x 3 colour/motion classes occur in 40 clips
    full = [r.meta for r in open_source("procedural:n=40,seed=3")]
    assert any(a["colour"] not in ("red", "green", "blue") or a["background"] != "black" for a in full)
    with pytest.raises(ValueError, match="simple='2' must be 0 or 1"):
        parse_procedural("procedural:n=4,simple=2")


@pytest.mark.slow  # builds the tiny base (~20 s on the loaded 2-core machine)
def test_demo_models_build_and_evaluate_prompts_use_its_class_set() -> None:
    from anyflow.stages import common
    from anyflow.stages.evaluate import _prompts

    cfg = get_preset("demo")
    base = common.load_models(cfg)
    # builtin:demo is the tiny architecture with the shipped pretrained weights, which (unlike the random tiny
    # base) tell prompts apart: the velocity for a red and a blue square on the same noise differs by far more
    shipped = load_file(str(DEMO_WAN_DIR / "diffusion_pytorch_model.safetensors"))
    wan = load_demo_wan()
    assert wan.state_dict().keys() == shipped.keys() and all(
        torch.equal(wan.state_dict()[k], shipped[k]) for k in shipped
    )
    prompts = [
        "a red square moving left on a black background",
        "a blue square moving left on a black background",
    ]
    c = base.text.encode(prompts)
    z = torch.randn((1, *base.vae.latent_shape(9, 32, 32)), generator=torch.Generator().manual_seed(0))
    z = z.permute(0, 2, 1, 3, 4).repeat(
        2, 1, 1, 1, 1
    )  # the Wan transformer's (B, C, F, h, w), same noise twice

    def gap(transformer) -> float:
        with torch.no_grad():
            u = transformer(
                hidden_states=z, timestep=torch.full((2,), 800.0), encoder_hidden_states=c, return_dict=False
            )[0]
        return float((u[0] - u[1]).norm() / u[0].norm())

    assert gap(wan) > 10 * gap(build_tiny_wan(0)), (gap(wan), gap(build_tiny_wan(0)))
    models = common.adapter_model(cfg, base.transformer)
    models.add("teacher", "teacher")
    ranks = {
        tuple(m.lora_A["teacher"].weight.shape) for m in base.transformer.modules() if hasattr(m, "lora_A")
    }
    assert ranks and all(r[0] == 16 for r in ranks), ranks
    prompts, attributes, heldout = _prompts(cfg, base, {})
    assert len(prompts) == len(attributes) == 24 and heldout.shape[0] == 24
    assert all(
        a["colour"] in ("red", "green", "blue") and a["motion"] in ("left", "right", "static")
        for a in attributes
    )
    assert all(p.endswith("on a black background") and " and a small " not in p for p in prompts)
    assert torch.isfinite(heldout).all()
