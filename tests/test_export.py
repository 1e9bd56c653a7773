"""``anyflow export`` (issue 19 item 1): a checkpoint as a diffusers folder or a diffusers LoRA file.

The reference is plain diffusers in a fresh interpreter (``PLAIN`` below: no anyflow import, checked through
``sys.modules``) against ``anyflow sample``'s sampler (``anyflow.sample.sample_latents``: the unmerged adapter
through ``flowmap_euler_sample`` / ``causal_rollout``), from the same noise, at NFE 1, 2 and 4, with the
exported scheduler and ``guidance_scale=1``.

Tolerance 1e-5 (absolute, on latents of magnitude ~4): both sides run the same fp32 weights on the same grid;
they differ in float rounding only — the merged ``W + (α/r)·B·A`` against peft's ``x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ``,
the pipeline's float64 step against ours, the prompt embedding computed twice. Measured: at most 6e-7. The
control (the base without the LoRA) is 1e-3 or more away, so the comparison can fail.

The export step of ``anyflow run --export`` in KFP's local runner is tested in tests/test_kfp_local.py, on the
one local-runner run that file's tests share.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anyflow import storage
from anyflow.cli import main as cli_main

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

NFES = (1, 2, 4)
TOL = 1e-5
PROMPTS = ["a red circle moving left on a black background", "a blue square moving up on a white background"]
FAST = {"teacher.train.steps": 2, "flowmap.train.steps": 2, "distill.train.steps": 2}

# Runs in a fresh interpreter with diffusers only (-I: no PYTHONPATH, no user site; it never imports anyflow),
# started once per module (``plain_diffusers``) so that torch and diffusers are imported once, not once per test:
# it reads one JSON spec per line on stdin and answers one line, "RESULT " + JSON (sigmas per NFE, class names; the
# latents are saved to the spec's "out" file) or "ERROR " + JSON (the traceback). Every request starts from a fresh
# interpreter's global random state and loads its pipeline anew: an answer does not depend on the requests before.
PLAIN = r'''
import json, math, sys, traceback
import torch
import diffusers
from safetensors.torch import load_file, save_file


def mask_padding_keys(pipe):
    """Optional (FAR only): diffusers' causal processor, but the zero padding keys it appends are masked out."""
    from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalAttnProcessor
    from torch.nn.attention.flex_attention import create_block_mask

    class Masked(AnyFlowCausalAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                     kv_cache=None, kv_cache_flag=None):
            if attention_mask is None:
                q = hidden_states.shape[1]
                pad = math.ceil(q / 128) * 128 - q
                real = q
                if kv_cache is not None and kv_cache_flag is not None and not kv_cache_flag.get("is_cache_step"):
                    real += kv_cache_flag["num_cached_compressed_tokens"] + kv_cache_flag["num_cached_full_tokens"]
                attention_mask = create_block_mask(lambda b, h, qi, ki: ki < real, B=None, H=None, Q_LEN=q + pad,
                                                   KV_LEN=real + pad, device=str(hidden_states.device))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                    kv_cache, kv_cache_flag)

    for block in pipe.transformer.blocks:
        block.attn1.set_processor(Masked())


def load(spec, with_lora):
    cls = getattr(diffusers, spec["pipeline"])
    pipe = cls.from_pretrained(spec["base"] if spec.get("lora_dir") else spec["dir"], torch_dtype=torch.float32)
    if spec.get("lora_dir") and with_lora:
        pipe.load_lora_weights(spec["lora_dir"], weight_name=spec["lora_file"])
        if spec.get("non_lora_file"):
            extra = load_file(f"{spec['lora_dir']}/{spec['non_lora_file']}")
            _, unexpected = pipe.transformer.load_state_dict(extra, strict=False)
            assert not unexpected, unexpected
    if spec.get("mask_padding"):
        mask_padding_keys(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(spec, pipe, prefix, out):
    noise = torch.randn(spec["shape"], generator=torch.Generator().manual_seed(spec["seed"]))  # (B, F, C, h, w)
    for n in spec["nfes"]:
        kw = dict(prompt=spec["prompts"], latents=noise.permute(0, 2, 1, 3, 4).clone(), num_inference_steps=n,
                  guidance_scale=1.0, num_frames=spec["num_frames"], height=spec["height"], width=spec["width"],
                  max_sequence_length=spec["max_sequence_length"], output_type="latent")
        if spec["pipeline"] == "AnyFlowFARPipeline":
            lat = pipe(**kw, chunk_partition=spec["chunk_partition"]).frames
        else:
            lat = pipe(**kw, return_dict=False)[0]
        out[f"{prefix}{n}"] = lat.permute(0, 2, 1, 3, 4).float().contiguous()


def run(spec):
    out = {}
    pipe = load(spec, True)
    sigmas = {}
    for n in spec["nfes"]:
        pipe.scheduler.set_timesteps(n)
        sigmas[n] = pipe.scheduler.sigmas.double().tolist()
    sample(spec, pipe, "nfe", out)
    if spec.get("control"):
        sample(spec, load(spec, False), "base", out)
    assert not [m for m in sys.modules if m == "anyflow" or m.startswith("anyflow.")], "anyflow was imported"
    save_file(out, spec["out"])
    return {"sigmas": sigmas, "scheduler": type(pipe.scheduler).__name__,
            "transformer": type(pipe.transformer).__name__}


for line in sys.stdin:
    torch.manual_seed(torch.initial_seed())  # a fresh interpreter's global random state, for every request
    try:
        print("RESULT " + json.dumps(run(json.loads(line))), flush=True)
    except Exception:
        print("ERROR " + json.dumps(traceback.format_exc()), flush=True)
'''


class PlainDiffusers:
    """The ``PLAIN`` interpreter of this module (fixture ``plain_diffusers``): one request at a time."""

    def __init__(self, folder: Path) -> None:
        script = folder / "plain_diffusers.py"
        script.write_text(PLAIN)
        self.stderr = (folder / "stderr.txt").open("w+")  # a file, not a pipe: a full pipe would block it
        # -I: isolated (no PYTHONPATH, no user site, the script's folder first): nothing puts the checkout on the path
        self.proc = subprocess.Popen([sys.executable, "-I", str(script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=folder)

    def __call__(self, tmp: Path, spec: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """Sample ``spec`` in the plain interpreter: (its answer, the latents it saved)."""
        spec = {**spec, "out": str(tmp / "plain.safetensors")}
        assert self.proc.poll() is None, f"the plain-diffusers interpreter exited: {self._stderr()}"
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:  # anything diffusers prints comes before the answer
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :]), load_file(spec["out"])
            if line.startswith("ERROR "):
                raise AssertionError("plain diffusers failed:\n" + json.loads(line[len("ERROR ") :]))
        raise AssertionError(f"the plain-diffusers interpreter exited: {self._stderr()}")

    def _stderr(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-4000:]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


@pytest.fixture(scope="module")
def plain_diffusers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlainDiffusers]:
    plain = PlainDiffusers(tmp_path_factory.mktemp("plain-diffusers"))
    yield plain
    plain.close()


def _spec(export_dir: Path, ref_shape: tuple[int, ...], **extra) -> dict:
    info = json.loads((export_dir / "config.json").read_text())
    spec = dict(
        dir=str(export_dir),
        pipeline=info["pipeline"],
        seed=0,
        shape=list(ref_shape),
        nfes=list(NFES),
        prompts=PROMPTS,
        num_frames=info["num_frames"],
        height=info["height"],
        width=info["width"],
        max_sequence_length=info["max_sequence_length"],
        chunk_partition=info.get("chunk_partition"),
    )
    if info["format"] == "lora":
        spec.update(
            lora_dir=str(export_dir),
            lora_file=info["lora_file"],
            base=info.get("base_url") or str(export_dir / info["base_folder"]),
            non_lora_file=info.get("non_lora_file"),
        )
    spec.update(extra)
    return spec


def _shifted(n: int, shift: float) -> list[float]:
    # docs/method.md §1.2, §2.4 written out: σ_i = s·u/(1 + (s − 1)·u), u = 1 − i/N, then the terminal 0.
    u = [1 - i / n for i in range(n)]
    return [shift * x / (1 + (shift - 1) * x) for x in u] + [0.0]


def _reference(checkpoint: str, preset: str) -> dict[int, torch.Tensor]:
    from anyflow.sample import sample_latents
    from anyflow.stages import common

    # fp32 on the CPU, like the plain-diffusers side (on a CUDA machine the stages would pick the GPU and bf16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "runtime_device", lambda: torch.device("cpu"))
        mp.setattr(common, "compute_dtype", lambda mixed_precision="auto": torch.float32)
        return {n: sample_latents(checkpoint, PROMPTS, nfe=n, preset=preset, seed=0)[0].cpu() for n in NFES}


def _export(checkpoint: str, fmt: str, out: Path) -> Path:
    assert cli_main(["export", checkpoint, "--format", fmt, "--output", str(out)]) == 0
    return out


def _check_artifact(export_dir: Path, checkpoint: str, fmt: str) -> None:
    storage.verify(str(export_dir))  # every file listed and hashed
    manifest = storage.read_manifest(str(export_dir))
    assert manifest["kind"] == "export" and manifest["extra"]["format"] == fmt
    assert [p["uri"] for p in manifest["parents"]] == [checkpoint]
    assert manifest["parents"][0]["manifest_sha256"] == storage.manifest_digest(checkpoint)


def _compare(got: dict[str, torch.Tensor], ref: dict[int, torch.Tensor], *, control: bool) -> None:
    for n in NFES:
        torch.testing.assert_close(got[f"nfe{n}"], ref[n], rtol=0, atol=TOL, msg=f"NFE {n}")
        if control:  # the comparison can fail: the base without the adapter is far away
            assert (got[f"base{n}"] - ref[n]).abs().max() > 100 * TOL


# ------------------------------------------------------------------------------------------ tiny (bidirectional)


@pytest.fixture(scope="module")
def tiny_ref(tiny_chain: dict) -> tuple[str, dict[int, torch.Tensor]]:
    ck = tiny_chain["generator"].uri  # the distilled generator of the shared tiny chain
    return ck, _reference(ck, "tiny")


@pytest.mark.slow
def test_diffusers_folder_samples_like_anyflow_sample(tiny_ref, tmp_path, plain_diffusers):
    ck, ref = tiny_ref
    out = _export(ck, "diffusers", tmp_path / "export")
    _check_artifact(out, ck, "diffusers")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "AnyFlowPipeline"
    assert {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")), "safetensors only"
    meta, got = plain_diffusers(tmp_path, _spec(out, tuple(ref[1].shape)))
    assert (
        meta["scheduler"] == "FlowMapEulerDiscreteScheduler"
        and meta["transformer"] == "AnyFlowTransformer3DModel"
    )
    for n in NFES:
        assert meta["sigmas"][str(n)] == pytest.approx(_shifted(n, 5.0), abs=1e-12)
    _compare(got, ref, control=False)


@pytest.mark.slow
def test_lora_file_on_the_base_samples_like_anyflow_sample(tiny_ref, tmp_path, plain_diffusers):
    ck, ref = tiny_ref
    out = _export(ck, "lora", tmp_path / "export")
    _check_artifact(out, ck, "lora")
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert not (out / "non_lora.safetensors").exists()  # a bidirectional generator is LoRA only
    _, got = plain_diffusers(tmp_path, _spec(out, tuple(ref[1].shape), control=True))
    _compare(got, ref, control=True)


# ------------------------------------------------------------------------------------------ far-tiny (causal)


@pytest.fixture(scope="module")
def far_ref(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[int, torch.Tensor]]:
    from anyflow.stages import run_stage

    store = str(tmp_path_factory.mktemp("far-store"))
    ds = run_stage("prepare_data", preset="far-tiny", store=store, overrides=FAST, progress=False).uri
    ck = run_stage(
        "train_flowmap",
        preset="far-tiny",
        store=store,
        overrides=FAST,
        inputs={"dataset": ds},
        progress=False,
    ).uri
    return ck, _reference(ck, "far-tiny")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["diffusers", "lora"])
def test_far_export_samples_like_anyflow_sample(far_ref, tmp_path, fmt, plain_diffusers):
    """AnyFlowFARPipeline over the export equals ``anyflow sample`` (N steps per chunk, KV cache) once the zero
    padding keys diffusers appends are masked — by a processor written in the plain script, not anyflow's."""
    ck, ref = far_ref
    out = _export(ck, fmt, tmp_path / "export")
    _check_artifact(out, ck, fmt)
    info = json.loads((out / "config.json").read_text())
    assert info["pipeline"] == "AnyFlowFARPipeline" and info["chunk_partition"] == [1, 3, 3, 3]
    if fmt == "lora":
        assert set(load_file(str(out / "non_lora.safetensors"))) == {
            "far_patch_embedding.weight",
            "far_patch_embedding.bias",
        }
    else:
        assert json.loads((out / "model_index.json").read_text())["_class_name"] == "AnyFlowFARPipeline"
    meta, got = plain_diffusers(tmp_path, _spec(out, tuple(ref[1].shape), mask_padding=True, control=fmt == "lora"))
    assert meta["transformer"] == "AnyFlowFARTransformer3DModel"
    _compare(got, ref, control=fmt == "lora")


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="diffusers 0.42.1: AnyFlowFARTransformer3DModel._forward_inference passes no "
    "mask, so its causal processor attends the zero keys it pads to a multiple of 128 (measured "
    "~0.04-0.05 off on far-tiny); when diffusers fixes it this passes: update docs/interfaces.md",
)
def test_far_export_with_diffusers_default_processor(far_ref, tmp_path, plain_diffusers):
    ck, ref = far_ref
    out = _export(ck, "diffusers", tmp_path / "export")
    _, got = plain_diffusers(tmp_path, _spec(out, tuple(ref[1].shape)))
    _compare(got, ref, control=False)


# ------------------------------------------------------------------------------------------ inputs and locations


def _small_checkpoint(out: Path, seed: int = 0) -> str:
    """A tiny-preset generator checkpoint in the stages' format (no training: LoRA B drawn at random)."""
    from anyflow.config import get_preset, to_dict
    from anyflow.stages import common

    cfg = get_preset("tiny")
    base = common.load_models(cfg)
    models = common.adapter_model(cfg, base.transformer)
    models.add("generator", "generator", trainable=False)
    g = torch.Generator().manual_seed(seed)
    state = {
        k: (torch.randn(v.shape, generator=g) * 0.05 if ".lora_B." in k else v)
        for k, v in models.state("generator").items()
    }
    stage = out.parent / (out.name + "-staging")
    common.write_checkpoint(stage, cfg, {"generator": ("generator", state)}, kind="flowmap")
    storage.publish(stage, str(out), kind="flowmap", config=to_dict(cfg))
    shutil.rmtree(stage)
    return str(out)


def test_corrupted_checkpoint_is_refused_before_any_work(tmp_path, capsys):
    ck = _small_checkpoint(tmp_path / "ck")
    target = Path(ck) / "adapters" / "generator.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01  # one bit, the size unchanged
    target.write_bytes(bytes(data))
    rc = cli_main(["export", ck, "--format", "diffusers", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "generator.safetensors" in err[0] and "sha256 mismatch" in err[0]
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint_and_bad_values_are_refused(tmp_path, capsys):
    ck = _small_checkpoint(tmp_path / "ck")
    ds = tmp_path / "dataset"
    ds.mkdir()
    (ds / "index.json").write_text("{}")
    storage.publish(ds, str(ds), kind="dataset")
    assert cli_main(["export", str(ds), "--format", "lora", "--output", str(tmp_path / "o1")]) == 2
    assert "not a model checkpoint" in capsys.readouterr().err
    assert cli_main(["export", ck, "--format", "lora", "--output", ck]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["export", ck, "--format", "onnx", "--output", str(tmp_path / "o2")])
    assert exc.value.code == 2 and "onnx" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_export_from_and_to_s3(tmp_path, s3_prefix):
    local = _small_checkpoint(tmp_path / "ck")
    remote = f"{s3_prefix}/ck"
    storage.publish(storage.fetch(local), remote, kind="flowmap")  # the same files, now on S3
    assert cli_main(["export", remote, "--format", "lora", "--output", f"{s3_prefix}/export"]) == 0
    _check_artifact_remote = storage.read_manifest(f"{s3_prefix}/export")
    assert [p["uri"] for p in _check_artifact_remote["parents"]] == [remote]
    storage.verify(f"{s3_prefix}/export")
    # S3 checkpoint -> local folder, and local checkpoint -> local folder: the same LoRA tensors
    assert cli_main(["export", remote, "--format", "lora", "--output", str(tmp_path / "from-s3")]) == 0
    assert cli_main(["export", local, "--format", "lora", "--output", str(tmp_path / "from-local")]) == 0
    a = load_file(str(tmp_path / "from-s3" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "from-local" / "pytorch_lora_weights.safetensors"))
    c = load_file(str(storage.fetch_file(f"{s3_prefix}/export", "pytorch_lora_weights.safetensors")))
    # and a local checkpoint to S3
    assert cli_main(["export", local, "--format", "lora", "--output", f"{s3_prefix}/export-2"]) == 0
    d = load_file(str(storage.fetch_file(f"{s3_prefix}/export-2", "pytorch_lora_weights.safetensors")))
    assert [p["uri"] for p in storage.read_manifest(f"{s3_prefix}/export-2")["parents"]] == [local]
    assert a.keys() == b.keys() == c.keys() == d.keys() and all(
        torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) and torch.equal(a[k], d[k]) for k in a
    )
    # and they are the checkpoint's own adapter tensors under diffusers' names
    ck = load_file(str(Path(local) / "adapters" / "generator.safetensors"))
    assert {f"transformer.{k}" for k in ck} == set(a)
    assert all(torch.equal(a[f"transformer.{k}"], v) for k, v in ck.items())


# ------------------------------------------------------------------------------------------ KFP component and steps


def test_export_component_interface(monkeypatch):
    import components

    monkeypatch.setenv("ANYFLOW_IMAGE", "registry.example/anyflow-train:v0.1.0-abc1234")
    spec = components.build_export_component().component_spec
    assert {k: v.type.split("@")[0] for k, v in spec.inputs.items() if v.type.startswith("system.")} == {
        "checkpoint": "system.Model"
    }
    assert spec.inputs["checkpoint"].optional
    assert {k: (v.type, v.default) for k, v in spec.inputs.items() if not v.type.startswith("system.")} == {
        "store": ("String", ""),
        "formats": ("String", "diffusers,lora"),
        "checkpoint_uri": ("String", ""),
        "promoted_config_json": ("String", ""),
        "dtype": ("String", "float32"),
    }
    assert {k: v.type.split("@")[0] for k, v in spec.outputs.items()} == {
        "exports": "system.Artifact",
        "Output": "String",
    }
    for name, io in {**spec.inputs, **spec.outputs}.items():
        assert io.description, f"export: parameter {name!r} has no docstring entry"
    assert spec.implementation.container.image == "registry.example/anyflow-train:v0.1.0-abc1234"


def test_export_component_body_writes_to_the_store_and_reuses(tmp_path, capsys):
    from kfp import dsl

    from anyflow import registry
    from components.export.component import export

    ck = _small_checkpoint(tmp_path / "ck")
    store = str(tmp_path / "store")
    out = dsl.Artifact(uri=str(tmp_path / "kfp" / "exports"))
    urls = json.loads(export(exports=out, store=store, formats="lora", checkpoint_uri=ck))
    key = storage.manifest_digest(ck)[:20]
    assert urls == {"lora": f"{store}/exports/lora/{key}"}
    assert json.loads(Path(out.path).read_text())["anyflow_uri"] == urls  # pointer file
    first = (
        storage.read_manifest(urls["lora"])["created_at"],
        (Path(urls["lora"]) / "manifest.json").stat().st_mtime_ns,
    )
    capsys.readouterr()
    export(
        exports=dsl.Artifact(uri=str(tmp_path / "kfp" / "again")),
        store=store,
        formats="lora",
        checkpoint_uri=ck,
    )
    assert "reusing lora export" in capsys.readouterr().out
    # the converted base is written once per store and named by every LoRA export of the same base
    info = json.loads((Path(urls["lora"]) / "config.json").read_text())
    base_url = info["base_url"]
    assert base_url.startswith(f"{store}/exports/base/") and "base_folder" not in info
    assert not (Path(urls["lora"]) / "base").exists()
    assert storage.read_manifest(base_url)["kind"] == "export-base"
    assert [p["uri"] for p in storage.read_manifest(urls["lora"])["parents"]] == [ck, base_url]
    base_stamp = (Path(base_url) / "manifest.json").stat().st_mtime_ns
    ck2 = _small_checkpoint(tmp_path / "ck2", seed=1)
    urls2 = json.loads(
        export(
            exports=dsl.Artifact(uri=str(tmp_path / "kfp" / "2")),
            store=store,
            formats="lora",
            checkpoint_uri=ck2,
        )
    )
    assert urls2["lora"] != urls["lora"]
    assert json.loads((Path(urls2["lora"]) / "config.json").read_text())["base_url"] == base_url
    assert "already at" in capsys.readouterr().out
    assert (Path(base_url) / "manifest.json").stat().st_mtime_ns == base_stamp
    assert (
        storage.read_manifest(urls["lora"])["created_at"],
        (Path(urls["lora"]) / "manifest.json").stat().st_mtime_ns,
    ) == first
    # the redistill step: the model the alias names
    registry.promote(store, "anyflow-t2v", ck, metrics={}, reason="test")
    promoted = json.loads(
        export(
            exports=dsl.Artifact(uri=str(tmp_path / "kfp" / "p")),
            store=store,
            formats="lora",
            promoted_config_json='{"name": "anyflow-t2v"}',
        )
    )
    assert promoted == urls
    capsys.readouterr()
    # nothing promoted under another name, or an unknown format: one line, exit 2
    for kwargs in ({"promoted_config_json": '{"name": "other"}'}, {"checkpoint_uri": ck, "formats": "onnx"}):
        with pytest.raises(SystemExit) as exc:
            export(
                exports=dsl.Artifact(uri=str(tmp_path / "kfp" / "x")),
                store=store,
                **{"formats": "lora", **kwargs},
            )
        assert exc.value.code == 2


@pytest.mark.parametrize("name", [pytest.param("anyflow-t2v", marks=pytest.mark.slow), "anyflow-redistill"])
def test_pipelines_have_an_optional_export_step(name, tmp_path, monkeypatch):
    import yaml

    from pipelines.compile import compile_pipeline

    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    doc = next(yaml.safe_load_all(compile_pipeline(name, tmp_path / "p.yaml").read_text()))
    params = doc["root"]["inputDefinitions"]["parameters"]
    assert params["export"]["parameterType"] == "BOOLEAN" and params["export"]["defaultValue"] is False
    text = json.dumps(doc)
    assert "comp-export" in doc["components"]
    assert "pipelinechannel--export'] == true" in text
    if name == "anyflow-redistill":  # only after a promotion
        assert "redistill-decide-Output'] == 'promoted'" in text


def test_bfloat16_export_holds_the_float32_export_rounded(tmp_path):
    from safetensors import safe_open

    ck = _small_checkpoint(tmp_path / "ck")
    for dtype in ("float32", "bfloat16"):
        args = ["export", ck, "--format", "diffusers", "--output", str(tmp_path / dtype), "--dtype", dtype]
        assert cli_main(args) == 0
    path = "transformer/diffusion_pytorch_model.safetensors"
    full = load_file(str(tmp_path / "float32" / path))
    half = load_file(str(tmp_path / "bfloat16" / path))
    assert full.keys() == half.keys()
    from diffusers import AnyFlowTransformer3DModel

    keep = (
        AnyFlowTransformer3DModel._keep_in_fp32_modules
    )  # what from_pretrained keeps in fp32, as upstream says
    kept = {k for k, v in half.items() if v.dtype == torch.float32}
    assert kept and kept == {k for k in half if any(m in k.split(".") for m in keep)}
    assert sum(v.dtype == torch.bfloat16 for v in half.values()) > len(half) // 2
    for k, v in half.items():  # merged in fp32, then rounded once (or twice: base, then base + delta)
        torch.testing.assert_close(v.float(), full[k], rtol=2e-2, atol=1e-3, msg=k)
    with safe_open(str(tmp_path / "bfloat16" / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())  # the VAE stays fp32
    assert json.loads((tmp_path / "bfloat16" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_lora_export_with_a_shared_base_samples_like_anyflow_sample(tmp_path, plain_diffusers):
    ck = _small_checkpoint(tmp_path / "ck", seed=2)
    out, base = tmp_path / "export", tmp_path / "base"
    args = ["export", ck, "--format", "lora", "--output", str(out), "--base-output", str(base)]
    assert cli_main(args) == 0
    assert json.loads((out / "config.json").read_text())["base_url"] == str(base)
    ref = _reference(ck, "tiny")
    spec = _spec(out, tuple(ref[1].shape), control=True)
    spec["base"] = str(base)
    _, got = plain_diffusers(tmp_path, spec)
    _compare(got, ref, control=True)
