"""The shipped extended (augmented) VBench prompts and docs/method.md §11's split: generate from the
extended prompt, name and score by the original prompt_en."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import statistics

import pytest
import torch

from anyflow import config
from anyflow.eval import vbench as vb
from anyflow.stages import evaluate

EXTENDED = vb.ASSETS / "vbench_prompts_extended.txt"
# Vchitect/VBench prompts/augmented_prompts/Wan2.1-T2V-1.3B/all_dimension_aug_wanx_seed42.txt at commit
# 88f4f099ba7c67e6f8e6c50a0433df57d4a4cf6f (assets/README.md): 755 921 characters, 946 lines.
EXTENDED_SHA256 = "54fb940aea8f1ede1e8728f62d3e67efacdd7b341fb8a6c91308bcba874d5d5d"
STOP = set("a an the of in on at with and to is are by for from its it this that as be".split())


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP]


def _coverage(standard: str, extended: str) -> float:
    """Share of the standard prompt's content words that occur in the extended prompt."""
    words, seen = _words(standard), set(_words(extended))
    return sum(w in seen for w in words) / max(1, len(words))


@pytest.fixture(autouse=True)
def _shipped_file(monkeypatch):
    monkeypatch.delenv("ANYFLOW_VBENCH_EXTENDED", raising=False)


def test_shipped_file_is_vbenchs_text():
    raw = EXTENDED.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == EXTENDED_SHA256
    text = raw.decode("utf-8")
    assert len(text) == 755_921 and b"\r" not in raw and text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert len(lines) == 946 and all(line.strip() == line and line for line in lines)
    assert lines[0].startswith("In a still frame, a classic red stop sign stands prominently")
    assert lines[-1].startswith("A unique and avant-garde surfboard design")
    assert (vb.ASSETS / "README.md").read_text().count("88f4f099ba7c67e6f8e6c50a0433df57d4a4cf6f") == 1


def test_extended_lines_pair_with_standard_lines():
    standard, extended = vb.load_prompts("vbench"), vb.load_prompts("vbench-extended")
    assert len(standard) == len(extended) == 946
    cover = [_coverage(s, e) for s, e in zip(standard, extended, strict=True)]
    # Line i expands prompt i: most lines keep the original's content words, a shifted pairing does not.
    assert statistics.mean(cover) > 0.85
    assert sum(c >= 0.5 for c in cover) >= 900
    for shift in (-1, 1):
        shifted = [_coverage(standard[i], extended[i + shift]) for i in range(1, 945)]
        assert statistics.mean(shifted) < 0.35
    # The expander ran with a fixed seed: the prompts VBench lists twice got the same expansion.
    for i, j in ((495, 748), (503, 746)):
        assert standard[i] == standard[j] and extended[i] == extended[j]
    assert standard[0] == "In a still frame, a stop sign" and "stop sign" in extended[0]


def test_load_extended_without_env(monkeypatch):
    prompts = vb.load_prompts("vbench-extended", n=4, seed=3)  # n and seed do not apply to fixed sets
    assert len(prompts) == 946
    assert prompts == EXTENDED.read_text(encoding="utf-8").splitlines()


def test_vbench_names():
    standard, extended = vb.load_prompts("vbench"), vb.load_prompts("vbench-extended")
    gen = [extended[2], extended[2], extended[0], extended[503]]
    assert vb.vbench_names("vbench-extended", gen) == [standard[2], standard[2], standard[0], standard[503]]
    assert vb.vbench_names("vbench-extended", extended) == standard
    assert vb.vbench_names("vbench", standard[:3]) == standard[:3]
    assert vb.vbench_names("procedural", ["a red ball"]) == ["a red ball"]
    with pytest.raises(ValueError, match="not in the extended VBench set"):
        vb.vbench_names("vbench-extended", [standard[0]])


def _extended_preset(num_prompts: int, samples_per_prompt: int) -> config.Preset:
    p = config.get_preset("tiny")
    ev = dataclasses.replace(
        p.evaluate, prompts="vbench-extended", num_prompts=num_prompts, samples_per_prompt=samples_per_prompt,
        vbench=True, nfes=(1,), vbench_dimensions=("temporal_flickering",),
    )  # fmt: skip
    return dataclasses.replace(p, evaluate=ev)


def test_evaluate_generates_from_extended_and_names_by_original(tmp_path, monkeypatch):
    cfg = _extended_preset(num_prompts=3, samples_per_prompt=2)
    standard, extended = vb.load_prompts("vbench"), vb.load_prompts("vbench-extended")
    # What the evaluate stage encodes with the text encoder (run(): base.text.encode(prompts)).
    prompts, attributes, heldout = evaluate._prompts(cfg, None, {})
    assert prompts == extended[:3] and attributes is None and heldout is None
    expanded = [p for p in prompts for _ in range(cfg.evaluate.samples_per_prompt)]

    seen: dict = {}

    def fake_run_vbench(videos_dir, dimensions, *, output_dir, **kw):
        seen["files"] = sorted(p.name for p in videos_dir.iterdir())
        seen["prompt_file"] = json.loads((videos_dir / vb.PROMPT_FILE).read_text(encoding="utf-8"))
        return {d: {"status": "ok", "score": 0.9} for d in dimensions}

    monkeypatch.setattr(vb, "run_vbench", fake_run_vbench)
    monkeypatch.setattr(vb, "find_vbench", lambda: ["fake"])
    videos = torch.linspace(-1, 1, len(expanded)).view(-1, 1, 1, 1, 1).expand(-1, 3, 2, 16, 16)
    samplers = {"teacher": lambda n, sl: pytest.fail("the teacher is not scored"), "generator": lambda n, sl: videos[sl]}
    out = evaluate._vbench(cfg, tmp_path, samplers, lambda v: v, expanded)

    assert set(out) == {"generator/nfe1"}
    assert out["generator/nfe1"]["dimensions"]["temporal_flickering"]["score"] == 0.9
    names = [f"{s}-{i}.mp4" for s in standard[:3] for i in range(2)]
    assert seen["files"] == sorted([*names, vb.PROMPT_FILE])
    assert seen["prompt_file"] == {f"{s}-{i}.mp4": s for s in standard[:3] for i in range(2)}
    assert not any(e in json.dumps(seen, ensure_ascii=False) for e in extended[:3])

    with pytest.raises(ValueError, match="consecutive copies"):
        evaluate._vbench(cfg, tmp_path, samplers, lambda v: v, [*prompts, *prompts])
