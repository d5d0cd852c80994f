"""Per-token decode latency and prefill time with attention reallocation (AR) against the same model without it.

One run interleaves the variants (base, AR at tau=1, AR at tau=0 where every layer with audio and visual mass is
intervened on, PAI) decode step by decode step, after warm-up, and reports medians. The model is a random Llama-shaped
decoder with the Emotion-LLaMA prompt layout (259 visual tokens, 1 audio token, text around them)::

    python benchmarks/ar_decode.py [--quick] [--json PATH]

It also measures what the conflict gate (``gate="conflict"``) adds to AR (:func:`measure_gate_cost`: its two probe
forwards at the prefill, nothing per decode step by design), with greedy ``generate`` as users call it.
``measure_ar_decode`` is importable (e.g. by ``benchmarks/run.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from peft_mose import Modality, modality_ids_from_segments
from peft_mose._compat.transformers import cache_keyword
from peft_mose.attention import attention_reallocation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import StepClock  # noqa: E402

FULL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32000)
QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96)


def emotion_llama_layout(text_tail: int = 48) -> torch.Tensor:
    """One prompt's modality ids in Emotion-LLaMA's order: 256 patch tokens, face, video, audio, CLS (259 visual)."""
    return modality_ids_from_segments([
        (Modality.TEXT, 6), (Modality.VISUAL, 256), (Modality.TEXT, 6), (Modality.VISUAL, 2), (Modality.AUDIO, 1),
        (Modality.VISUAL, 1), (Modality.TEXT, text_tail),
    ])


def _contexts(modality_ids: torch.Tensor) -> dict[str, Callable[[torch.nn.Module], Any]]:
    return {
        "base": lambda model: contextlib.nullcontext(),
        "ar_tau1": lambda model: attention_reallocation(model, modality_ids, tau=1.0),
        "ar_tau0": lambda model: attention_reallocation(model, modality_ids, tau=0.0),
        "pai": lambda model: attention_reallocation(model, modality_ids, strategy="pai", alpha=0.5),
    }


def _timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


@torch.no_grad()
def measure_ar_decode(
    quick: bool = False, batch: int = 2, new_tokens: int = 32, repeats: int = 5, warmup: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Time greedy prefill and KV-cache decode steps of every variant; returns times (ms) and overheads (%).

    Each variant runs on its own copy of the model that shares the weights, so all variants stay active together and
    are interleaved step by step (the order rotates). Reported: prefill = minimum over repetitions; decode per token =
    median over steps of each step's minimum over repetitions (plus plain medians); overheads relative to the base.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(**(QUICK if quick else FULL), attn_implementation="sdpa")
    base = LlamaForCausalLM(config).eval()
    modality_ids = emotion_llama_layout(8 if quick else 48).repeat(batch, 1)
    input_ids = torch.randint(3, config.vocab_size, modality_ids.shape)
    contexts = _contexts(modality_ids)
    keyword = cache_keyword(base)
    shared = {id(p): p for p in base.parameters()}
    models = {name: copy.deepcopy(base, memo=dict(shared)) for name in contexts}
    names = list(contexts)
    prefill: dict[str, list[float]] = {name: [] for name in names}
    decode: dict[str, list[list[float]]] = {name: [] for name in names}
    for rep in range(warmup + repeats):
        with contextlib.ExitStack() as stack:
            for name in names:
                stack.enter_context(contexts[name](models[name]))
            caches = {name: DynamicCache(config=config) for name in names}
            masks = {name: torch.ones_like(input_ids) for name in names}
            tokens, times = {}, {name: [] for name in names}
            for name in _rotated(names, rep):
                seconds, out = _timed(lambda: models[name](
                    input_ids=input_ids, attention_mask=masks[name], **{keyword: caches[name]}, use_cache=True,
                    logits_to_keep=1))
                times[name].append(seconds)
                tokens[name] = out.logits[:, -1].argmax(-1, keepdim=True)
            for step in range(new_tokens):
                for name in _rotated(names, rep + step):
                    masks[name] = torch.cat([masks[name], torch.ones_like(tokens[name])], dim=1)
                    seconds, out = _timed(lambda: models[name](
                        input_ids=tokens[name], attention_mask=masks[name], **{keyword: caches[name]},
                        use_cache=True))
                    times[name].append(seconds)
                    tokens[name] = out.logits[:, -1].argmax(-1, keepdim=True)
        if rep >= warmup:
            for name in names:
                prefill[name].append(times[name][0])
                decode[name].append(times[name][1:])
    results = {}
    for name in names:
        # Other load only ever adds time: the minimum over repetitions of each step is the quiet-machine estimate.
        quiet_steps = [min(step) for step in zip(*decode[name])]
        results[name] = {
            "prefill_ms": 1e3 * min(prefill[name]),
            "decode_ms_per_token": 1e3 * statistics.median(quiet_steps),
            "prefill_ms_median": 1e3 * statistics.median(prefill[name]),
            "decode_ms_per_token_median": 1e3 * statistics.median(t for steps in decode[name] for t in steps),
        }
    for name in names:
        for metric in ("prefill_ms", "decode_ms_per_token"):
            overhead = 100 * (results[name][metric] / results["base"][metric] - 1)
            results[name][metric.replace("_ms", "").replace("_per_token", "") + "_overhead_pct"] = overhead
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": {k: getattr(config, k) for k in (QUICK if quick else FULL)},
        "batch": batch, "prompt_tokens": modality_ids.shape[1], "new_tokens": new_tokens, "repeats": repeats,
        "warmup": warmup, "results": results,
    }


@torch.no_grad()
def measure_gate_cost(
    quick: bool = False, batch: int = 2, new_tokens: int = 16, repeats: int = 5, seed: int = 0
) -> dict[str, Any]:
    """AR with and without the conflict gate (six label tokens, the default threshold) on one model, ``generate``
    calls interleaved after a warm-up round: prefill (``generate`` up to its first token: set-up, the gate's probes
    and the prompt's forward; fastest round) and per-token decode (median over steps of each step's fastest round)."""
    torch.manual_seed(seed)
    config = LlamaConfig(**(QUICK if quick else FULL), attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    modality_ids = emotion_llama_layout(8 if quick else 48).repeat(batch, 1)
    input_ids = torch.randint(3, config.vocab_size, modality_ids.shape)
    labels = tuple(range(10, 16))
    variants = {
        "ar": dict(tau=1.0),
        "ar_gate": dict(tau=1.0, gate="conflict", gate_labels=labels),
    }
    prefill: dict[str, list[float]] = {name: [] for name in variants}
    decode: dict[str, list[list[float]]] = {name: [] for name in variants}
    for rep in range(1 + repeats):
        for name in _rotated(list(variants), rep):
            with attention_reallocation(model, modality_ids, **variants[name]):
                clock = StepClock()
                model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=1 + new_tokens,
                               min_new_tokens=1 + new_tokens, do_sample=False, pad_token_id=0,
                               logits_processor=LogitsProcessorList([clock]))
            if rep:
                prefill[name].append(clock.prefill())
                decode[name].append(clock.steps())
    results = {
        name: {"prefill_ms": 1e3 * min(prefill[name]),
               "decode_ms_per_token": 1e3 * statistics.median(min(step) for step in zip(*decode[name]))}
        for name in variants
    }
    return {
        "results": results,
        "gate_vs_ar_prefill": results["ar_gate"]["prefill_ms"] / results["ar"]["prefill_ms"],
        "gate_vs_ar_decode": results["ar_gate"]["decode_ms_per_token"] / results["ar"]["decode_ms_per_token"],
        "batch": batch, "prompt_tokens": modality_ids.shape[1], "new_tokens": new_tokens, "labels": len(labels),
    }


def _rotated(names: list[str], shift: int) -> list[str]:
    shift %= len(names)
    return names[shift:] + names[:shift]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--new-tokens", type=int)
    args = parser.parse_args(argv)
    options: dict[str, Any] = dict(quick=True, new_tokens=4, repeats=1) if args.quick else {}
    if args.repeats is not None:
        options["repeats"] = args.repeats
    if args.new_tokens is not None:
        options["new_tokens"] = args.new_tokens
    report = measure_ar_decode(**options)
    report["gate"] = measure_gate_cost(quick=args.quick, **{k: v for k, v in options.items() if k != "quick"})
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return report


if __name__ == "__main__":
    main()
