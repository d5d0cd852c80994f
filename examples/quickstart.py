"""MoSE in one minute on a CPU: wrap a tiny random Llama, train a few steps on synthetic multimodal prompts,
save, reload and generate.

    python examples/quickstart.py [--steps 30] [--out out/quickstart]

Each prompt is ``[text x2][visual x8][audio x1][text x3]`` followed by a one-token answer. The answer is decided by
the visual tokens' embeddings, so the model must read the visual block; the audio token is noise.
"""

from __future__ import annotations

import argparse

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_mose import Modality, MoSEConfig, modality_ids_from_segments

SEGMENTS = [("text", 2), ("visual", 8), ("audio", 1), ("text", 3), ("answer", 1)]
ANSWERS = (10, 11)  # token ids of the two possible answers


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=32, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def batch(model: LlamaForCausalLM, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Prompt embeddings with a class-dependent visual block, the answer as the last token, labels on it only."""
    modality_ids = modality_ids_from_segments(SEGMENTS).expand(size, -1)
    classes = torch.randint(0, 2, (size,), generator=generator)
    ids = torch.randint(12, 32, modality_ids.shape, generator=generator)
    ids[:, -1] = torch.tensor(ANSWERS)[classes]
    embeds = model.get_input_embeddings()(ids).detach()
    visual = modality_ids == int(Modality.VISUAL)
    direction = torch.where(classes[:, None, None] == 1, 1.0, -1.0)
    embeds[visual] = (direction * 0.5 + 0.3 * torch.randn(size, 8, 64, generator=generator)).reshape(-1, 64)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return {"inputs_embeds": embeds, "labels": labels, "modality_ids": modality_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="out/quickstart")
    args = parser.parse_args()

    model = get_peft_model(tiny_llama(), MoSEConfig(r=8, n_experts=2, eps=0.1, lora_alpha=16))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, args.steps + 1):
        loss = model(**batch(model, 16, generator)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    model.eval()
    stats = model.base_model.routing_stats()
    first = next(iter(stats))
    print(f"lambda of {first} for the last batch: {stats[first]['lambda'][:4].tolist()}")
    model.save_pretrained(args.out)

    reloaded = PeftModel.from_pretrained(tiny_llama(), args.out).eval()
    test = batch(model, 8, torch.Generator().manual_seed(1))
    prompt = {"inputs_embeds": test["inputs_embeds"][:, :-1], "modality_ids": test["modality_ids"][:, :-1]}
    generated = reloaded.generate(**prompt, attention_mask=torch.ones(8, 14, dtype=torch.long), max_new_tokens=1,
                                  do_sample=False, pad_token_id=0)
    accuracy = (generated[:, -1] == test["labels"][:, -1]).float().mean().item()
    print(f"saved to {args.out}; reloaded model answers {accuracy:.0%} of 8 held-out prompts correctly")


if __name__ == "__main__":
    main()
