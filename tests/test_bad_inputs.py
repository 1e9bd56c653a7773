"""Bad configs and inputs fail with one sentence naming the field or file, exit 2 and no traceback (issue 22
items 4 and 6).

The campaign's cases as a table, each run through the command line, ``anyflow stage ...``: in-process through
``anyflow.cli.main`` (which maps failures with ``anyflow.errors.run_with_exit_codes``, as the installed
script does), and a few in a real subprocess (``anyflow stage`` and ``python -m anyflow.stages.<name>``).
A case whose failure comes from inside the stage (the data, an input checkpoint, trained weights) runs
under a KFP run id and must leave the failure marker, so a KFP retry of the run stops at once; config
errors fail while the preset is resolved, before any key exists and before anything is loaded, so a retry
stops as fast without one.

Rerun the whole campaign with ``pytest tests/test_bad_inputs.py -v`` (the S3 cases need moto, as the
rest of the S3 tests do).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from anyflow import storage
from anyflow.cli import main as cli_main
from anyflow.data.shards import NEGATIVE, NEGATIVE_KEY, ShardWriter
from anyflow.stages import FAILURE_MARKER, RUN_ENV

ROOT = Path(__file__).resolve().parent.parent

# (case, stage, arguments, text the one error line must hold: the field or the file)
CONFIG_CASES = [
    ("fps=0", "prepare_data", ["--set", "data.fps=0"], "data.fps=0: must be in [1, 240]"),
    ("samples_per_shard=0", "prepare_data", ["--set", "data.samples_per_shard=0"], "data.samples_per_shard=0"),
    ("checkpoint_every=0", "train_teacher", ["--set", "teacher.train.checkpoint_every=0"],
     "teacher.train.checkpoint_every=0: must be in [1,"),
    ("checkpoint_every=-1", "train_teacher", ["--set", "teacher.train.checkpoint_every=-1"],
     "teacher.train.checkpoint_every=-1"),
    ("log_every=0", "train_flowmap", ["--set", "flowmap.train.log_every=0"], "flowmap.train.log_every=0"),
    ("lr=NaN", "train_flowmap", ["--set", "flowmap.optim.lr=NaN"], "flowmap.optim.lr=nan: expected a finite number"),
    ("lr=nan", "train_flowmap", ["--set", "flowmap.optim.lr=nan"], "flowmap.optim.lr=nan: expected a finite number"),
    ("lr=inf", "train_teacher", ["--set", "teacher.optim.lr=inf"], "teacher.optim.lr=inf: expected a finite number"),
    ("lr=-Infinity", "train_teacher", ["--set", "teacher.optim.lr=-Infinity"], "teacher.optim.lr=-inf"),
    ("lr<0", "train_teacher", ["--set", "teacher.optim.lr=-0.001"], "teacher.optim.lr=-0.001: must be in (0, 1]"),
    ("beta1=2", "distill", ["--set", "distill.generator_optim.beta1=2"],
     "distill.generator_optim.beta1=2.0: must be in [0, 1)"),
    ("seed=-1", "train_teacher", ["--set", "teacher.train.seed=-1"], "teacher.train.seed=-1: must be in [0,"),
    ("loss.shift<0", "train_flowmap", ["--set", "flowmap.loss.shift=-1"], "flowmap.loss.shift=-1.0: must be > 0"),
    ("teacher.shift=0", "train_teacher", ["--set", "teacher.shift=0"], "teacher.shift=0.0: must be > 0"),
    ("text_dropout=5", "train_teacher", ["--set", "teacher.text_dropout=5"],
     "teacher.text_dropout=5.0: must be in [0, 1]"),
    ("weight_type unknown", "train_flowmap", ["--set", "flowmap.loss.weight_type=cubic"],
     "flowmap.loss.weight_type='cubic': must be one of beta08, gaussian, uniform"),
    ("lora_rank=0", "train_teacher", ["--set", "model.lora_rank=0"], "model.lora_rank=0: must be in [1,"),
    ("lora_rank=-4", "train_teacher", ["--set", "model.lora_rank=-4"], "model.lora_rank=-4"),
    ("height=65536", "prepare_data", ["--set", "data.height=65536", "--set", "data.width=65536"],
     "data.height=65536: must be in [16, 8192]"),
    ("frames x size oversized", "prepare_data",
     ["--set", "data.frames=1025", "--set", "data.height=4096", "--set", "data.width=4096"],
     "data.frames x data.height x data.width = 1025x4096x4096"),
    ("ema_decay=1.5", "distill", ["--set", "distill.train.ema_decay=1.5"], "distill.train.ema_decay=1.5: must be in [0, 1]"),
    ("ema_decay=-0.1", "train_teacher", ["--set", "teacher.train.ema_decay=-0.1"], "teacher.train.ema_decay=-0.1"),
    ("ema_decay=NaN", "distill", ["--set", "distill.train.ema_decay=NaN"], "distill.train.ema_decay=nan"),
    ("heldout_fraction=NaN", "evaluate", ["--set", "data.heldout_fraction=NaN"], "data.heldout_fraction=nan"),
    ("steps=1e23", "train_teacher", ["--set", "teacher.train.steps=1e23"],
     "teacher.train.steps: expected an integer, got 1e+23"),
    ("steps=10**23", "train_teacher", ["--set", f"teacher.train.steps={10**23}"],
     f"teacher.train.steps={10**23}: must be in [1, 1000000000]"),
    ("procedural:n=abc", "prepare_data", ["--set", "data.source=procedural:n=abc"],
     "data.source='procedural:n=abc': n='abc' must be a whole number"),
    ("procedural:n=0", "prepare_data", ["--set", "data.source=procedural:n=0"],
     "data.source='procedural:n=0': n=0 clips must be in [1,"),
    ("unknown mixed_precision", "train_teacher", ["--set", "teacher.train.mixed_precision=fp8"],
     "teacher.train.mixed_precision='fp8': must be one of auto, no, bf16, fp16"),
]

# (case, YAML text, text the error line must hold; {path} is the file)
YAML_CASES = [
    ("YAML syntax error", "teacher:\n  train: {steps: 3\n", "--config {path}: not valid YAML at line"),
    ("YAML .nan", "teacher:\n  optim:\n    lr: .nan\n", "teacher.optim.lr=nan: expected a finite number"),
    ("YAML not UTF-8", b"teacher:\n  shift: \xff\n", "--config {path}: not UTF-8 text"),
]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    """(exit code, the error lines, all of stderr) of ``anyflow ARGV`` in this process; an exception that
    escapes ``run_with_exit_codes`` is what the installed script would print as a traceback with exit 1."""
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception:
        code = 1
        print(traceback.format_exc(), file=sys.stderr)
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if re.match(r"anyflow( [a-z_-]+)*: error: ", ln)], err


def _assert_refused(code: int, lines: list[str], err: str, names: str) -> None:
    assert "Traceback" not in err, err
    assert code == 2, err
    assert len(lines) == 1, err
    assert names in lines[0], lines[0]


def _published(store: Path) -> list[Path]:
    return sorted(store.glob("artifacts/*/*/manifest.json"))


@pytest.mark.parametrize(("case", "stage", "args", "names"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values_are_refused_naming_the_key(case, stage, args, names, tmp_path, capsys) -> None:
    store = tmp_path / "store"
    code, lines, err = _run(["stage", stage, "--store", str(store), "--no-progress", *args], capsys)
    _assert_refused(code, lines, err, names)
    assert not _published(store)


@pytest.mark.parametrize(("case", "text", "names"), YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_bad_config_files_are_refused_naming_the_file(case, text, names, tmp_path, capsys) -> None:
    path = tmp_path / "overrides.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, lines, err = _run(["stage", "prepare_data", "--store", str(tmp_path / "s"), "--no-progress",
                             "--config", str(path)], capsys)
    _assert_refused(code, lines, err, names.format(path=path))


# --------------------------------------------------------------------------------------------- data


def _marker(store: Path, stage: str) -> dict:
    (marker,) = store.glob(f"checkpoints/{stage}/*/{FAILURE_MARKER}")
    return json.loads(marker.read_text())


#: Indexes whose text cannot be read are refused while prepare_data's key is computed (the key holds the source's
#: listing: anyflow.stages.prepare_data.source_digest), before any checkpoint folder exists.
READ_WHILE_KEYING = {"empty CSV", "empty JSONL", "CSV not UTF-8"}
DATA_CASES = [  # (case, index file name, bytes, text the error line must hold)
    ("CSV without a video column", "index.csv", b"clip,caption\na.mp4,a red ball\n",
     "needs a header row with columns 'video' and 'caption'; found columns 'clip', 'caption'"),
    ("empty CSV", "index.csv", b"", "the index is empty"),
    ("empty JSONL", "index.jsonl", b"\n\n", "the index is empty"),
    pytest.param("CSV not UTF-8", "index.csv", b"video,caption\na.mp4,caf\xe9\n", "the index is not UTF-8 text",
                 id="CSV not UTF-8"),
]


@pytest.mark.parametrize(("case", "name", "data", "names"), DATA_CASES,
                         ids=[c[0] if isinstance(c, tuple) else None for c in DATA_CASES])
def test_bad_data_sources_are_refused_naming_the_file(case, name, data, names, tmp_path, capsys, monkeypatch) -> None:
    index = tmp_path / name
    index.write_bytes(data)
    store = tmp_path / "store"
    monkeypatch.setenv(RUN_ENV, "anyflow-t2v-campaign")
    code, lines, err = _run(["stage", "prepare_data", "--store", str(store), "--no-progress",
                             "--set", f"data.source={index}"], capsys)
    _assert_refused(code, lines, err, names)
    assert f"data.source={index}" in lines[0]
    if case in READ_WHILE_KEYING:  # refused while the stage's key is computed (it lists the source): no key, so no
        assert not list(store.glob("checkpoints/*/*"))  # marker, and a retry fails as fast at the same place
    else:
        assert _marker(store, "prepare_data")["run"] == "anyflow-t2v-campaign"
    assert not _published(store)


def test_source_errors_name_the_file_when_read_directly(tmp_path) -> None:
    """The data-source reader itself (what prepare streams through): a non-UTF-8 index is a SourceError."""
    from anyflow.config import StageInputError
    from anyflow.data.sources import SourceError, open_source

    index = tmp_path / "index.csv"
    index.write_bytes(b"video,caption\na.mp4,caf\xe9\n")
    with pytest.raises(SourceError, match=r"index.csv: the index is not UTF-8 text \(byte 23"):
        list(open_source(str(index)))
    assert issubclass(SourceError, StageInputError)


# ------------------------------------------------------------------------------- input artifacts


def _dataset(root: Path, n: int = 8) -> str:
    g = torch.Generator().manual_seed(0)
    w = ShardWriter(root, samples_per_shard=4)
    for i in range(n):
        w.add(f"s{i:03d}", torch.randn((3, 4, 4, 4), generator=g), torch.randn((16, 32), generator=g), f"caption {i}")
    w.close()
    save_file({NEGATIVE_KEY: torch.zeros(1, 16, 32)}, str(root / NEGATIVE))
    storage.publish(root, root, kind="dataset")
    return str(root)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _dataset(tmp_path_factory.mktemp("campaign") / "dataset")


def _manifest_cases() -> list[tuple[str, object]]:
    def files_as_list(m: dict) -> bytes:
        return json.dumps({**m, "files": list(m["files"])}).encode()

    def no_hash(m: dict) -> bytes:
        rel = next(iter(m["files"]))
        m["files"][rel].pop("sha256")
        return json.dumps(m).encode()

    def size_as_string(m: dict) -> bytes:
        rel = next(iter(m["files"]))
        m["files"][rel]["size"] = str(m["files"][rel]["size"])
        return json.dumps(m).encode()

    def not_utf8(m: dict) -> bytes:
        return json.dumps(m).encode().replace(b'"dataset"', b'"dat\xff\xfeset"', 1)

    def schema_version_string(m: dict) -> bytes:
        return json.dumps({**m, "schema_version": "2"}).encode()

    return [("manifest not UTF-8", not_utf8), ("manifest files as a list", files_as_list),
            ("manifest entry without a hash", no_hash), ("manifest size as a string", size_as_string),
            ("manifest schema_version a string", schema_version_string)]


@pytest.mark.parametrize(("case", "corrupt"), _manifest_cases(), ids=[c[0] for c in _manifest_cases()])
def test_malformed_input_manifests_are_bad_input(case, corrupt, dataset, tmp_path, capsys) -> None:
    import shutil

    bad = tmp_path / "dataset"
    shutil.copytree(dataset, bad)
    manifest = bad / "manifest.json"
    manifest.write_bytes(corrupt(json.loads(manifest.read_text())))
    store = tmp_path / "store"
    code, lines, err = _run(["stage", "train_teacher", "--store", str(store), "--no-progress",
                             "--in", f"dataset={bad}"], capsys)
    _assert_refused(code, lines, err, f"input dataset={bad} is not a valid artifact: {manifest}")
    assert not _published(store)


def _checkpoint(root: Path, adapter_bytes: bytes) -> str:
    """A generator checkpoint artifact whose adapter file holds ``adapter_bytes``, published (hashes match)."""
    (root / "adapters").mkdir(parents=True)
    (root / "adapters" / "generator.safetensors").write_bytes(adapter_bytes)
    (root / "model.json").write_text(json.dumps({
        "kind": "flowmap", "variant": "bidirectional", "base": "builtin:tiny", "lora": {"rank": 4, "alpha": 4.0},
        "adapters": {"generator": {"role": "generator", "file": "adapters/generator.safetensors"}},
    }))
    storage.publish(root, root, kind="flowmap")
    return str(root)


def test_a_pickle_named_safetensors_is_bad_input_with_the_marker(dataset, tmp_path, capsys, monkeypatch) -> None:
    gen = _checkpoint(tmp_path / "gen", pickle.dumps({"lora_A": [0.0] * 16}))
    store = tmp_path / "store"
    monkeypatch.setenv(RUN_ENV, "anyflow-t2v-campaign")
    code, lines, err = _run(["stage", "finetune", "--store", str(store), "--no-progress",
                             "--in", f"dataset={dataset}", "--in", f"generator={gen}"], capsys)
    _assert_refused(code, lines, err, "adapter file 'adapters/generator.safetensors' is not a readable safetensors file")
    assert gen in lines[0]
    assert _marker(store, "finetune")["error"] == "StageInputError"


def test_fp16_on_cpu_is_refused_naming_the_setting(dataset, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    store = tmp_path / "store"
    monkeypatch.setenv(RUN_ENV, "anyflow-t2v-campaign")
    code, lines, err = _run(["stage", "train_teacher", "--store", str(store), "--no-progress",
                             "--in", f"dataset={dataset}", "--set", "teacher.train.mixed_precision=fp16"], capsys)
    _assert_refused(code, lines, err, "teacher.train.mixed_precision='fp16' needs a CUDA GPU")
    assert _marker(store, "train_teacher")["error"] == "ConfigError"


# ------------------------------------------------------------------------ item 4: non-finite weights


def test_non_finite_trained_weights_are_not_published(dataset, tmp_path, capsys, monkeypatch) -> None:
    """What ``distill.train.ema_decay=NaN`` did before the config refused it (4608/4608 NaN values in the
    generator, exit 0), injected into the one EMA update now that no setting can: the export is refused with the
    tensor and the setting, exit 2, the marker, and nothing published."""
    from anyflow.train import loop

    real = loop.ema_step
    monkeypatch.setattr(loop, "ema_step", lambda ema, value, decay: real(ema, value, float("nan") if decay else decay))
    store = tmp_path / "store"
    monkeypatch.setenv(RUN_ENV, "anyflow-t2v-campaign")
    code, lines, err = _run(["stage", "train_teacher", "--store", str(store), "--no-progress",
                             "--in", f"dataset={dataset}", "--set", "teacher.train.steps=3",
                             "--set", "teacher.train.ema_warmup_step=2"], capsys)
    _assert_refused(code, lines, err, "teacher: refusing to publish adapter 'teacher': tensor ")
    assert "values NaN or infinite after 3 steps; the trained weights were finite, so the EMA is at fault: check " \
           "teacher.train.ema_decay=0.9" in lines[0], lines[0]
    assert _marker(store, "train_teacher")["error"] == "NonFiniteWeights"
    assert not _published(store)


def test_a_learning_rate_that_overflows_float32_is_refused(capsys, tmp_path) -> None:
    """``lr=1e300`` crashed inside AdamW (the step size overflows float32): the range refuses it first."""
    code, lines, err = _run(["stage", "train_teacher", "--store", str(tmp_path), "--no-progress",
                             "--set", "teacher.optim.lr=1e300"], capsys)
    _assert_refused(code, lines, err, "teacher.optim.lr=1e+300: must be in (0, 1]")


def test_non_finite_config_values_never_reach_config_json() -> None:
    from anyflow.config import ConfigError, apply_overrides, from_dict, get_preset, to_dict

    doc = to_dict(get_preset("tiny"))
    doc["distill"]["train"]["ema_decay"] = float("nan")  # an artifact's config.json written by the old code
    with pytest.raises(ConfigError, match=r"distill\.train\.ema_decay=nan"):
        from_dict(doc)
    json.dumps(to_dict(apply_overrides(get_preset("tiny"), {})), allow_nan=False)


# ---------------------------------------------------------------------------------------------- S3


@pytest.mark.s3
@pytest.mark.parametrize("case", ["missing bucket", "no credentials", "malformed endpoint"])
def test_s3_settings_that_cannot_work_are_bad_input(case, s3_server, s3_prefix, capsys, monkeypatch) -> None:
    monkeypatch.setenv("ANYFLOW_S3_RETRIES", "2")
    store, names = s3_prefix, ""
    if case == "missing bucket":
        store, names = "s3://no-such-bucket-anyflow/store", "bucket 'no-such-bucket-anyflow' does not exist"
    elif case == "no credentials":
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(k, raising=False)
        names = "Unable to locate credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    else:
        monkeypatch.setenv("ANYFLOW_S3_ENDPOINT", "htp:/not a url")
        names = "S3 endpoint 'htp:/not a url' (--s3-endpoint, ANYFLOW_S3_ENDPOINT, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) is not a valid URL"
    code, lines, err = _run(["stage", "prepare_data", "--store", store, "--no-progress"], capsys)
    _assert_refused(code, lines, err, names)


@pytest.mark.s3
def test_s3_bad_credentials_are_bad_input(s3_server, capsys, monkeypatch) -> None:
    """A store that checks credentials (moto with IAM auth on) refuses the fake key: 403, exit 2."""
    from s3server import MotoServer

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
    server = MotoServer().start()
    try:
        monkeypatch.setenv("ANYFLOW_S3_ENDPOINT", server.endpoint)
        code, lines, err = _run(["stage", "prepare_data", "--store", "s3://anyflow-test/store", "--no-progress"], capsys)
    finally:
        server.stop()
    _assert_refused(code, lines, err, "S3 refused the request (403); check the credentials (AWS_ACCESS_KEY_ID")


# -------------------------------------------------------------------------------- real processes


def test_the_entry_points_exit_2_with_one_line(tmp_path: Path) -> None:
    """What a pod runs: ``anyflow stage`` and ``python -m anyflow.stages.<name>`` as processes."""
    env = {**os.environ, RUN_ENV: "anyflow-t2v-campaign", "PYTHONPATH": str(ROOT)}
    index = tmp_path / "index.csv"
    index.write_bytes(b"clip,caption\na.mp4,a red ball\n")
    store = tmp_path / "store"
    runs = [
        ([sys.executable, "-m", "anyflow.cli", "stage", "distill", "--store", str(store), "--no-progress",
          "--set", "distill.train.ema_decay=NaN"], "distill.train.ema_decay=nan: expected a finite number"),
        ([sys.executable, "-m", "anyflow.stages.prepare_data", "--store", str(store), "--no-progress",
          "--set", f"data.source={index}"], f"data.source={index}: a CSV index needs a header row"),
    ]
    for argv, names in runs:
        p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        lines = [ln for ln in p.stderr.splitlines() if re.match(r"anyflow( stage)?: error: ", ln)]
        assert "Traceback" not in p.stderr, p.stderr
        assert p.returncode == 2 and len(lines) == 1 and names in lines[0], p.stderr
    assert _marker(store, "prepare_data")["error"] == "SourceError"
    assert not _published(store)
