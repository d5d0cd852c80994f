"""MoSE on transformers' text LMs (tiny random models from their config classes): default targets (attention query
and value, fused where the model fuses them), training, cached generation against a greedy loop, init identity and
save/load, with a multimodal layout of modality ids."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

from conftest import layout
from peft_mose import Modality, MoSEConfig, MoSELayer

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=256, pad_token_id=0)
# name: (config class, model class, config values, default targets)
TEXT_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL, {"q_proj", "v_proj"}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, sliding_window=8), {"q_proj", "v_proj"}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SMALL, {"q_proj", "v_proj"}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(SMALL, head_dim=16), {"q_proj", "v_proj"}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(SMALL, head_dim=16, sliding_window=8), {"q_proj", "v_proj"}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(SMALL, head_dim=16, sliding_window=8),
               {"q_proj", "v_proj"}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(SMALL, bos_token_id=1, eos_token_id=2), {"qkv_proj"}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=256,
                                                   bos_token_id=1, eos_token_id=2), {"c_attn"}),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                               vocab_size=96, word_embed_proj_dim=64, max_position_embeddings=256,
                                               pad_token_id=0), {"q_proj", "v_proj"}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                            num_attention_heads=4, vocab_size=96,
                                                            max_position_embeddings=256), {"query_key_value"}),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                        vocab_size=96), {"query_key_value"}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(SMALL, num_local_experts=4, num_experts_per_tok=2),
                {"q_proj", "v_proj"}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(SMALL, num_experts=4, num_experts_per_tok=2,
                                                               moe_intermediate_size=32,
                                                               shared_expert_intermediate_size=64),
                  {"q_proj", "v_proj"}),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=96),
              {"query_key_value"}),
}
CFG = dict(r=4, n_experts=2, eps=0.3, lora_dropout=0.0)


def build(name: str) -> torch.nn.Module:
    config_class, model_class, values, _ = TEXT_MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**values)).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # the greedy loop below does not stop either
    return model


@pytest.fixture(scope="module", params=sorted(TEXT_MODELS))
def text_model(request):
    return request.param, build(request.param)


def prompt(seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 90, (2, seq), generator=torch.Generator().manual_seed(0))
    return ids, layout(seq=seq)


def test_defaults_attach_train_generate_and_round_trip(text_model, tmp_path):
    name, base = text_model
    ids, mods = prompt()
    model = get_peft_model(copy.deepcopy(base), MoSEConfig(**CFG, init_weights=False))
    names = {m.layer_name.rsplit(".", 1)[-1] for m in model.modules() if isinstance(m, MoSELayer)}
    assert names == TEXT_MODELS[name][3]

    model.train()
    model(input_ids=ids, modality_ids=mods).logits.square().mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".mose_" in n for n in trained)
    model.eval()

    with torch.no_grad():
        generated = model.generate(input_ids=ids, modality_ids=mods, max_new_tokens=3, do_sample=False)
        tokens = ids
        for _ in range(3):
            answer = torch.full((2, tokens.shape[1] - ids.shape[1]), int(Modality.ANSWER))
            logits = model(input_ids=tokens, modality_ids=torch.cat([mods, answer], 1)).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(generated, tokens)

        logits = model(input_ids=ids, modality_ids=mods).logits
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        assert torch.equal(loaded(input_ids=ids, modality_ids=mods).logits, logits)
        identity = get_peft_model(copy.deepcopy(base), MoSEConfig(**CFG))
        assert torch.equal(identity(input_ids=ids, modality_ids=mods).logits, base(input_ids=ids).logits)
