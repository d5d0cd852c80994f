"""Bad input gets an error that names the problem."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import cache_of, layout, make_tiny_llama, random_tokens
from peft_mose import Modality, MoSEConfig, modality_ids_from_segments
from peft_mose.checksum import CONFIG_KEY

CFG = dict(r=8, n_experts=2, init_weights=False, lora_dropout=0.0)


@pytest.fixture
def mose(llama):
    return get_peft_model(llama, MoSEConfig(**CFG)).eval()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("eps", 0.6, r"`eps` must satisfy 0 <= eps <= 0.5, got 0.6"),
        ("eps", -0.1, r"`eps` must satisfy"),
        ("eps", float("nan"), r"`eps` must satisfy"),
        ("r", 0, r"`r` must be an integer >= 1"),
        ("n_experts", 0, r"`n_experts` must be an integer >= 1"),
        ("n_experts", 1.5, r"`n_experts` must be an integer"),
        ("router_hidden_size", 0, r"`router_hidden_size` must be an integer >= 1"),
        ("lora_dropout", 1.0, r"`lora_dropout` must satisfy 0 <= lora_dropout < 1"),
        ("lora_alpha", 0, r"`lora_alpha` must be a finite number > 0"),
        ("visual_modalities", ["smell"], r"`visual_modalities`: Unknown modality name 'smell'"),
        ("nonvisual_modalities", ["visual", "audio"], r"must be disjoint; both contain \['visual'\]"),
        ("nonvisual_modalities", ["answer"], r"cannot contain 'answer'"),
        ("answer_modality", "visual", r"`answer_modality` must be 'text' or 'omni'"),
        ("bias", "all", r"`bias` must be 'none'"),
    ],
)
def test_config_values_out_of_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        MoSEConfig(**{field: value})


def test_config_accepts_modality_values_and_round_trips_through_json(tmp_path):
    config = MoSEConfig(visual_modalities=[Modality.VISUAL], nonvisual_modalities=[2, "TEXT"])
    assert config.visual_modalities == ["visual"] and config.nonvisual_modalities == ["text", "audio"]
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "MOSE" and data["nonvisual_modalities"] == ["text", "audio"]
    assert MoSEConfig.from_pretrained(tmp_path).expert_modalities() == config.expert_modalities()


@pytest.mark.parametrize(
    "mods, message",
    [
        (layout()[:, :10], r"`modality_ids` has length 10 but the call covers 16 positions"),
        (layout()[:1], r"`modality_ids` has batch size 1 but the model was called with batch size 2"),
        (layout().float(), r"must be an integer tensor of Modality values, got dtype torch.float32"),
        (layout()[0], r"must have shape \[batch, seq_len\], got \(16,\)"),
        (layout() + 7, r"unknown modality id 9; known ids: TEXT=0"),
        (layout() - 1, r"unknown modality id -1"),
    ],
    ids=["length", "batch", "float", "1d", "unknown_high", "unknown_low"],
)
def test_bad_modality_ids_in_forward(mose, mods, message):
    with pytest.raises(ValueError, match=message):
        mose(input_ids=random_tokens(), modality_ids=mods)


@pytest.mark.parametrize(
    "mods, message",
    [
        (layout()[:, :10], r"`modality_ids` has length 10 but the inputs have sequence length 16"),
        (layout()[:1], r"`modality_ids` has batch size 1 but the inputs have batch size 2"),
        (layout() + 7, r"unknown modality id 9; known ids: TEXT=0"),
    ],
)
def test_bad_modality_ids_in_generate(mose, mods, message):
    with pytest.raises(ValueError, match=message):
        mose.generate(input_ids=random_tokens(), modality_ids=mods, max_new_tokens=2)


def test_a_failed_call_leaves_the_model_usable(mose):
    ok = mose(input_ids=random_tokens(), modality_ids=layout()).logits
    with pytest.raises(ValueError):
        mose.generate(input_ids=random_tokens(), modality_ids=layout()[:, :3], max_new_tokens=2)
    assert torch.equal(mose(input_ids=random_tokens(), modality_ids=layout()).logits, ok)


def test_continuing_a_cache_without_a_prompt_is_refused(llama):
    model = get_peft_model(llama, MoSEConfig(**CFG)).eval()
    out = make_tiny_llama()(input_ids=random_tokens(), use_cache=True)  # cache from another model: no prompt lambda
    with pytest.raises(ValueError, match="whose prompt did not run through this MoSE model"):
        model(input_ids=random_tokens(seq=1), **cache_of(out), modality_ids=torch.zeros(2, 17, dtype=torch.long))


def test_segments_reject_negative_lengths():
    assert modality_ids_from_segments([("text", 2), (Modality.VISUAL, 3), (2, 1)]).tolist() == [0, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="Segment length must be >= 0, got -1"):
        modality_ids_from_segments([("visual", -1)])


def test_unsupported_target_module_is_named(llama):
    with pytest.raises(ValueError, match="MoSE can adapt torch.nn.Linear and transformers Conv1D layers, got Embedding"):
        get_peft_model(llama, MoSEConfig(target_modules=["embed_tokens"]))


def test_target_outside_the_token_sequence_is_named():
    """A MoSE layer must see the model's token sequence; anything else (here a pooled head) is refused clearly."""

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 4)

        def forward(self, inputs_embeds):
            return self.head(inputs_embeds.mean(1, keepdim=True))

    model = get_peft_model(Pooled(), MoSEConfig(target_modules=["head"], task_type=None, r=2))
    with pytest.raises(ValueError, match="MoSE layer 'head' received input of batch 2 and length 1.*5 new tokens"):
        model(inputs_embeds=torch.randn(2, 5, 8), modality_ids=torch.zeros(2, 5, dtype=torch.long))


@pytest.fixture
def saved(tmp_path, llama):
    get_peft_model(llama, MoSEConfig(**CFG)).save_pretrained(tmp_path)
    return tmp_path


def _rewrite(path, edit):
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def test_adapter_for_another_base_model_is_refused(saved):
    other = make_tiny_llama(hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match=r"tensor '.*mose_A.default' has shape \(3, 8, 64\) but the model expects "
                                         r"\(3, 8, 32\)"):
        PeftModel.from_pretrained(other, saved)


def test_adapter_file_with_a_missing_tensor_is_refused(saved):
    _rewrite(saved, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.mose_gate"))
    with pytest.raises(ValueError, match="lacks 1 tensor.*layers.1.self_attn.v_proj.mose_gate"):
        PeftModel.from_pretrained(make_tiny_llama(), saved)


def test_adapter_file_with_an_extra_tensor_is_refused(saved):
    def add(tensors):
        tensors["base_model.model.model.layers.0.mlp.up_proj.mose_A"] = torch.zeros(3, 8, 64)

    _rewrite(saved, add)
    with pytest.raises(ValueError, match="no place in this model.*mlp.up_proj.mose_A"):
        PeftModel.from_pretrained(make_tiny_llama(), saved)


def test_config_that_does_not_match_the_weights_is_refused(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["n_experts"] = 3
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter_config.json was changed after the adapter was saved: n_experts is 3"):
        PeftModel.from_pretrained(make_tiny_llama(), saved)
    weights = saved / "adapter_model.safetensors"  # saved without the config record (older saves): the shape check
    with safe_open(str(weights), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != CONFIG_KEY}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(ValueError, match=r"mose_B.*has shape \(64, 3, 2, 8\).*expects \(64, 3, 3, 8\).*n_experts=3"):
        PeftModel.from_pretrained(make_tiny_llama(), saved)


def test_truncated_adapter_file_is_reported(saved):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(Exception, match="Error while deserializing header"):
        PeftModel.from_pretrained(make_tiny_llama(), saved)
