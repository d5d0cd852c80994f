"""MoSE and AR cost against PEFT LoRA and a HydraLoRA-style reference loop, measured side by side in one run.

    python benchmarks/run.py [--quick] [--json PATH] [--device cpu|cuda]

Interleaved (A B A B ...) timings after warm-up, medians over repetitions, on a Llama-shaped model with the
Emotion-LLaMA token layout (259 visual, 1 audio, ~60 text tokens), batch 2. AR's per-token decode latency comes
from ``benchmarks/ar_decode.py`` (same layout and shape, interleaved step by step, CPU only here). Peak training memory on CPU is counted,
not sampled: every parameter, plus gradients and AdamW's two moments of the trainable ones, plus the bytes autograd
saves for backward (distinct storages); on CUDA it is ``torch.cuda.max_memory_allocated`` over a train step.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_mose import Modality, MoSEConfig, MoSELayer, modality_ids_from_segments
from peft_mose.experts import EXPERTS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ar_decode import measure_ar_decode  # noqa: E402  (AR's decode benchmark, same layout, its own model)

SHAPES = {
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=2000),
    "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=200),
    # LLaMA-2-7B's layer shape, two layers: the train-step comparison at the width that matters
    "7b-layer": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=2000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
}
RANK, N_EXPERTS, TARGETS = 64, 2, ["q_proj", "v_proj"]


def token_layout(batch: int, text_before: int = 20, text_after: int = 40) -> torch.Tensor:
    """Emotion-LLaMA's prompt: text, 256 EVA + face + video tokens (visual), HuBERT (audio), CLS (visual), text."""
    row = modality_ids_from_segments(
        [("text", text_before), ("visual", 258), ("audio", 1), ("visual", 1), ("text", text_after)]
    )
    return row.expand(batch, -1).contiguous()


def interleaved(candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int, sync: Callable[[], None]):
    """Median seconds per candidate, running them in turn (A B C A B C ...) so drift hits all alike."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def build_models(shape: dict, dtype: torch.dtype, device: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 7B random init on the CPU takes minutes
        base = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype=dtype).eval()
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0,
                                                          target_modules=TARGETS, init_lora_weights=False))
    mose = get_peft_model(copy.deepcopy(base), MoSEConfig(r=RANK, n_experts=N_EXPERTS, lora_dropout=0.0,
                                                          target_modules=TARGETS, init_weights=False))
    # LoRA at the rank that gives it MoSE's trainable parameter count: the same budget spent on one expert
    matched = round(RANK * _trainable(mose) / _trainable(lora))
    lora_matched = get_peft_model(copy.deepcopy(base), LoraConfig(r=matched, lora_alpha=16, lora_dropout=0.0,
                                                                  target_modules=TARGETS, init_lora_weights=False))
    return {"base": base, "lora": lora, "lora_matched": lora_matched, "mose": mose}


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_step_fn(model, inputs: dict, params: list[torch.nn.Parameter]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None

    def step() -> None:
        loss = model(**inputs).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def model_inputs(name: str, ids: torch.Tensor, mods: torch.Tensor) -> dict:
    inputs = {"input_ids": ids, "labels": ids}
    if name == "mose":
        inputs["modality_ids"] = mods
    return inputs


def train_memory_bytes(model, inputs: dict, device: str) -> int:
    """Peak memory of one train step (see module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step_fn(model, inputs, params)()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    weight_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}  # counted once, below
    activations = sum(n for ptr, n in storages.items() if ptr not in weight_storages)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + activations + 3 * sum(p.numel() * p.element_size() for p in params)


def hydra_layer_delta(layer: MoSELayer, x: torch.Tensor, mods: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """What peers do (HydraLoRA's layout): per expert one shared ``A x`` and a Python loop over its B heads, every
    expert on every token, masked."""
    name = "default"
    visual, nonvisual = layer.expert_ids[name]
    masks = {"visual": torch.isin(mods, torch.tensor(sorted(visual), device=mods.device)).float() * lam[:, None],
             "nonvisual": torch.isin(mods, torch.tensor(sorted(nonvisual), device=mods.device)).float()
                 * (1 - lam[:, None]),
             "omni": torch.ones_like(mods, dtype=torch.float)}
    out = 0
    x = x.to(layer.mose_A[name].dtype)  # the adapter's dtype (fp32 under a bf16 base), as the fast layer computes
    for e, expert in enumerate(EXPERTS):
        gates = torch.softmax(x @ layer.mose_gate[name][e].T, dim=-1)
        h = x @ layer.mose_A[name][e].T
        for i in range(layer.n_experts[name]):
            out = out + (masks[expert] * gates[..., i])[..., None] * (h @ layer.mose_B[name][:, e, i, :].T)
    return out * layer.scaling[name]


def layer_benchmark(mose_model, mods: torch.Tensor, repeats: int, warmup: int, sync) -> dict[str, float]:
    layer = next(m for m in mose_model.modules() if isinstance(m, MoSELayer))
    x = torch.randn(mods.shape[0], mods.shape[1], layer.in_features, device=mods.device,
                    dtype=layer.base_layer.weight.dtype)  # what the frozen model feeds the layer
    lam = torch.full((mods.shape[0],), 0.55, device=mods.device)

    def fast() -> None:
        with torch.no_grad():
            layer(x)

    def hydra() -> None:
        with torch.no_grad():
            layer.base_layer(x) + hydra_layer_delta(layer, x, mods, lam)

    def frozen() -> None:
        with torch.no_grad():
            layer.base_layer(x)

    with mose_model.base_model.scope.layer_call(mods):  # the per-call context a model forward would open
        return interleaved({"layer_fast": fast, "layer_hydra": hydra, "layer_frozen": frozen}, repeats, warmup, sync)


def run(shape_name: str, device: str, dtype: torch.dtype, repeats: int, warmup: int) -> dict[str, Any]:
    shape = SHAPES[shape_name]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    models = build_models(shape, dtype, device)
    mods = token_layout(batch=2).to(device)
    ids = torch.randint(3, shape["vocab_size"], mods.shape, generator=torch.Generator().manual_seed(0)).to(device)
    results: dict[str, Any] = {}

    steps = {}
    for name, model in models.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad] if name != "base" else []
        steps[f"train_step_{name}"] = train_step_fn(model, model_inputs(name, ids, mods), params) if params else None
    results.update(interleaved({k: v for k, v in steps.items() if v is not None}, repeats, warmup, sync))

    forwards = {}
    for name, model in models.items():
        model.eval()
        inputs = model_inputs(name, ids, mods)
        inputs.pop("labels")
        forwards[f"forward_{name}"] = (lambda m=model, i=inputs: _no_grad_call(m, i))
    results.update(interleaved(forwards, repeats, warmup, sync))

    for name in ("lora", "mose"):
        models[name].train()
        results[f"train_memory_bytes_{name}"] = train_memory_bytes(models[name], model_inputs(name, ids, mods), device)

    results.update(layer_benchmark(models["mose"], mods, repeats, warmup, sync))
    if device == "cpu":
        decode = measure_ar_decode(quick=shape_name == "quick", new_tokens=4 if shape_name == "quick" else 32,
                                   repeats=1 if shape_name == "quick" else 5)["results"]
        results["decode_plain"] = decode["base"]["decode_ms_per_token"] / 1e3
        results["decode_ar"] = decode["ar_tau1"]["decode_ms_per_token"] / 1e3
    return results


def _no_grad_call(model, inputs: dict) -> None:
    with torch.no_grad():
        model(**inputs)


def ratios(results: dict[str, Any]) -> dict[str, float]:
    out = {
        "mose_vs_lora_train_step": results["train_step_mose"] / results["train_step_lora"],
        "mose_vs_lora_forward": results["forward_mose"] / results["forward_lora"],
        "mose_vs_lora_matched_train_step": results["train_step_mose"] / results["train_step_lora_matched"],
        "mose_vs_lora_matched_forward": results["forward_mose"] / results["forward_lora_matched"],
        "mose_vs_lora_peak_memory": results["train_memory_bytes_mose"] / results["train_memory_bytes_lora"],
        # the experts' share of the layer: both timings minus the frozen projection they share
        "hydra_vs_fast_layer": (results["layer_hydra"] - results["layer_frozen"])
        / (results["layer_fast"] - results["layer_frozen"]),
    }
    if "decode_ar" in results:
        out["ar_vs_plain_decode"] = results["decode_ar"] / results["decode_plain"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few repetitions: a smoke test")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (run with 1 and with 2 on a shared 2-core machine; default: torch's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="of the base model (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--json", help="write raw medians and ratios to this file")
    args = parser.parse_args()
    shape = args.shape or ("quick" if args.quick else "llama2-7b" if args.device == "cuda" else "full")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    repeats = args.repeats or (2 if args.quick else 9)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    results = run(shape, args.device, dtype, repeats, warmup=1 if args.quick else 2)
    report = {
        "machine": {"device": args.device, "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "shape": shape, "dtype": str(dtype), "rank": RANK, "n_experts": N_EXPERTS, "targets": TARGETS,
        "tokens_per_sample": int(token_layout(1).shape[1]), "batch": 2,
        "visual_tokens": int((token_layout(1) == int(Modality.VISUAL)).sum()),
        "medians_seconds_or_bytes": results, "ratios": ratios(results),
    }
    for key, value in report["ratios"].items():
        print(f"{key:28s} {value:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
