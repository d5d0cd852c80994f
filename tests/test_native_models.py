"""MoSE and AR on transformers' native multimodal models (tiny random models with the inputs their processors make):
default targets in the language model only, modality ids read off the model's own placeholder tokens, generation,
init identity, save/load, multiple adapters, AR and the conflict gate's probes (docs/models.md is generated from these
models by tests/models_doc.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import AutoConfig

from conftest import cache_of
from native_models import NATIVE_MODELS, build_native
from peft_mose import Modality, MoSEConfig, MoSELayer
from peft_mose.attention import GateDecisions, GateInputs, attention_reallocation
from peft_mose.modality_tokens import TESTED_MULTIMODAL, ModalityTokens
from peft_mose.targets import language_model_prefix

CFG = dict(r=4, n_experts=2, eps=0.3, lora_dropout=0.0)
GEN = dict(max_new_tokens=3, do_sample=False)


@pytest.fixture(scope="module", params=NATIVE_MODELS)
def case(request):
    return build_native(request.param)


def mose_of(case, **options):
    return get_peft_model(copy.deepcopy(case.model), MoSEConfig(**{**CFG, **options})).eval()


def extend(inputs: dict, token: torch.Tensor) -> dict:
    """The inputs of the next greedy step without a cache: the token appended, a real text position."""
    grown = dict(inputs, input_ids=torch.cat([inputs["input_ids"], token], 1))
    for key in ("attention_mask", "mm_token_type_ids"):
        if key in inputs:
            fill = torch.ones_like(token) if key == "attention_mask" else torch.zeros_like(token)
            grown[key] = torch.cat([inputs[key], fill.to(inputs[key].dtype)], 1)
    return grown


def other_media(case) -> dict:
    """The case's inputs with other pixels and audio features (same shapes, same placeholders)."""
    gen = torch.Generator().manual_seed(1)
    return {key: torch.randn(value.shape, generator=gen, dtype=value.dtype)
            if key.startswith(("pixel_values", "input_features")) else value
            for key, value in case.inputs.items()}


def with_answer(ids: torch.Tensor, generated: int) -> torch.Tensor:
    return torch.cat([ids, torch.full((ids.shape[0], generated), int(Modality.ANSWER))], dim=1)


def test_default_targets_are_the_language_models_attention(case):
    model = mose_of(case)
    prefix = language_model_prefix(case.model)
    names = [m.layer_name for m in model.modules() if isinstance(m, MoSELayer)]
    assert names and all(name.startswith(prefix + ".") for name in names)
    assert {name.rsplit(".", 1)[-1] for name in names} in ({"q_proj", "v_proj"}, {"qkv_proj"})
    everything = mose_of(case, target_modules="all-linear")
    linear = [m.layer_name for m in everything.modules() if isinstance(m, MoSELayer)]
    assert len(linear) > len(names) and all(name.startswith(prefix + ".") for name in linear)


def test_targets_in_an_encoder_are_refused_at_setup(case):
    with pytest.raises(ValueError, match=r"outside the language model .* e\.g\. '.*(tower|encoder|visual|audio)"):
        get_peft_model(copy.deepcopy(case.model), MoSEConfig(**CFG, target_modules=["q_proj", "v_proj", "k_proj",
                                                                                       "qkv", "out_proj", "fc1"]))


def test_modality_ids_come_from_the_models_own_tokens(case):
    tokens = ModalityTokens.from_config(case.model.config)
    assert torch.equal(tokens.modality_ids(case.inputs["input_ids"]), case.modality)
    model = mose_of(case, init_weights=False)
    with torch.no_grad():
        derived = model(**case.inputs).logits
        given = model(**case.inputs, modality_ids=case.modality).logits
        swapped = torch.where(case.modality == int(Modality.VISUAL), int(Modality.AUDIO),
                              torch.where(case.modality == int(Modality.AUDIO), int(Modality.VISUAL), case.modality))
        other = model(**case.inputs, modality_ids=swapped).logits
    assert torch.equal(derived, given)
    assert not torch.allclose(derived, other)  # the ids matter, so reading them is what made them equal


def test_only_mose_parameters_train_on_real_multimodal_inputs(case):
    model = mose_of(case, init_weights=False).train()
    model(**case.inputs).logits.float().square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".mose_" in name for name in grads)
    assert all(g is not None and torch.isfinite(g).all() for name, g in grads.items() if "mose_A" in name)
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)


def test_cached_generate_equals_a_greedy_loop_and_beams_keep_the_ids(case):
    model = mose_of(case, init_weights=False)
    with torch.no_grad():
        generated = model.generate(**case.inputs, **GEN)
        prompt = case.inputs["input_ids"].shape[1]
        inputs = dict(case.inputs)
        for step in range(GEN["max_new_tokens"]):
            logits = model(**inputs, modality_ids=with_answer(case.modality, step)).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            inputs = extend(inputs, token)
        assert torch.equal(generated[:, prompt:], inputs["input_ids"][:, prompt:])
        beams = dict(GEN, num_beams=2, num_return_sequences=2)
        assert torch.equal(model.generate(**case.inputs, **beams),
                           model.generate(**case.inputs, modality_ids=case.modality, **beams))


def test_init_identity_save_load_and_multi_adapter(case, tmp_path):
    with torch.no_grad():
        base = case.model(**case.inputs).logits
        assert torch.equal(mose_of(case)(**case.inputs).logits, base)
        model = mose_of(case, init_weights=False)
        model.add_adapter("second", MoSEConfig(**CFG, init_weights=False))
        first = model(**case.inputs).logits
        model.set_adapter("second")
        second = model(**case.inputs).logits
        assert not torch.allclose(first, second)
        model.set_adapter("default")
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path).eval()
        assert torch.equal(loaded(**case.inputs).logits, first)


def test_ar_reads_the_ids_off_the_tokens_and_moves_audio_mass_only_with_audio(case):
    model = copy.deepcopy(case.model)
    has_both = bool(((case.modality == int(Modality.VISUAL)).any(1) & (case.modality == int(Modality.AUDIO)).any(1)).any())
    with torch.no_grad():
        base = model(**case.inputs).logits
        with attention_reallocation(model, tau=float("inf")):
            assert torch.equal(model(**case.inputs).logits, base)
        with attention_reallocation(model, tau=0.0):
            moved = model(**case.inputs).logits
        with attention_reallocation(model, modality_ids=case.modality, tau=0.0):
            given = model(**case.inputs).logits
    assert torch.equal(moved, given)
    assert torch.equal(moved[:, :-1], base[:, :-1])  # only the response row changes
    assert (not torch.equal(moved[:, -1], base[:, -1])) == has_both


def test_gate_probes_are_the_models_own_forward_with_a_modality_left_out(case):
    """Each probe equals a forward written by hand: the call's own inputs and positions (captured from the language
    model), the left-out modality zeroed in the 2-D attention mask. Changing the pixels changes the probe."""
    model = copy.deepcopy(case.model)
    seen: list[tuple[GateInputs, torch.Tensor, torch.Tensor]] = []

    def detector(inputs: GateInputs):
        seen.append((inputs, inputs.without(Modality.VISUAL), inputs.without(Modality.AUDIO)))
        return GateDecisions(conflict=torch.zeros(len(inputs.valid), dtype=torch.bool))

    captured = {}
    decoder = model.get_submodule(language_model_prefix(model))  # not get_decoder(): the thinker itself on 5.4

    def capture(module, args, kwargs):
        captured.setdefault("position_ids", kwargs.get("position_ids"))

    hook = decoder.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        with attention_reallocation(model, tau=0.0, gate=detector):
            model(**case.inputs)
        hook.remove()
        _, without_visual, without_audio = seen[0]
        rows = seen[0][0].response_rows
        for modality, probe in ((Modality.VISUAL, without_visual), (Modality.AUDIO, without_audio)):
            mask = case.inputs["attention_mask"] * (case.modality != int(modality))
            inputs = dict(case.inputs, attention_mask=mask, position_ids=captured["position_ids"])
            by_hand = model(**inputs).logits[torch.arange(len(rows)), rows]
            torch.testing.assert_close(probe, by_hand, atol=1e-5, rtol=1e-5)
        other = other_media(case)
        with attention_reallocation(model, tau=0.0, gate=detector):
            model(**other)
    assert not torch.allclose(seen[1][2], without_audio) or not torch.allclose(seen[1][1], without_visual)


def test_the_multimodal_classes_taken_are_the_ones_tested_here():
    assert sorted(TESTED_MULTIMODAL) == sorted({type(build_native(name).model).__name__ for name in NATIVE_MODELS})


@pytest.mark.parametrize("class_name, model_type", [
    ("Qwen2_5OmniForConditionalGeneration", "qwen2_5_omni"),  # generate runs its thinker as a sub-model
    ("MllamaForConditionalGeneration", "mllama"),  # cross-attention v_proj reads the vision states
    ("Phi4MultimodalForCausalLM", "phi4_multimodal"),  # placeholders in sub-configs, encoders inside its decoder
    ("Gemma3ForConditionalGeneration", "gemma3"),  # plausible, but nothing checks it
    ("FuyuForCausalLM", "fuyu"),  # image placeholders, no encoder sub-config
])
def test_untested_multimodal_models_are_refused_at_setup_naming_the_class(class_name, model_type):
    with torch.device("meta"):
        model = getattr(transformers, class_name)(AutoConfig.for_model(model_type))
    hint = "model.thinker" if "Omni" in class_name else "Use one of those"
    refusal = rf"{class_name} is a multimodal model .*LlavaForConditionalGeneration.*{hint}"
    with pytest.raises(ValueError, match=refusal):
        get_peft_model(model, MoSEConfig(**CFG))
    assert not any(isinstance(m, MoSELayer) for m in model.modules())
    with pytest.raises(ValueError, match=rf"{class_name} is a multimodal model"):
        with attention_reallocation(model, tau=1.0):
            pass


def test_a_chunked_prefill_is_refused():
    case = build_native("llava")
    with pytest.raises(ValueError, match=r"prefill_chunk_size=4\) is not supported"):
        mose_of(case).generate(**case.inputs, prefill_chunk_size=4, **GEN)
    with pytest.raises(ValueError, match=r"prefill_chunk_size=4\) is not supported"):
        with attention_reallocation(case.model, tau=1.0):
            case.model.generate(**case.inputs, prefill_chunk_size=4, **GEN)


def test_media_in_a_call_that_continues_a_cache_is_refused():
    case = build_native("llava")
    model = mose_of(case)
    with torch.no_grad():
        first = model(**case.inputs, use_cache=True)
        mask = torch.cat([case.inputs["attention_mask"]] * 2, dim=1)
        with pytest.raises(ValueError, match=r"pixel_values in a call that continues a cache of \d+ positions"):
            model(**dict(case.inputs, attention_mask=mask), **cache_of(first))


def test_embeddings_with_encoded_media_are_refused_and_without_media_are_text():
    case = build_native("llava")
    model = mose_of(case, init_weights=False)
    embeds = case.model.get_input_embeddings()(case.inputs["input_ids"])
    mask = case.inputs["attention_mask"]
    with torch.no_grad(), pytest.raises(ValueError, match="called with mm_encoder_outputs and `inputs_embeds`"):
        model(inputs_embeds=embeds, attention_mask=mask, mm_encoder_outputs={"image": torch.zeros(1)})
    with torch.no_grad():
        text = torch.full_like(mask, int(Modality.TEXT))
        derived = model.generate(inputs_embeds=embeds, attention_mask=mask, **GEN)
        assert torch.equal(derived, model.generate(inputs_embeds=embeds, attention_mask=mask, modality_ids=text, **GEN))
