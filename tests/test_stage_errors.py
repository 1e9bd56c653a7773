"""Bad input to the training stages gives one clear error (issue 4, "Bad input").

Every case goes through :func:`anyflow.stages.run_stage` (the entry point of the CLI and of the KFP
components) with a temporary store; the valid artifacts come from the session ``tiny_chain`` fixture.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyflow import storage
from anyflow.config import ConfigError, StageInputError
from anyflow.data.shards import NEGATIVE, NEGATIVE_KEY, LatentDataset, ShardWriter
from anyflow.stages import run_stage
from anyflow.train.loop import TrainingDiverged

FAST = {"teacher.train.steps": 2, "flowmap.train.steps": 2, "distill.train.steps": 2}
LAT_SHAPE = (3, 4, 4, 4)  # tiny preset: 9 frames -> 3 latent frames, 4 channels, 32/8 = 4
TXT_SHAPE = (16, 32)


def _write_dataset(root: Path, n: int, *, nan_keys: frozenset[str] = frozenset(), per_shard: int = 4) -> str:
    """A dataset artifact of ``n`` random samples (those in ``nan_keys`` get NaN latents), published in place."""
    g = torch.Generator().manual_seed(0)
    w = ShardWriter(root, samples_per_shard=per_shard)
    for i in range(n):
        lat = torch.randn(LAT_SHAPE, generator=g)
        if f"s{i:03d}" in nan_keys:
            lat[0, 0, 0, 0] = float("nan")
        w.add(f"s{i:03d}", lat, torch.randn(TXT_SHAPE, generator=g), f"caption {i}")
    w.close()
    save_file({NEGATIVE_KEY: torch.zeros(1, *TXT_SHAPE)}, str(root / NEGATIVE))
    storage.publish(root, root, kind="dataset")
    return str(root)


# ------------------------------------------------------------------------------------------ datasets


def test_missing_dataset_url_is_a_clear_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-dataset")
    with pytest.raises(StageInputError, match=re.escape(missing)) as exc:
        run_stage("train_teacher", store=str(tmp_path / "store"), overrides=FAST, inputs={"dataset": missing},
                  progress=False)
    assert "not a valid artifact" in str(exc.value) and "manifest.json" in str(exc.value)


def test_missing_input_role_names_the_expected_inputs(tmp_path: Path) -> None:
    with pytest.raises(StageInputError, match=r"missing input\(s\) dataset"):
        run_stage("train_flowmap", store=str(tmp_path), overrides=FAST, inputs={}, progress=False)
    with pytest.raises(StageInputError, match=r"unknown input\(s\) datset"):
        run_stage("train_flowmap", store=str(tmp_path), overrides=FAST, inputs={"datset": str(tmp_path)},
                  progress=False)


def test_empty_dataset_is_a_clear_error(tmp_path: Path) -> None:
    empty = _write_dataset(tmp_path / "empty", 0)
    assert storage.read_manifest(empty)["kind"] == "dataset"  # a valid artifact, just without samples
    store = tmp_path / "store"
    with pytest.raises(StageInputError, match=r"empty \(0 samples") as exc:
        run_stage("train_flowmap", store=str(store), overrides=FAST, inputs={"dataset": empty}, progress=False)
    assert empty in str(exc.value)
    assert not list(store.glob("artifacts/*/*/manifest.json"))


def test_dataset_too_small_for_the_batch(tmp_path: Path) -> None:
    one = _write_dataset(tmp_path / "one", 1)
    with pytest.raises(StageInputError, match=r"1 samples: too few for batch_size 2"):
        run_stage("train_teacher", store=str(tmp_path / "store"), overrides=FAST, inputs={"dataset": one},
                  progress=False)


# --------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_of_another_lora_rank_is_refused(tiny_chain, tmp_path: Path) -> None:
    ds = tiny_chain["dataset"].uri
    store = str(tmp_path / "store")
    teacher_r2 = run_stage("train_teacher", store=store, overrides={**FAST, "model.lora_rank": 2},
                           inputs={"dataset": ds}, progress=False)
    assert json.loads((Path(teacher_r2.uri) / "model.json").read_text())["lora"]["rank"] == 2
    with pytest.raises(StageInputError) as exc:
        run_stage("distill", store=store, overrides=FAST, progress=False,
                  inputs={"dataset": ds, "teacher": teacher_r2.uri, "flowmap": tiny_chain["flowmap"].uri})
    msg = str(exc.value)
    assert teacher_r2.uri in msg and "'rank': 2" in msg and "'rank': 4" in msg
    assert not list(Path(store).glob("artifacts/distill/*/manifest.json"))


def test_checkpoint_of_the_wrong_kind_is_refused(tiny_chain, tmp_path: Path) -> None:
    ds, fm = tiny_chain["dataset"].uri, tiny_chain["flowmap"].uri
    store = str(tmp_path / "store")
    # a flow-map checkpoint where the teacher belongs: it holds a generator adapter, not a teacher one
    with pytest.raises(StageInputError, match=r"holds adapters \['generator'\], not 'teacher'"):
        run_stage("distill", store=store, overrides=FAST, progress=False,
                  inputs={"dataset": ds, "teacher": fm, "flowmap": fm})
    # a dataset where a checkpoint belongs
    with pytest.raises(StageInputError, match=r"not a model checkpoint \(no model.json\)"):
        run_stage("finetune", store=store, overrides=FAST, progress=False, inputs={"dataset": ds, "generator": ds})


# ------------------------------------------------------------------------------------------- presets


def test_unknown_preset_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'wan2.1-t2v-7b'; valid presets: demo, far-1.3b, far-14b, far-tiny, tiny, wan2.1-t2v-1.3b"):
        run_stage("prepare_data", preset="wan2.1-t2v-7b", store=str(tmp_path), progress=False)


def test_incompatible_frame_count_and_mistyped_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.frames=10: must be 4k\+1"):
        run_stage("prepare_data", store=str(tmp_path), overrides={"data.frames": 10}, progress=False)
    with pytest.raises(ConfigError, match=r"unknown config key 'teacher.train.stpes'.*valid keys there: steps,"):
        run_stage("train_teacher", store=str(tmp_path), overrides={"teacher.train.stpes": 3}, progress=False)
    with pytest.raises(ConfigError, match=r"teacher.train.steps: expected an integer, got 'many'"):
        run_stage("train_teacher", store=str(tmp_path), overrides={"teacher.train.steps": "many"}, progress=False)


def test_checkpoint_of_another_preset_base_is_refused(tiny_chain, tmp_path: Path) -> None:
    """Tiny checkpoints fed to a 1.3B-preset stage: refused before any model is loaded."""
    with pytest.raises(StageInputError, match=r"trained on base 'builtin:tiny', but the preset uses '/models/Wan2.1-T2V-1.3B"):
        run_stage("distill", preset="wan2.1-t2v-1.3b", store=str(tmp_path), progress=False,
                  inputs={"dataset": tiny_chain["dataset"].uri, "teacher": tiny_chain["teacher"].uri,
                          "flowmap": tiny_chain["flowmap"].uri})


# ------------------------------------------------------------------------------------------ NaN loss


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path: Path) -> None:
    """One sample with a NaN latent, first drawn at step 3: the run stops there, names step 3 and the
    step-2 checkpoint, leaves that checkpoint intact (finite) and publishes no output artifact."""
    n, batch = 16, 2
    clean = _write_dataset(tmp_path / "clean", n)
    loader = LatentDataset(clean, batch_size=batch, seed=0)  # the stage's loader: same seed, same order
    batches = [next(loader)["keys"] for _ in range(3)]
    bad_key = batches[2][0]
    assert bad_key not in batches[0] + batches[1]
    data = _write_dataset(tmp_path / "nan", n, nan_keys=frozenset({bad_key}))

    store = tmp_path / "store"
    over = {"teacher.train.steps": 6, "teacher.train.checkpoint_every": 2, "teacher.train.batch_size": batch}
    with pytest.raises(TrainingDiverged) as exc:
        run_stage("train_teacher", store=str(store), overrides=over, inputs={"dataset": data}, progress=False)
    msg = str(exc.value)
    assert re.search(r"\bstep 3\b", msg), msg
    ckpts = list(store.glob("checkpoints/train_teacher/*/step-*"))  # one step-numbered folder survives
    assert len(ckpts) == 1
    assert "last good checkpoint" in msg and str(ckpts[0]) in msg, msg
    # the published training state is the step-2 one, complete and finite
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert state["step"] == 2
    storage.verify(str(ckpts[0]))
    for name in ("params.safetensors", "ema.safetensors"):
        assert all(bool(torch.isfinite(v).all()) for v in load_file(str(ckpts[0] / name)).values())
    # no artifact at the output: nothing downstream can pick up a half-trained model
    assert not list(store.glob("artifacts/train_teacher/*/manifest.json"))
