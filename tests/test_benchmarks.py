"""Smoke tests of the benchmark scripts (no timing assertions: timings belong to benchmark runs, not tests)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, argv: list[str], monkeypatch) -> dict:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    return runpy.run_path(str(BENCHMARKS / name), run_name="__main__")


def test_quick_run_writes_every_ratio(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    run_script("run.py", ["--quick", "--json", str(out)], monkeypatch)
    report = json.loads(out.read_text())
    assert set(report["ratios"]) == {"mose_vs_lora_train_step", "mose_vs_lora_forward", "mose_vs_lora_peak_memory",
                                     "hydra_vs_fast_layer", "mose_vs_lora_matched_train_step",
                                     "mose_vs_lora_matched_forward", "ar_vs_plain_decode"}
    assert all(isinstance(v, float) for v in report["ratios"].values())  # timing ratios: no assertions on values
    assert report["ratios"]["mose_vs_lora_peak_memory"] > 1  # counted, not timed: MoSE has more parameters
    assert report["visual_tokens"] == 259 and report["batch"] == 2


def test_quick_run_on_a_bfloat16_base(tmp_path, monkeypatch):
    """A bf16 base with fp32 adapter weights (what ``--device cuda`` runs): every part of the run, the layer-level
    comparison too, takes the frozen model's dtype as its input."""
    out = tmp_path / "bench.json"
    run_script("run.py", ["--quick", "--dtype", "bfloat16", "--json", str(out)], monkeypatch)
    report = json.loads(out.read_text())
    assert report["dtype"] == "torch.bfloat16" and report["ratios"]["mose_vs_lora_peak_memory"] > 1


@pytest.mark.gpu
def test_quick_run_on_cuda(tmp_path, monkeypatch):
    """``run.py --device cuda`` end to end on the tiny shape (bf16 base): what benchmarks/gpu.sh then runs at 7B."""
    out = tmp_path / "bench.json"
    run_script("run.py", ["--quick", "--device", "cuda", "--json", str(out)], monkeypatch)
    report = json.loads(out.read_text())
    assert report["machine"]["gpu"] and report["dtype"] == "torch.bfloat16"
    assert report["medians_seconds_or_bytes"]["train_memory_bytes_mose"] > 0


def test_hydra_layer_reference_equals_the_fast_layer(monkeypatch):
    """The benchmark's HydraLoRA-style loop computes the same layer as the fast path (else the ratio would be
    meaningless)."""
    import torch

    bench = runpy.run_path(str(BENCHMARKS / "run.py"))
    models = bench["build_models"](bench["SHAPES"]["quick"], torch.float32, "cpu")
    mods = bench["token_layout"](batch=2)
    layer = next(m for m in models["mose"].modules() if isinstance(m, bench["MoSELayer"]))
    x = torch.randn(2, mods.shape[1], layer.in_features)
    with torch.no_grad():
        with models["mose"].base_model.scope.layer_call(mods):
            out = layer(x)
        lam = models["mose"].base_model.routing_stats()[layer.layer_name]["lambda"]
        hydra = layer.base_layer(x) + bench["hydra_layer_delta"](layer, x, mods, lam)
    torch.testing.assert_close(hydra, out, rtol=1e-4, atol=1e-5)


def test_parameter_count_adds_one_b_and_a_gate_per_expert():
    bench = runpy.run_path(str(BENCHMARKS / "param_count.py"))
    one, two = bench["count"](1), bench["count"](2)
    targets, d, r = 32 * 2, 4096, 64
    assert two["mose"] - one["mose"] == targets * 3 * (d * r + 2 * d)  # a B (d x r) per expert, gates appear at N=2
    assert one["router"] == targets * (2 * (2 * d) + 2 + 2 + 1)


def test_parameter_count_of_the_table_6_designs():
    """Arithmetic on the 7B shape: an A per B adds 3 (N-1) r d per target, no router removes exactly the router."""
    bench = runpy.run_path(str(BENCHMARKS / "param_count.py"))
    targets, d, r = 32 * 2, 4096, 64
    mose = bench["count"]()
    assert bench["count"](expert_kind="symmetric")["mose"] - mose["mose"] == targets * 3 * r * d
    no_router = bench["count"](router=False)
    assert no_router["router"] == 0 and mose["mose"] - no_router["mose"] == mose["router"]
    moae = bench["count"](expert_kind="moae", n_experts=4)
    assert moae["mose"] == targets * 4 * (2 * r * d + d) and moae["router"] == 0


def test_decode_benchmark_times_every_step_of_every_model(tmp_path, monkeypatch):
    out = tmp_path / "decode.json"
    run_script("decode.py", ["--quick", "--threads", "1", "--json", str(out)], monkeypatch)
    report = json.loads(out.read_text())
    assert set(report["ratios"]) == {"mose_vs_lora_decode_ops", "mose_vs_lora_train_forward_ops",
                                     "mose_vs_lora_decode_1_threads", "mose_vs_lora_decode_1_threads_median",
                                     "lora_vs_base_decode_1_threads"}
    latency = report["decode_seconds_per_token"]["1_threads"]
    assert set(latency) == {"base", "lora", "mose"}
    assert all(0 < v["quiet"] <= v["median"] for v in latency.values())  # the fastest rounds' steps, then all
    assert report["ops"]["mose"]["decode_step"] > 0 and report["ops"]["lora"]["decode_step"] > 0


def test_step_clock_stamps_each_generated_token():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

    sys.path.insert(0, str(BENCHMARKS))
    from timing import StepClock

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=50)).eval()
    clock = StepClock()
    model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                   pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    assert len(clock.stamps) == 5 and len(clock.steps()) == 4 and clock.prefill() > 0
    assert all(step > 0 for step in clock.steps())


def test_decode_benchmark_runs_a_bfloat16_base_and_records_where(tmp_path, monkeypatch):
    out = tmp_path / "decode.json"
    run_script("decode.py", ["--quick", "--threads", "1", "--dtype", "bfloat16", "--json", str(out)], monkeypatch)
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16" and report["machine"]["device"] == "cpu" and report["machine"]["gpu"] is None
    assert report["ops"]["mose"]["decode_step"] > 0


@pytest.mark.gpu
def test_decode_benchmark_times_on_cuda(tmp_path, monkeypatch):
    out = tmp_path / "decode.json"
    run_script("decode.py", ["--quick", "--device", "cuda", "--threads", "1", "--dtype", "bfloat16", "--json",
                             str(out)], monkeypatch)  # fmt: skip
    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cuda" and report["machine"]["gpu"]
    assert all(v["quiet"] > 0 for v in report["decode_seconds_per_token"]["1_threads"].values())
