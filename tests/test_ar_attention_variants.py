"""Attention reallocation on the attention variants of transformers' text LMs (tiny random models): exact where
``AR_SUPPORT`` says so (tau=inf is the model bit for bit, AR equals a float64 oracle built on the model's own eager
attention, a sample without audio is unchanged, cached and uncached generation agree), refused at setup, naming the
model and the reason, where it says so. ``AR_SUPPORT`` is the record ``docs/models.md`` is generated from."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import pytest
import torch
import transformers as tf
from packaging.version import Version
from torch import Tensor
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from conftest import CACHE_KEYWORD, VOCAB
from peft_mose import Modality
from peft_mose._compat.transformers import output_cache
from peft_mose.attention import attention_reallocation, reallocate_attention

OWN_ATTENTION = (
    "computes attention inside its own attention modules instead of calling transformers' AttentionInterface"
)
EXACT = "exact"

# What AR does on each model: "exact" (on every base of its `Spec.bases`) or "refused: <what its error says>".
AR_SUPPORT: dict[str, str] = {
    "llama": EXACT,
    "mistral": EXACT,
    "qwen2": EXACT,
    "qwen3": EXACT,
    "gemma2": EXACT,
    "gemma3": EXACT,
    "phi3": EXACT,
    "gpt2": EXACT,
    "opt": EXACT,
    "gpt_neox": EXACT,
    "mixtral": EXACT,
    "qwen2_moe": EXACT,
    # Falcon passes its ALiBi bias to AttentionInterface in the mask from transformers 5.25 on, and computed attention
    # in its own modules before
    "falcon": EXACT if tf.FalconForCausalLM._can_set_attn_implementation() else f"refused: {OWN_ATTENTION}",
    "bloom": f"refused: {OWN_ATTENTION}",
    "gpt_oss": "refused: its attention sinks (GPT-OSS: a learned logit per head that takes part in the softmax",
}
# The first transformers release on which AR_SUPPORT's value is "exact", for models whose support depends on it, and
# what docs/models.md (which describes every supported release) says of them.
EXACT_SINCE = {"falcon": "5.25.0"}
AR_SUPPORT_DOC = {"falcon": f"exact from transformers 5.25 (ALiBi reaches AttentionInterface in the mask); before, "
                            f"refused: {OWN_ATTENTION}"}  # fmt: skip

WINDOW = 8  # the sliding window of the models that have one: the response row sees part of the visual block


@dataclass(frozen=True)
class Spec:
    """A tiny random model of one family: hidden 32, 4 heads (2 KV heads where the family has GQA), 2 layers."""

    config: type
    model: type
    options: dict = field(default_factory=dict)
    bases: tuple[str, ...] = ("sdpa", "eager")
    """The implementations transformers offers for it that AR runs on (Gemma 2 has no SDPA: it soft-caps)."""
    sliding: bool = False
    """Has sliding-window layers (window ``WINDOW``), whose KV cache drops the oldest keys while generating."""


GQA = dict(num_key_value_heads=2)
# the eager experts: the default grouped matmul has no float64 kernel
MOE = dict(num_local_experts=2, num_experts_per_tok=1, experts_implementation="eager")
SPECS: dict[str, Spec] = {
    "llama": Spec(tf.LlamaConfig, tf.LlamaForCausalLM, GQA),
    "mistral": Spec(tf.MistralConfig, tf.MistralForCausalLM, dict(GQA, sliding_window=WINDOW), sliding=True),
    "qwen2": Spec(
        tf.Qwen2Config, tf.Qwen2ForCausalLM,
        dict(GQA, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), sliding=True,
    ),
    "qwen3": Spec(tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(GQA, head_dim=16)),
    "gemma2": Spec(
        tf.Gemma2Config, tf.Gemma2ForCausalLM,
        dict(GQA, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=1.0, query_pre_attn_scalar=4),
        bases=("eager",), sliding=True,
    ),
    "gemma3": Spec(  # its config has attn_logit_softcapping, which its attention does not apply (nor may AR)
        tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
        dict(GQA, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=1.0, query_pre_attn_scalar=4,
             layer_types=["sliding_attention", "full_attention"]),
        sliding=True,
    ),
    "phi3": Spec(tf.Phi3Config, tf.Phi3ForCausalLM, GQA),
    "gpt2": Spec(tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_positions=64)),
    "opt": Spec(tf.OPTConfig, tf.OPTForCausalLM, dict(ffn_dim=64, word_embed_proj_dim=32)),
    "gpt_neox": Spec(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM),
    "mixtral": Spec(tf.MixtralConfig, tf.MixtralForCausalLM, dict(GQA, **MOE)),
    "qwen2_moe": Spec(
        tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
        dict(GQA, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=2, num_experts_per_tok=1,
             experts_implementation="eager"),
    ),
    "falcon": Spec(tf.FalconConfig, tf.FalconForCausalLM, dict(alibi=True)),
    "bloom": Spec(tf.BloomConfig, tf.BloomForCausalLM, dict(n_layer=2, n_head=4)),
    "gpt_oss": Spec(tf.GptOssConfig, tf.GptOssForCausalLM, dict(GQA, head_dim=16, **MOE), bases=("eager",)),
}


def make_model(name: str, base: str, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """The tiny random model ``name`` on ``base`` attention, with weights large enough for peaked attention."""
    spec = SPECS[name]
    values = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = spec.model(spec.config(**(values | spec.options | overrides))).to(dtype).eval()
    model.set_attn_implementation(base)
    model.generation_config.pad_token_id = 0
    return model


EXACT_CASES = [(name, base) for name, spec in SPECS.items() if AR_SUPPORT[name] == EXACT for base in spec.bases]
REFUSED = [name for name in SPECS if AR_SUPPORT[name] != EXACT]
GREEDY = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)


def prompt() -> tuple[Tensor, Tensor]:
    """Token ids and modality ids ``[2, 12]``: text, 6 visual, 3 audio, text; sample 1 has text where sample 0 has
    audio. With a window of 8 the last row sees 4 of the visual tokens."""
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    mods = torch.full((2, 12), int(Modality.TEXT))
    mods[:, 2:8] = int(Modality.VISUAL)
    mods[0, 8:11] = int(Modality.AUDIO)
    return ids, mods


def oracle_logits(model: torch.nn.Module, ids: Tensor, mods: Tensor, tau: float) -> Tensor:
    """Logits of a float64 oracle independent of AR's backend: each layer's attention weights are those of the
    model's own ``eager_attention_forward`` (its scaling, soft-capping, causal and sliding-window masks, as
    transformers computes them), the last row's (the response row's) are replaced by ``reallocate_attention`` (the
    functional reference of Algorithm 1), and the layer's output is recomputed by hand as weights @ V."""
    visual, audio = mods == int(Modality.VISUAL), mods == int(Modality.AUDIO)

    def attention(module, query, key, value, attention_mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        _, weights = eager(module, query, key, value, attention_mask, **kwargs)
        weights = weights.clone()
        weights[:, :, -1:] = reallocate_attention(weights[:, :, -1:], visual, audio, tau)
        values = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        return (weights @ values).transpose(1, 2).contiguous(), weights

    previous = model.config._attn_implementation
    AttentionInterface.register("ar_oracle", attention)
    AttentionMaskInterface.register("ar_oracle", eager_mask)
    model.set_attn_implementation("ar_oracle")
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        model.set_attn_implementation(previous)


def test_the_support_record_covers_every_model_and_names_transformers_bases():
    assert set(AR_SUPPORT) == set(SPECS) and set(AR_SUPPORT_DOC) == set(EXACT_SINCE)
    for name, release in EXACT_SINCE.items():
        assert (AR_SUPPORT[name] == EXACT) == (Version(tf.__version__) >= Version(release))
    assert all(value == EXACT or value.startswith("refused: ") for value in AR_SUPPORT.values())
    with pytest.raises(ValueError, match="does not support an attention implementation through torch.nn"):
        make_model("gpt_oss", "sdpa")  # no SDPA in transformers (GPT-OSS's sinks)


def test_soft_capping_on_sdpa_is_refused_naming_eager(monkeypatch):
    """Gemma 2 on SDPA, as transformers before 5.23 offered it (its SDPA function drops ``softcap``)."""
    pretrained = tf.models.gemma2.modeling_gemma2.Gemma2PreTrainedModel
    monkeypatch.setattr(pretrained, "_supports_sdpa", True)
    model = make_model("gemma2", "sdpa")
    ids, mods = prompt()
    with torch.no_grad(), attention_reallocation(model, mods, tau=0.0):
        with pytest.raises(ValueError, match=r"soft-caps its attention logits .*set_attn_implementation\('eager'\)"):
            model(input_ids=ids)


@pytest.mark.parametrize("name, base", EXACT_CASES)
def test_tau_inf_is_the_model_bit_for_bit(name, base):
    model = make_model(name, base)
    ids, mods = prompt()
    with torch.no_grad():
        expected, expected_run = model(input_ids=ids).logits, model.generate(ids, **GREEDY)
        with attention_reallocation(model, mods, tau=math.inf):
            logits, run = model(input_ids=ids).logits, model.generate(ids, **GREEDY)
    assert torch.equal(logits, expected)
    assert torch.equal(run.sequences, expected_run.sequences)
    assert all(torch.equal(a, b) for a, b in zip(run.scores, expected_run.scores))


@pytest.mark.parametrize("name, base", EXACT_CASES)
def test_ar_equals_the_float64_oracle_and_changes_only_the_response_row_of_the_sample_with_audio(name, base):
    """The oracle's weights come from the eager function, whose softmax is float32 in most families (relative
    error ~1e-7, 1e-5 on these logits); AR changes the response row by more than 1e-2."""
    model = make_model(name, base, torch.float64)
    ids, mods = prompt()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with attention_reallocation(model, mods, tau=0.0):
            after = model(input_ids=ids).logits
    torch.testing.assert_close(after, oracle_logits(model, ids, mods, tau=0.0), atol=1e-5, rtol=1e-5)
    assert (after[0, -1] - before[0, -1]).abs().amax() > 1e-2
    assert torch.equal(after[:, :-1], before[:, :-1])  # the other rows come from the base implementation
    torch.testing.assert_close(after[1], before[1], atol=1e-5, rtol=1e-5)  # no audio: AR leaves the sample alone


@pytest.mark.parametrize("name, base", EXACT_CASES)
def test_generation_with_and_without_a_cache_agrees_under_ar(name, base):
    """Sliding-window families also generate with a static cache; both caches drop the keys that left the window,
    which AR maps to the last positions."""
    model = make_model(name, base)
    ids, mods = prompt()
    caches = [dict(use_cache=False)] + ([dict(cache_implementation="static")] if SPECS[name].sliding else [])
    with torch.no_grad():
        plain = model.generate(ids, **GREEDY)
        with attention_reallocation(model, mods, tau=0.0):
            cached = model.generate(ids, **GREEDY)
            others = [model.generate(ids, **GREEDY, **options) for options in caches]
    for other in others:
        assert torch.equal(cached.sequences, other.sequences)
        for a, b in zip(cached.scores, other.scores):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (cached.scores[0] - plain.scores[0]).abs().amax() > 1e-2
    if SPECS[name].sliding:  # a sliding layer's cache dropped the oldest keys
        assert WINDOW - 1 in {layer.keys.shape[-2] for layer in output_cache(cached).layers}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_models_are_refused_at_setup_naming_the_model_and_the_reason(name):
    model = make_model(name, SPECS[name].bases[0])
    previous = model.config._attn_implementation
    with pytest.raises(ValueError) as info, attention_reallocation(model, prompt()[1]):
        pass
    message = str(info.value)
    assert type(model).__name__ in message and AR_SUPPORT[name].removeprefix("refused: ") in message
    assert model.config._attn_implementation == previous and not model._forward_pre_hooks


def test_flex_attention_is_refused_naming_what_works():
    model = make_model("llama", "flex_attention")
    with pytest.raises(ValueError, match=r"uses 'flex_attention'.*set_attn_implementation\('sdpa'\)"):
        with attention_reallocation(model, prompt()[1]):
            pass


def test_gpt2_with_reorder_and_upcast_is_refused_on_eager_and_exact_on_sdpa():
    ids, mods = prompt()
    with pytest.raises(ValueError, match="GPT2LMHeadModel with reorder_and_upcast_attn=True"):
        with attention_reallocation(make_model("gpt2", "eager", reorder_and_upcast_attn=True), mods):
            pass
    model = make_model("gpt2", "sdpa", reorder_and_upcast_attn=True)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with attention_reallocation(model, mods, tau=math.inf):
            assert torch.equal(model(input_ids=ids).logits, expected)


def test_an_attention_keyword_ar_does_not_know_is_refused_naming_it():
    model = make_model("llama", "sdpa")
    ids, mods = prompt()
    extra = {"attention_bias_of_the_future": torch.ones(1)}
    with torch.no_grad():
        model(input_ids=ids, **extra)  # the base implementation ignores it
        with attention_reallocation(model, mods, tau=0.0), pytest.raises(ValueError, match="attention_bias_of_the"):
            model(input_ids=ids, **extra)


def test_recording_refuses_a_sliding_window_cache_and_works_with_a_full_one():
    model = make_model("mistral", "sdpa")
    ids, mods = prompt()
    with torch.no_grad(), attention_reallocation(model, mods, tau=0.0, record=True) as block:
        with pytest.raises(ValueError, match="holds only the last 8 of 13"):
            model.generate(ids, **GREEDY)
        full = model.generate(ids, **GREEDY, **{CACHE_KEYWORD: DynamicCache()})
        uncached = model.generate(ids, **GREEDY, use_cache=False)
    assert torch.equal(full.sequences, uncached.sequences)
    assert sorted(block.diagnostics.steps) == list(range(GREEDY["max_new_tokens"]))
