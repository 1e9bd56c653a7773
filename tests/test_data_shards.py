"""Latent shards: exact round-trip, deterministic shuffling, rank partitioning, exact resume, S3 streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from anyflow.data.shards import DatasetError, LatentDataset, ShardWriter

N, SHAPE_LAT, SHAPE_TXT = 23, (2, 3, 2, 2), (4, 5)


def _samples(n: int = N) -> list[tuple[str, torch.Tensor, torch.Tensor, str]]:
    g = torch.Generator().manual_seed(0)
    return [(f"clip-{i:03d}", torch.randn(SHAPE_LAT, generator=g), torch.randn(SHAPE_TXT, generator=g), f"caption {i}")
            for i in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ds")
    writer = ShardWriter(out, samples_per_shard=5)
    for s in _samples():
        writer.add(*s)
    index = writer.close()
    save_file({"negative_embedding": torch.arange(20.0).view(1, 4, 5)}, str(out / "negative.safetensors"))
    return out, index


def _take(ds: LatentDataset, n: int) -> list[dict]:
    return [next(ds) for _ in range(n)]


def test_writer_index_and_exact_roundtrip(dataset: tuple[Path, dict]) -> None:
    root, index = dataset
    assert [s["num_samples"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    assert index["num_samples"] == N and index["latents"]["shape"] == list(SHAPE_LAT) and index["text"]["shape"] == list(SHAPE_TXT)
    assert json.loads((root / "index.json").read_text()) == index
    assert sorted(p.name for p in root.glob("shard-*")) == [f"shard-{i:05d}.safetensors" for i in range(5)]
    ds = LatentDataset(str(root), batch_size=4, seed=0, shuffle=False, drop_last=False)
    assert ds.len_samples == N and ds.batches_per_epoch == 6
    batches = _take(ds, 6)
    ref = _samples()
    assert [k for b in batches for k in b["keys"]] == [s[0] for s in ref]
    assert [c for b in batches for c in b["captions"]] == [s[3] for s in ref]
    assert torch.equal(torch.cat([b["latents"] for b in batches]), torch.stack([s[1] for s in ref]))
    assert torch.equal(torch.cat([b["text"] for b in batches]), torch.stack([s[2] for s in ref]))
    assert batches[-1]["latents"].shape == (3, *SHAPE_LAT) and batches[0]["latents"].dtype == torch.float32
    assert next(ds)["keys"] == ["clip-000", "clip-001", "clip-002", "clip-003"]  # epoch 1 starts over
    assert torch.equal(ds.negative_embedding(), torch.arange(20.0).view(1, 4, 5))


def test_shuffle_is_deterministic_per_seed_and_epoch(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    order = lambda seed: [k for b in _take(LatentDataset(str(root), batch_size=5, seed=seed), 8) for k in b["keys"]]  # noqa: E731
    a, b, c = order(1), order(1), order(2)
    assert a == b and a != c
    epoch0, epoch1 = a[:20], a[20:40]  # 4 full batches per epoch (3 samples dropped)
    assert len(set(epoch0)) == 20 and epoch0 != epoch1 and len(set(epoch1)) == 20
    assert epoch0 != sorted(epoch0)  # actually shuffled
    # Chunked shuffling: an epoch visits the shards one after another (each as one contiguous run), in
    # an order that changes with the seed.
    runs = []
    for seed in (1, 2, 3):
        keys = [b["keys"][0] for b in _take(LatentDataset(str(root), batch_size=1, seed=seed), N)]
        shards = [int(k.split("-")[1]) // 5 for k in keys]
        run = [s for i, s in enumerate(shards) if i == 0 or s != shards[i - 1]]
        assert sorted(run) == [0, 1, 2, 3, 4]  # 5 runs: every shard read in one go
        runs.append(run)
    assert any(run != [0, 1, 2, 3, 4] for run in runs) and len({tuple(r) for r in runs}) > 1
    # Each batch gets its latents from the rows its keys name.
    ref = {s[0]: s[1] for s in _samples()}
    batch = next(LatentDataset(str(root), batch_size=5, seed=1))
    assert torch.equal(batch["latents"], torch.stack([ref[k] for k in batch["keys"]]))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_deal_the_one_global_stream(dataset: tuple[Path, dict], world_size: int) -> None:
    """The k-th batch of rank r is global batch k·W + r of the single-process stream: ranks are disjoint within an
    epoch, together they read exactly what one process reads, and epochs follow in the same global order."""
    root, _ = dataset
    b, rounds = 2, 9  # 9 rounds of W batches of 2 cross the 11-batch epochs of 23 samples
    single = LatentDataset(str(root), batch_size=b, seed=5)
    assert single.batches_per_epoch == N // b
    stream = [x["keys"] for x in _take(single, rounds * world_size)]
    per_rank = [[x["keys"] for x in _take(LatentDataset(str(root), batch_size=b, seed=5, rank=r, world_size=world_size),
                                          rounds)] for r in range(world_size)]
    assert [per_rank[r][k] for k in range(rounds) for r in range(world_size)] == stream
    first_epoch = [k for batch in stream[: N // b] for k in batch]
    assert len(first_epoch) == len(set(first_epoch)) == (N // b) * b  # one epoch: disjoint, all but N % b read
    # the independent reference for the stream itself: the epoch order is shards permuted, then rows in each shard
    sid, row = single.epoch_order(0)
    assert sorted(zip(sid.tolist(), row.tolist(), strict=True)) == [(s, r) for s in range(len(single._counts))
                                                                     for r in range(single._counts[s])]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (2, 3), (1, 2)])
def test_a_state_resumes_on_another_number_of_ranks(dataset: tuple[Path, dict], before: int, after: int) -> None:
    """The position is one global sample cursor: ranks that drew the same number of batches (a step boundary)
    agree on it, and any number of ranks continues the single-process stream from there, bit-for-bit."""
    root, _ = dataset
    b, done, rest = 2, 5, 4  # 5 rounds of ``before`` batches, then 4 rounds of ``after``
    stream = _take(LatentDataset(str(root), batch_size=b, seed=9), (done * before) + rest * after)
    old = [LatentDataset(str(root), batch_size=b, seed=9, rank=r, world_size=before) for r in range(before)]
    for ds in old:
        _take(ds, done)
    states = [json.loads(json.dumps(ds.state_dict())) for ds in old]  # survives a JSON round trip
    assert all(s["sample_cursor"] == done * before * b for s in states)
    new = [LatentDataset(str(root), batch_size=b, seed=9, rank=r, world_size=after) for r in range(after)]
    for ds in new:
        ds.load_state_dict(states[0])
    got = [x for x in zip(*[_take(ds, rest) for ds in new], strict=True)]
    got = [batch for round_ in got for batch in round_]
    for want, have in zip(stream[done * before :], got, strict=True):
        assert want["keys"] == have["keys"] and torch.equal(want["latents"], have["latents"])
    with pytest.raises(ValueError, match="batch_size"):  # another micro-batch size is another stream
        LatentDataset(str(root), batch_size=3, seed=9).load_state_dict(states[0])
    with pytest.raises(ValueError, match="per-rank positions"):  # the older per-rank layout
        new[0].load_state_dict({"epoch": 0, "cursor": 4, "seed": 9, "rank": 0, "world_size": 2})


def test_resume_continues_exactly(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    make = lambda: LatentDataset(str(root), batch_size=3, seed=9, rank=1, world_size=2)  # noqa: E731
    straight = _take(make(), 12)  # 11 samples per rank -> 3 batches per epoch: crosses 3 epoch boundaries
    for stop in (2, 3, 7):
        first = make()
        _take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint metadata)
        resumed = make()
        resumed.load_state_dict(state)
        for want, got in zip(straight[stop:], _take(resumed, 12 - stop), strict=True):
            assert want["keys"] == got["keys"] and torch.equal(want["latents"], got["latents"])
            assert torch.equal(want["text"], got["text"])
    with pytest.raises(ValueError, match="seed"):
        make().load_state_dict({**make().state_dict(), "seed": 10})


def test_errors_name_the_dataset(tmp_path: Path, dataset: tuple[Path, dict]) -> None:
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        LatentDataset(str(tmp_path / "nowhere"), batch_size=2, seed=0)
    empty = ShardWriter(tmp_path / "empty", samples_per_shard=4)
    empty.close()
    with pytest.raises(DatasetError, match="empty"):
        LatentDataset(str(tmp_path / "empty"), batch_size=2, seed=0)
    with pytest.raises(DatasetError, match="too few"):
        LatentDataset(str(dataset[0]), batch_size=24, seed=0, world_size=2)
    writer = ShardWriter(tmp_path / "bad", samples_per_shard=4)
    writer.add("a", torch.zeros(SHAPE_LAT), torch.zeros(SHAPE_TXT), "x")
    with pytest.raises(ValueError, match="duplicate"):
        writer.add("a", torch.zeros(SHAPE_LAT), torch.zeros(SHAPE_TXT), "x")
    with pytest.raises(ValueError, match="earlier samples"):
        writer.add("b", torch.zeros(SHAPE_LAT), torch.zeros(3, 5), "x")


@pytest.mark.s3
def test_reading_from_s3_matches_local(dataset: tuple[Path, dict], s3_server, s3_prefix: str, tmp_path: Path) -> None:
    from anyflow import storage

    root, _ = dataset
    storage.publish(root, s3_prefix, kind="dataset")
    kwargs = dict(batch_size=4, seed=3, rank=0, world_size=2)
    local = _take(LatentDataset(str(root), **kwargs), 5)
    remote_ds = LatentDataset(s3_prefix, cache_dir=tmp_path / "cache", **kwargs)
    remote = _take(remote_ds, 5)
    for a, b in zip(local, remote, strict=True):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])
    assert torch.equal(remote_ds.negative_embedding(), torch.arange(20.0).view(1, 4, 5))
    with pytest.raises(DatasetError, match=s3_prefix.split("/")[-1]):
        LatentDataset(s3_prefix + "-missing", batch_size=2, seed=0)
