"""Per-token decode latency and op counts: MoSE against PEFT LoRA at the same rank and targets, in one run.

    python benchmarks/decode.py [--quick | --shape quick|full|7b-layer] [--device cpu|cuda] [--dtype float32|bfloat16]
                                [--threads 1 2] [--compile] [--json PATH]

A tiny-vocabulary Llama (hidden 1024, 4 layers; ``7b-layer``: four layers of LLaMA-2-7B's width) with the
Emotion-LLaMA prompt layout (300 tokens: 259 visual, 1 audio), batch 1, greedy ``generate`` of ``1 + new_tokens``
tokens. Each decode step is timed alone, from one generated token to the next (:class:`StepClock`, a logits
processor), so prefill and ``generate``'s set-up stay out; the models share the base weights and run in turn, each
first in turn (A B C, B C A, ...); a model's figure is the median over steps of each step's fastest round (``quiet``;
the plain median of all steps is reported too), once per thread count. Op counts are top-level torch
calls (``TorchFunctionMode``) of one decode step (``generate`` of 3 tokens minus 2) and of one train step's forward.
``--compile`` also times both adapters under ``torch.compile`` (inductor; compile time excluded).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch.overrides import TorchFunctionMode
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from peft_mose import MoSEConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ar_decode import emotion_llama_layout  # noqa: E402  (the same 300-token prompt layout)
from timing import StepClock  # noqa: E402

SHAPES = {
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=256),
    "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=96),
    "7b-layer": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=256),
}
RANK, N_EXPERTS, TARGETS = 64, 2, ["q_proj", "v_proj"]


class OpCounter(TorchFunctionMode):
    """Counts the torch functions and tensor methods called from Python inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose modules are its own and whose parameters are ``model``'s."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def build(shape: dict[str, int], device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """The base model, LoRA and MoSE on copies of it that share its frozen weights (one copy in memory, so that no
    model is faster for where its weights happen to lie), random adapter weights (B != 0); built on ``device`` in
    ``dtype`` (each adapter then keeps the dtype its library gives it: PEFT LoRA and MoSE both keep float32 adapter
    weights over a bfloat16 base)."""
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa", dtype=dtype)).to(dtype).eval()
    lora = get_peft_model(shared_copy(base), LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0,
                                                          target_modules=TARGETS, init_lora_weights=False))
    mose = get_peft_model(shared_copy(base), MoSEConfig(r=RANK, n_experts=N_EXPERTS, lora_dropout=0.0,
                                                          target_modules=TARGETS, init_weights=False))
    return {"base": base, "lora": lora.eval(), "mose": mose.eval()}


def _generate(model: torch.nn.Module, name: str, inputs: dict, tokens: int, **options: Any) -> torch.Tensor:
    extra = {"modality_ids": inputs["modality_ids"]} if name.startswith("mose") else {}
    return model.generate(input_ids=inputs["input_ids"], max_new_tokens=tokens, min_new_tokens=tokens,
                          do_sample=False, pad_token_id=0, **extra, **options)


@torch.no_grad()
def decode_latency(models: dict[str, torch.nn.Module], inputs: dict, new_tokens: int, rounds: int) -> dict[str, Any]:
    """Per-token decode seconds of each model from ``rounds`` interleaved ``generate`` calls (one warm-up round
    first), every step timed alone (:class:`StepClock`): ``quiet``, the median over steps of each step's minimum
    over rounds (other load only adds time, so this estimates a quiet machine), and ``median``, of all steps."""
    steps: dict[str, list[list[float]]] = {name: [] for name in models}
    names = list(models)
    for round_ in range(rounds + 1):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # each model first in turn
            clock = StepClock()
            _generate(models[name], name, inputs, 1 + new_tokens, logits_processor=LogitsProcessorList([clock]))
            if round_:
                steps[name].append(clock.steps())
    return {
        name: {"quiet": statistics.median(min(step) for step in zip(*runs)),
               "median": statistics.median(t for run in runs for t in run)}
        for name, runs in steps.items()
    }


def op_counts(models: dict[str, torch.nn.Module], inputs: dict) -> dict[str, dict[str, int]]:
    """Top-level torch calls per decode step and per train-step forward of each adapter."""
    counts: dict[str, dict[str, int]] = {}
    for name in ("lora", "mose"):
        model, steps = models[name], []
        with torch.no_grad():
            for tokens in (2, 3):
                with OpCounter() as counter:
                    _generate(model, name, inputs, tokens)
                steps.append(counter.count)
        model.train()
        call = {"input_ids": inputs["input_ids"], "labels": inputs["input_ids"]}
        if name == "mose":
            call["modality_ids"] = inputs["modality_ids"]
        with OpCounter() as counter:
            model(**call).loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()
        counts[name] = {"decode_step": steps[1] - steps[0], "train_forward": counter.count}
    return counts


def run(
    shape_name: str, threads: list[int], new_tokens: int, rounds: int, compile_: bool, device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    models = build(SHAPES[shape_name], device, dtype)
    modality_ids = emotion_llama_layout(8 if shape_name == "quick" else 28)[None]
    inputs = {"modality_ids": modality_ids.to(device),
              "input_ids": torch.randint(3, SHAPES[shape_name]["vocab_size"], modality_ids.shape,
                                         generator=torch.Generator().manual_seed(0)).to(device)}
    if compile_:
        # transformers wraps the forwards of the model, its decoder and its attention layers in one decorator, so
        # both compiled models' prefill and decode graphs are entries of one code object: past the default limit
        # (8) Dynamo would quietly run the rest eagerly
        torch._dynamo.config.recompile_limit = 64
        for name in ("lora", "mose"):
            compiled = models[f"{name}_compiled"] = shared_copy(models[name])
            inner = compiled.get_base_model()  # what generate calls, step by step
            inner.forward = torch.compile(inner.forward)
    report: dict[str, Any] = {"ops": op_counts(models, inputs), "decode_seconds_per_token": {}, "ratios": {}}
    report["ratios"]["mose_vs_lora_decode_ops"] = report["ops"]["mose"]["decode_step"] / report["ops"]["lora"]["decode_step"]
    report["ratios"]["mose_vs_lora_train_forward_ops"] = (report["ops"]["mose"]["train_forward"]
                                                          / report["ops"]["lora"]["train_forward"])
    previous = torch.get_num_threads()
    for count in threads:
        torch.set_num_threads(count)
        latency = decode_latency(models, inputs, new_tokens, rounds)
        report["decode_seconds_per_token"][f"{count}_threads"] = latency
        for suffix in ("", "_compiled") if compile_ else ("",):
            ratio = latency[f"mose{suffix}"]["quiet"] / latency[f"lora{suffix}"]["quiet"]
            report["ratios"][f"mose_vs_lora_decode{suffix}_{count}_threads"] = ratio
            ratio = latency[f"mose{suffix}"]["median"] / latency[f"lora{suffix}"]["median"]
            report["ratios"][f"mose_vs_lora_decode{suffix}_{count}_threads_median"] = ratio
        report["ratios"][f"lora_vs_base_decode_{count}_threads"] = latency["lora"]["quiet"] / latency["base"]["quiet"]
    torch.set_num_threads(previous)
    report.update(shape=shape_name, prompt_tokens=int(modality_ids.shape[1]), new_tokens=new_tokens, rounds=rounds,
                  rank=RANK, n_experts=N_EXPERTS, targets=TARGETS, dtype=str(dtype).removeprefix("torch."),
                  machine={"device": device, "cpu": platform.processor() or platform.machine(),
                           "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                           "torch": torch.__version__})
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens and rounds: a smoke run")
    parser.add_argument("--shape", choices=tuple(SHAPES), help="model shape (default: quick with --quick, else full)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timed with a synchronize per step)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="of the base model")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time with")
    parser.add_argument("--new_tokens", type=int, default=None, help="decoded tokens per timing (default 32)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd LoRA and MoSE")
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    report = run(args.shape or ("quick" if args.quick else "full"), args.threads,
                 args.new_tokens or (3 if args.quick else 32), args.rounds or (1 if args.quick else 7), args.compile,
                 args.device, getattr(torch, args.dtype))
    for key, value in report["ratios"].items():
        print(f"{key:42s} {value:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
