"""The benchmarks' own machinery (issue 18): peak-FLOPs lookup by full device name, the alternation of
compared cases, FLOP counting, and the analytic adapter bytes. No timing is asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_training as bt
from benchmarks.sampling_extras import peak_bf16


@pytest.mark.parametrize(
    ("name", "variant", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),  # what torch reports for the SXM5 card
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H200", "H200 SXM", 989.4),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", "GH200", 989.4),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100-SXM4-40GB", "A100", 312.0),
        ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
        ("NVIDIA H100", None, None),  # variant not named: no guessed peak
        ("NVIDIA L40S", None, None),
        ("Tesla V100-SXM2-16GB", None, None),
    ],
)
def test_peak_lookup_reads_the_whole_device_name(name, variant, tflops):
    key, peak = peak_bf16(name)
    assert key == variant
    assert (peak is None) if tflops is None else peak == pytest.approx(tflops * 1e12)


def test_alternate_runs_each_case_once_per_round_in_both_orders():
    order: list[str] = []
    cases = {k: (lambda k=k: order.append(k)) for k in ("a", "b", "c")}
    times = bt.alternate(cases, rounds=4, warmup=1)
    assert order == ["a", "b", "c", "a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    lo, med, pairs = bt.ratio_stats([2.0, 4.0, 9.0], [1.0, 1.0, 3.0])
    assert (lo, med, pairs) == (2.0, 3.0, 3)


def test_count_flops_matches_matmul_arithmetic():
    """Forward + backward of a bias-free linear layer: 2·B·I·O forward, 2·B·I·O each for the input and weight
    gradients."""
    b, i, o = 8, 32, 16
    lin = torch.nn.Linear(i, o, bias=False)
    x = torch.randn(b, i, requires_grad=True)
    assert bt.count_flops(lambda: lin(x).sum().backward()) == 6 * b * i * o
    with torch.no_grad():
        assert bt.count_flops(lambda: lin(x)) == 2 * b * i * o


def test_analytic_adapter_bytes_are_what_adapter_model_keeps():
    """The analytic table's adapter bytes (frozen teacher bf16, trained critic and generator fp32) equal the
    bytes AdapterModel really holds for the three adapters over a bf16 base, on the tiny shape."""
    from anyflow.models import lora
    from anyflow.train.adapters import AdapterModel

    rank = 4
    transformer, _ = bt._build("tiny", "cpu", None)
    transformer.to(torch.bfloat16)
    models = AdapterModel(transformer, rank=rank, alpha=float(rank), gradient_checkpointing=False)
    models.add("teacher", "teacher", trainable=False)
    models.add("critic", "critic")
    models.add("generator", "generator")
    with models.frozen_adapters_stored_in(torch.bfloat16):
        held = sum(
            p.numel() * p.element_size()
            for role in ("teacher", "critic", "generator")
            for p in lora.trainable_parameters(models.transformer, role).values()
        )
    assert all(p.dtype == torch.float32 for p in models.params("generator").values())
    a = bt.analytic_memory("tiny", rank=rank)
    assert a["shared_bytes"] - 2 * a["base"] == held
    assert a["copies_bytes"] - a["shared_bytes"] == 2 * 2 * a["base"]


def test_quick_runner_prints_total_budget_and_load(tmp_path, monkeypatch, capsys):
    """``anyflow bench --quick`` ends with the total of the per-benchmark seconds, the 3-minute budget it is sized
    for and the load average (issue 18); each benchmark gets its quick argv. A stand-in module, no real benchmark."""
    from anyflow import bench

    (tmp_path / "fake_bench_mod.py").write_text(
        "import time\nSEEN = []\ndef main(argv):\n    SEEN.append(list(argv))\n    time.sleep(0.2)\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bench, "BENCHMARKS", {"fake": "fake_bench_mod"})
    monkeypatch.setattr(bench, "QUICK_ARGS", {"fake": ["--rounds", "1"]})
    assert bench.run_benchmarks([], quick=True) == 0
    import fake_bench_mod

    assert fake_bench_mod.SEEN == [["--rounds", "1"]]
    lines = capsys.readouterr().out.splitlines()
    fake = float(next(line for line in lines if line.startswith("fake ")).split()[1])
    total = next(line for line in lines if line.startswith("total"))
    assert fake >= 0.2 and float(total.split()[1]) == fake
    assert "sized for 180 s on an idle 2-core machine" in total and "load average here" in total


def test_quick_uses_one_torch_thread_where_a_benchmark_takes_threads():
    """The quick smoke passes --threads 1 to every benchmark whose parser has --threads (bench_zero and bench_bytes
    default to one thread; bench_dataprep sets one itself)."""
    from anyflow import bench

    for name in ("training", "sampling"):
        argv = bench.benchmark_argv(name, quick=True, device=None, e2e=False)
        assert argv[argv.index("--threads") + 1] == "1"
