"""Peak memory of one stage-1 training step at LLaMA-2-7B's shape: bf16 or 4-bit NF4 base, LoRA or MoSE (r=64, N=2,
q_proj/v_proj), with and without gradient checkpointing, with AdamW's moments in fp32 or in 8 bits.

    python benchmarks/memory.py [--quick] [--json PATH] [--device cpu|cuda] [--optim adamw_torch adamw_bnb_8bit]

On CPU: weights, gradients and AdamW's two moments are computed exactly by building the model on the meta device and
counting (4-bit weights from bitsandbytes' NF4 layout with double quantization; 8-bit moments from its blockwise
optimizer state); activations (the bytes autograd saves, distinct storages) are measured on real tensors for models
of 1 and 2 decoder layers at the real width and vocabulary and scaled to 32 layers (per layer = the difference, the
rest = embedding, head and loss). The peak is their sum, an upper bound (all of them held at once). On CUDA:
``torch.cuda.max_memory_allocated`` over a real step (each base built once; every configuration's adapter is
unloaded after its step).
"""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_mose import MoSEConfig

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
QUICK = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=512)
# Emotion-LLaMA's stage-1 sample: 20 text, 258 visual, 1 audio, 1 visual (CLS), 40 text tokens; batch 1 per GPU
SEQ_LEN, BATCH = 320, 1
RANK, N_EXPERTS, TARGETS = 64, 2, ["q_proj", "v_proj"]
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BLOCK, ABSMAX_BLOCK = 64, 256  # bitsandbytes: 64 weights per absmax; double quant: 256 absmax per fp32 scale
# Trainer's `optim` names: torch's AdamW (fp32 moments), bitsandbytes' 8-bit AdamW (uint8 moments, one fp32 absmax per
# 256 values and one 256-entry fp32 code per moment, shared; tensors under 4096 values keep fp32 moments)
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit")
OPTIM_BLOCK, MIN_8BIT_SIZE, QMAP_BYTES = 256, 4096, 2 * 256 * 4


@dataclass
class Row:
    """One configuration's bytes; ``activations`` and ``peak`` are estimated on CPU, measured on CUDA."""

    base: str
    adapter: str
    checkpointing: bool
    optimizer: str
    trainable_params: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    peak_bytes: int


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one bitsandbytes NF4 weight: two weights per byte, one absmax per 64 (fp32, or 8-bit with one fp32
    scale per 256 absmax, a 256-entry fp32 code and an fp32 offset under double quantization)."""
    blocks = -(-numel // NF4_BLOCK)
    if not double_quant:
        return -(-numel // 2) + 4 * blocks
    return -(-numel // 2) + blocks + 4 * -(-blocks // ABSMAX_BLOCK) + 4 * 256 + 4


def optimizer_bytes(numels: list[int], optimizer: str) -> int:
    """Bytes of AdamW's two moments for trainable tensors of ``numels`` values each, under Trainer's ``optimizer``."""
    if optimizer == "adamw_torch":
        return sum(8 * n for n in numels)
    small = [n for n in numels if n < MIN_8BIT_SIZE]
    large = [n for n in numels if n >= MIN_8BIT_SIZE]
    return sum(8 * n for n in small) + sum(2 * (n + 4 * -(-n // OPTIM_BLOCK)) for n in large) + QMAP_BYTES * bool(large)


def make_optimizer(params: list[torch.nn.Parameter], optimizer: str) -> torch.optim.Optimizer:
    """What Trainer builds for ``--optim optimizer`` (its default hyperparameters do not change the bytes)."""
    if optimizer == "adamw_torch":
        return torch.optim.AdamW(params, lr=1e-5)
    import bitsandbytes as bnb

    return bnb.optim.AdamW(params, lr=1e-5, optim_bits=8)


def adapted(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """``model`` with LoRA or MoSE at the paper's rank on q_proj/v_proj (fp32 adapter weights, PEFT's default)."""
    if adapter == "lora":
        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS))
    return get_peft_model(model, MoSEConfig(r=RANK, n_experts=N_EXPERTS, lora_dropout=0.05, target_modules=TARGETS))


def counted_bytes(shape: dict, base: str, adapter: str, optimizer: str = "adamw_torch") -> dict[str, int]:
    """Weights (frozen bf16 or NF4, trainable fp32), gradients and AdamW moments, counted on the meta device."""
    with torch.device("meta"):
        model = adapted(LlamaForCausalLM(LlamaConfig(**shape, dtype=torch.bfloat16)).to(torch.bfloat16), adapter)
    weights = trainable = trainable_bytes = 0
    numels = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            trainable += param.numel()
            trainable_bytes += param.numel() * param.element_size()
            numels.append(param.numel())
        elif base == "nf4" and _quantized(name):
            weights += nf4_bytes(param.numel())
        else:
            weights += param.numel() * param.element_size()
    return {"trainable_params": trainable, "weight_bytes": weights + trainable_bytes,
            "gradient_bytes": trainable_bytes, "optimizer_bytes": optimizer_bytes(numels, optimizer)}


def _quantized(name: str) -> bool:
    """Whether a parameter is the weight of a decoder linear that a 4-bit base quantizes (embeddings, norms and the
    output layer stay bf16, as with transformers' ``BitsAndBytesConfig``)."""
    parts = name.split(".")
    owner = parts[-3] if parts[-2] == "base_layer" else parts[-2]
    return parts[-1] == "weight" and owner in QUANTIZED


def quantize_nf4(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the decoder linears by bitsandbytes NF4 layers (double quant, bf16 compute), quantized where they are."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if name in QUANTIZED:
                    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True).to(linear.weight.device)
                    setattr(parent, name, q)
    return model


def build(shape: dict, layers: int, base: str, device: str) -> torch.nn.Module:
    """A random Llama of ``layers`` decoder layers at ``shape``'s width, bf16 or NF4, on ``device``."""
    config = LlamaConfig(**{**shape, "num_hidden_layers": layers}, use_cache=False)
    with torch.device(device):  # initialised where it runs: a 7B random init on the CPU takes minutes
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return quantize_nf4(model) if base == "nf4" else model


def step_inputs(shape: dict, device: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, shape["vocab_size"], (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def saved_bytes(model: torch.nn.Module, inputs: dict) -> int:
    """Bytes autograd saves for backward in one forward (distinct storages, the model's own tensors left out)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return sum(n for ptr, n in storages.items() if ptr not in own)


def estimated_activations(shape: dict, base: str, adapter: str) -> dict[bool, int]:
    """Saved bytes of a 32-layer step, without and with checkpointing, from 1- and 2-layer models on CPU. With
    (non-reentrant) checkpointing each layer keeps its input, and backward recomputes one layer at a time."""
    inputs, measured = step_inputs(shape, "cpu"), {}
    for layers in (1, 2):
        model = adapted(build(shape, layers, base, "cpu"), adapter).train()
        for checkpointing in (False, True):
            if checkpointing:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            measured[layers, checkpointing] = saved_bytes(model, inputs)
        del model
    hidden = BATCH * SEQ_LEN * shape["hidden_size"] * 2
    out = {}
    for checkpointing in (False, True):
        per_layer = measured[2, checkpointing] - measured[1, checkpointing]
        rest = measured[1, checkpointing] - per_layer
        out[checkpointing] = rest + shape["num_hidden_layers"] * (per_layer + hidden * checkpointing)
    out[True] += measured[2, False] - measured[1, False]  # the layer being recomputed
    return out


def train_step(base_model: torch.nn.Module, adapter: str, checkpointing: bool, optimizer: str,
               inputs: dict[str, torch.Tensor]) -> torch.nn.Module:
    """One AdamW step of ``base_model`` with ``adapter``; returns the base model, the adapter unloaded (as built), so
    that the next configuration reuses it (building a 7B base takes longer than its step)."""
    model = adapted(base_model, adapter).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    step = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer)
    model(**inputs).loss.backward()
    step.step()
    step.zero_grad(set_to_none=True)
    if checkpointing:
        model.activation_checkpointing_disable()
    del step
    return model.unload().eval()


def cuda_peak(base_model: torch.nn.Module, shape: dict, adapter: str, checkpointing: bool, optimizer: str) -> int:
    """``torch.cuda.max_memory_allocated`` over one AdamW train step of the whole model."""
    inputs = step_inputs(shape, "cuda")
    gc.collect()  # the last configuration's adapter, gradients and optimizer state, held in reference cycles
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train_step(base_model, adapter, checkpointing, optimizer, inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def table(shape: dict, device: str, optimizers: tuple[str, ...] = ("adamw_torch",)) -> list[Row]:
    """Every configuration's row, each printed as it is measured (a 7B table takes minutes)."""
    print(HEADER, flush=True)
    rows = []
    for base in ("bf16", "nf4"):
        base_model = build(shape, shape["num_hidden_layers"], base, "cuda") if device == "cuda" else None
        for adapter in ("lora", "mose"):
            activations = estimated_activations(shape, base, adapter) if device == "cpu" else None
            for optimizer in optimizers:
                counted = counted_bytes(shape, base, adapter, optimizer)
                fixed = counted["weight_bytes"] + counted["gradient_bytes"] + counted["optimizer_bytes"]
                for checkpointing in (False, True):
                    if device == "cpu":
                        saved, peak = activations[checkpointing], fixed + activations[checkpointing]
                    else:
                        peak = cuda_peak(base_model, shape, adapter, checkpointing, optimizer)
                        saved = peak - fixed
                    rows.append(Row(base, adapter, checkpointing, optimizer, activation_bytes=saved, peak_bytes=peak,
                                    **counted))
                    print(table_line(rows[-1], rows), flush=True)
        del base_model
    return rows


HEADER = (f"{'base':5} {'adapter':7} {'ckpt':5} {'optim':14} {'trainable':>10} {'weights':>8} {'grads':>7} "
          f"{'adamw':>7} {'activ.':>7} {'peak GiB':>8} {'vs LoRA':>7}")


def table_line(row: Row, rows: list[Row]) -> str:
    """``row`` in GiB, its peak against the LoRA row of the same base, checkpointing and optimizer in ``rows``."""
    gib = 2**30
    lora = next(r for r in rows if r.adapter == "lora" and (r.base, r.checkpointing, r.optimizer)
                == (row.base, row.checkpointing, row.optimizer))
    return (f"{row.base:5} {row.adapter:7} {str(row.checkpointing):5} {row.optimizer:14} "
            f"{row.trainable_params / 1e6:9.1f}M "
            f"{row.weight_bytes / gib:8.2f} {row.gradient_bytes / gib:7.2f} {row.optimizer_bytes / gib:7.2f} "
            f"{row.activation_bytes / gib:7.2f} {row.peak_bytes / gib:8.2f} {row.peak_bytes / lora.peak_bytes:7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny shape: a smoke run")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--optim", nargs="+", choices=OPTIMIZERS, default=["adamw_torch"],
                        help="AdamW as Trainer's --optim builds it: fp32 moments, or bitsandbytes' 8-bit moments")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = QUICK if args.quick else LLAMA2_7B
    print(f"one stage-1 step, batch {BATCH} x {SEQ_LEN} tokens, r={RANK}, N={N_EXPERTS}, {'+'.join(TARGETS)}; "
          f"activations and peak {'measured' if args.device == 'cuda' else 'estimated (upper bound)'} on {args.device}")
    rows = table(shape, args.device, tuple(args.optim))
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "shape": shape, "batch": BATCH, "seq_len": SEQ_LEN,
                                         "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
