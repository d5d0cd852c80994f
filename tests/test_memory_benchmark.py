"""benchmarks/memory.py: its counted bytes against a hand computation and bitsandbytes' real NF4 storage, and a
``--quick`` run (no assertion on measured values beyond their consistency)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import bitsandbytes as bnb
import torch

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"))
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=512)


def test_nf4_bytes_equal_bitsandbytes_storage():
    for double_quant in (False, True):
        weight = bnb.nn.Params4bit(torch.randn(256, 128, dtype=torch.bfloat16), requires_grad=False,
                                   quant_type="nf4", compress_statistics=double_quant).to("cpu")
        state = weight.quant_state
        stored = weight.data.nbytes + state.absmax.nbytes
        if double_quant:
            stored += state.state2.absmax.nbytes + state.state2.code.nbytes + state.offset.nbytes
        assert BENCH["nf4_bytes"](256 * 128, double_quant) == stored


def test_counted_bytes_match_a_hand_computation():
    d, m, v, r, layers, targets = 128, 256, 512, 64, 2, 4
    linear = 4 * d * d + 3 * d * m  # q k v o, gate up down
    frozen = 2 * v * d + layers * (linear + 2 * d) + d  # embeddings, output layer, layers (+ 2 norms), final norm
    lora = targets * r * 2 * d
    counted = BENCH["counted_bytes"](SHAPE, "bf16", "lora")
    assert counted == {"trainable_params": lora, "weight_bytes": 2 * frozen + 4 * lora, "gradient_bytes": 4 * lora,
                       "optimizer_bytes": 8 * lora}
    # MoSE, N = 2: A [3, r, d], B [d, 3, 2, r], gates [3, 2, d], router (2d -> 2 -> 1) per target
    mose = targets * (3 * r * d + d * 3 * 2 * r + 3 * 2 * d + (2 * 2 * d + 2 + 2 + 1))
    nf4 = BENCH["counted_bytes"](SHAPE, "nf4", "mose")
    quantized = layers * (4 * BENCH["nf4_bytes"](d * d) + 3 * BENCH["nf4_bytes"](d * m))
    assert nf4["trainable_params"] == mose and nf4["optimizer_bytes"] == 8 * mose
    assert nf4["weight_bytes"] == 2 * (frozen - layers * linear) + quantized + 4 * mose


def test_quick_run_writes_every_configuration(tmp_path, monkeypatch):
    out = tmp_path / "memory.json"
    monkeypatch.setattr(sys, "argv", ["memory.py", "--quick", "--json", str(out)])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"), run_name="__main__")
    rows = json.loads(out.read_text())["rows"]
    assert {(r["base"], r["adapter"], r["checkpointing"]) for r in rows} == {
        (b, a, c) for b in ("bf16", "nf4") for a in ("lora", "mose") for c in (False, True)}
    for row in rows:
        assert row["peak_bytes"] == (row["weight_bytes"] + row["gradient_bytes"] + row["optimizer_bytes"]
                                     + row["activation_bytes"])
        assert row["activation_bytes"] > 0
    by = {(r["base"], r["adapter"], r["checkpointing"]): r for r in rows}
    assert by["nf4", "mose", False]["weight_bytes"] < by["bf16", "mose", False]["weight_bytes"]
    assert by["bf16", "mose", True]["activation_bytes"] < by["bf16", "mose", False]["activation_bytes"]
