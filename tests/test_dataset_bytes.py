"""Prepared datasets are reproducible byte for byte (issue 22, item 5).

safetensors writes a file's ``__metadata__`` from a hash map whose order changes from process to process, so
the same samples gave shards with different bytes, different sha256 in the manifest and different cache keys
downstream. Each writer here is a separate Python process (different ``PYTHONHASHSEED``; safetensors' own
hash seed differs per process anyway) running ``prepare()`` on the same procedural source.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent

WRITER = r"""
import sys
import torch
from anyflow.data.prepare import prepare
from anyflow.models.tiny import build_tiny_text_encoder, build_tiny_vae
from anyflow.models.vae import VideoVAE

torch.manual_seed(0)
vae, text = VideoVAE(build_tiny_vae(seed=0)), build_tiny_text_encoder(seed=0)
prepare("procedural:n=6,seed=3", encode_video=vae.encode, encode_text=text.encode, negative_prompt="blurry",
        out_dir=sys.argv[1], frames=5, height=16, width=16, fps=8, samples_per_shard=1, progress=False,
        batch_size=2)
"""



def _write(out: Path, hash_seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", WRITER, str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_written_by_two_processes_is_byte_identical(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "1")
    _write(b, "2")
    shards = sorted(p.name for p in a.glob("shard-*.safetensors"))
    assert len(shards) == 6, shards  # one sample per shard: six independent chances for the order to differ
    da, db = _digests(a), _digests(b)
    assert da.keys() == db.keys()
    differ = sorted(k for k in da if da[k] != db[k])
    assert not differ, f"files differ between two writers of the same input: {differ}"
    assert "summary.json" in da  # compared byte for byte too: it holds no run timing
    assert "seconds" not in json.loads((a / "summary.json").read_text())


def test_canonical_shards_read_like_before(tmp_path: Path) -> None:
    """The rewritten header holds the same fields: a plain safetensors reader sees the tensors and the metadata
    keys the earlier layout had (and the loader reads files written by safetensors itself, the old layout)."""
    from safetensors.torch import save_file

    from anyflow.data.shards import LatentDataset, ShardWriter, shard_name

    lat = torch.arange(2 * 2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 2, 4, 2, 2)
    txt = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    caps = ["ünïcode “caption” 0", "caption 1"]
    w = ShardWriter(tmp_path / "new", samples_per_shard=2)
    for i in range(2):
        w.add(f"k{i}", lat[i], txt[i], caps[i])
    w.close()
    path = tmp_path / "new" / shard_name(0)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert json.loads(meta["keys"]) == ["k0", "k1"] and json.loads(meta["captions"]) == caps
        assert torch.equal(f.get_tensor("latents"), lat) and torch.equal(f.get_tensor("text"), txt)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0  # data stays 8-byte aligned, as safetensors writes it

    # A shard in the layout safetensors wrote before this fix (its own header order) still loads.
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.json").write_text((tmp_path / "new" / "index.json").read_text())
    save_file({"latents": lat, "text": txt}, str(old / shard_name(0)),
              metadata={"format": "anyflow-latent-shards/1", "keys": json.dumps(["k0", "k1"]),
                        "captions": json.dumps(caps)})
    for root in (old, tmp_path / "new"):
        batch = next(LatentDataset(str(root), batch_size=2, seed=0, shuffle=False))
        assert batch["keys"] == ["k0", "k1"] and batch["captions"] == caps
        assert torch.equal(batch["latents"], lat) and torch.equal(batch["text"], txt)
