"""Reproduce the attention-reallocation figures of docs/ar.md offline, on a tiny random Llama.

A random model attends almost uniformly, so this recipe first makes the bias of the paper's section 4 appear: it
optimises the embedding of each prompt's single audio slot (model frozen) until the middle layers over-attend to it.
It then saves the model and the batch to a temporary directory and runs the plot command on them
(``python -m peft_mose.attention.plot MODEL_DIR batch.pt --out OUT --tau TAU``)::

    python recipes/ar_plots.py --out docs/ar [--tau 0.25] [--steps 100]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_mose import Modality, modality_ids_from_segments
from peft_mose.attention.plot import main as plot_main

SEGMENTS = [(Modality.TEXT, 6), (Modality.VISUAL, 96), (Modality.TEXT, 4), (Modality.AUDIO, 1), (Modality.TEXT, 12)]


def biased_batch(model: LlamaForCausalLM, batch: int, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Random prompts whose audio-slot embedding is optimised to draw the last row's attention in the middle layers."""
    gen = torch.Generator().manual_seed(seed)
    modality_ids = modality_ids_from_segments(SEGMENTS).repeat(batch, 1)
    input_ids = torch.randint(3, model.config.vocab_size, modality_ids.shape, generator=gen)
    audio = modality_ids == int(Modality.AUDIO)
    embeds = model.get_input_embeddings()(input_ids).detach()
    slot = embeds[audio].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([slot], lr=0.1)
    middle = slice(model.config.num_hidden_layers // 4, 3 * model.config.num_hidden_layers // 4)
    model.set_attn_implementation("eager")
    model.requires_grad_(False)
    for _ in range(steps):
        inputs = embeds.masked_scatter(audio[..., None], slot)
        attentions = model(inputs_embeds=inputs, output_attentions=True).attentions[middle]
        audio_share = sum((a[:, :, -1] * audio[:, None]).sum(-1).mean() for a in attentions)
        optimizer.zero_grad()
        (-audio_share).backward()
        optimizer.step()
    model.set_attn_implementation("sdpa")
    return {"inputs_embeds": embeds.masked_scatter(audio[..., None], slot.detach()), "modality_ids": modality_ids}


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tau", default="0.25")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=96, initializer_range=0.1)
    model = LlamaForCausalLM(config).eval()
    batch = biased_batch(model, batch=2, steps=args.steps, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, batch_file = Path(tmp) / "model", Path(tmp) / "batch.pt"
        model.save_pretrained(model_dir)
        torch.save(batch, batch_file)
        return plot_main([str(model_dir), str(batch_file), "--out", str(args.out), "--tau", args.tau])


if __name__ == "__main__":
    main()
