"""benchmarks/memory.py: its counted bytes against a hand computation and bitsandbytes' real NF4 storage and 8-bit
optimizer state, and a ``--quick`` run (no assertion on measured values beyond their consistency)."""

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


def test_optimizer_bytes_equal_the_optimizers_real_state():
    """AdamW's moments as counted, against the state torch's and bitsandbytes' optimizers hold after one step, for
    MoSE's real parameter shapes (A, B, gates and the router's small tensors, under 4096 values)."""
    from peft import get_peft_model

    from conftest import make_tiny_llama
    from peft_mose import MoSEConfig

    model = get_peft_model(make_tiny_llama(), MoSEConfig(r=32, n_experts=2, target_modules=["q_proj", "v_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    assert {p.numel() < 4096 for p in params} == {True, False}
    for name in BENCH["OPTIMIZERS"]:
        optimizer = BENCH["make_optimizer"](params, name)
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        held = {t.data_ptr(): t.nbytes for state in optimizer.state.values() for t in state.values()
                if torch.is_tensor(t) and t.ndim > 0}  # fmt: skip  (0-dim: torch's step counter)
        assert BENCH["optimizer_bytes"]([p.numel() for p in params], name) == sum(held.values()), name


def test_a_train_step_leaves_the_base_as_built(monkeypatch):
    """On CUDA every configuration's step reuses its base model: the step must leave it as it was (same parameters
    and values, frozen, no adapter module left), for LoRA and MoSE, on bf16 and NF4, with checkpointing too."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inputs = BENCH["step_inputs"](SHAPE, "cpu")
    adapted, trained = BENCH["adapted"], []

    def recording(model, adapter):  # each step's model had its adapter, with the counted trainable parameters
        peft_model = adapted(model, adapter)
        trained.append(sum(p.numel() for p in peft_model.parameters() if p.requires_grad))
        return peft_model

    monkeypatch.setitem(BENCH["train_step"].__globals__, "adapted", recording)
    for base in ("bf16", "nf4"):
        model = BENCH["build"](SHAPE, 2, base, "cpu")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for adapter in ("lora", "mose"):
            for checkpointing in (False, True):
                model = BENCH["train_step"](model, adapter, checkpointing, "adamw_bnb_8bit", inputs)
                assert trained.pop() == BENCH["counted_bytes"](SHAPE, base, adapter)["trainable_params"]
                after = dict(model.named_parameters())
                assert after.keys() == before.keys() and not any(p.requires_grad for p in after.values())
                assert all(torch.equal(after[n], before[n]) for n in before), (base, adapter, checkpointing)
                assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
                assert not model.is_activation_checkpointing


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
    monkeypatch.setattr(sys, "argv", ["memory.py", "--quick", "--json", str(out), "--optim", "adamw_torch",
                                      "adamw_bnb_8bit"])  # fmt: skip
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"), run_name="__main__")
    rows = json.loads(out.read_text())["rows"]
    assert {(r["base"], r["adapter"], r["checkpointing"], r["optimizer"]) for r in rows} == {
        (b, a, c, o) for b in ("bf16", "nf4") for a in ("lora", "mose") for c in (False, True)
        for o in ("adamw_torch", "adamw_bnb_8bit")}
    for row in rows:
        assert row["peak_bytes"] == (row["weight_bytes"] + row["gradient_bytes"] + row["optimizer_bytes"]
                                     + row["activation_bytes"])
        assert row["activation_bytes"] > 0
    by = {(r["base"], r["adapter"], r["checkpointing"], r["optimizer"]): r for r in rows}
    assert (by["nf4", "mose", False, "adamw_torch"]["weight_bytes"]
            < by["bf16", "mose", False, "adamw_torch"]["weight_bytes"])
    assert (by["bf16", "mose", True, "adamw_torch"]["activation_bytes"]
            < by["bf16", "mose", False, "adamw_torch"]["activation_bytes"])
    assert (by["bf16", "mose", True, "adamw_bnb_8bit"]["optimizer_bytes"]
            < by["bf16", "mose", True, "adamw_torch"]["optimizer_bytes"])
