"""Trainable parameters of MoSE on a LLaMA-2-7B-shaped model (meta device, nothing allocated) beside the paper's
Table 15 (N = 1, 2, 3) and Table 6 (the design ablations), which count MoSE plus Emotion-LLaMA's five projectors.

    python benchmarks/param_count.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_mose import MoSEConfig

PAPER_TABLE_15 = {1: 148e6, 2: 200e6, 3: 250e6}
# Table 6: design -> (MoSEConfig options, paper's #Param.). MoAE's LoRA count is not given; 4 is the closest.
PAPER_TABLE_6 = {
    "(a) MoAE, 4 LoRAs": (dict(expert_kind="moae", n_experts=4), 182e6),
    "(b) MoSE w. symm. LoRAs": (dict(expert_kind="symmetric"), 250e6),
    "(c) MoSE w.o. router": (dict(router=False), 199e6),
    "(d) MoSE": ({}, 200e6),
}
# Emotion-LLaMA's trainable projectors (weights + biases): EVA patch 5632, EVA CLS 1408, face/video/audio 1024 -> 4096.
PROJECTORS = sum(d_in * 4096 + 4096 for d_in in (5632, 1408, 1024, 1024, 1024))


def count(n_experts: int = 2, r: int = 64, **options) -> dict[str, int]:
    """MoSE trainable parameters (total and router only) for LLaMA-2-7B with q_proj/v_proj targets; ``options``
    are further MoSEConfig fields (the Table 6 designs)."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(config), MoSEConfig(r=r, **{"n_experts": n_experts, **options}))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    return {"mose": sum(trainable.values()), "router": sum(v for n, v in trainable.items() if "mose_router" in n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = []
    print("| N | MoSE | router | + projectors | paper (Table 15) |\n|---|---|---|---|---|")
    for n in (1, 2, 3):
        c = count(n)
        rows.append({"n_experts": n, **c, "with_projectors": c["mose"] + PROJECTORS, "paper": PAPER_TABLE_15[n]})
        print(f"| {n} | {c['mose'] / 1e6:.1f}M | {c['router'] / 1e6:.2f}M | {(c['mose'] + PROJECTORS) / 1e6:.1f}M "
              f"| {PAPER_TABLE_15[n] / 1e6:.0f}M |")
    print("\n| design (Table 6) | MoSE | router | + projectors | paper |\n|---|---|---|---|---|")
    for design, (options, paper) in PAPER_TABLE_6.items():
        c = count(**options)
        rows.append({"design": design, **options, **c, "with_projectors": c["mose"] + PROJECTORS, "paper": paper})
        print(f"| {design} | {c['mose'] / 1e6:.1f}M | {c['router'] / 1e6:.2f}M | {(c['mose'] + PROJECTORS) / 1e6:.1f}M "
              f"| {paper / 1e6:.0f}M |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
