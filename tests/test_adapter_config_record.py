"""A saved MoSE adapter records the adapter_config.json fields that change its results in its safetensors metadata;
an edited adapter_config.json is refused on load naming the field (issue #27 case 4), harmless fields stay editable;
a local adapter_config.json that is missing, not JSON or of an unknown peft_type is refused naming the file (case 14).
"""

from __future__ import annotations

import json

import pytest
from peft import PeftModel, get_peft_model

from conftest import make_tiny_llama
from peft_mose import MoSEConfig
from peft_mose.checksum import ChecksumError


@pytest.fixture
def saved(tmp_path):
    model = get_peft_model(make_tiny_llama(), MoSEConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    return tmp_path


def edit(folder, **values):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "field, value", [("eps", 0.3), ("lora_alpha", 32), ("nonvisual_modalities", ["audio"]), ("r", 8)]
)
def test_an_edited_result_field_is_refused_naming_it(saved, field, value):
    edit(saved, **{field: value})
    with pytest.raises(ChecksumError, match=rf"adapter_config.json was changed after the adapter was saved: {field} is"):
        PeftModel.from_pretrained(make_tiny_llama(), str(saved))


def test_harmless_fields_stay_editable_and_list_order_does_not_matter(saved):
    edit(saved, inference_mode=False, base_model_name_or_path="elsewhere", revision="v2",
         target_modules=["v_proj", "q_proj"], lora_alpha=16.0)  # fmt: skip
    PeftModel.from_pretrained(make_tiny_llama(), str(saved))


@pytest.mark.parametrize(
    "content, message",
    [(None, "adapter_config.json does not exist"), ("{not json", "adapter_config.json is not valid JSON"),
     ('{"peft_type": "NOPE"}', "adapter_config.json: unknown peft_type 'NOPE'"),
     ('{"r": 4}', "adapter_config.json has no 'peft_type'")],
)  # fmt: skip
def test_raw_from_pretrained_names_a_bad_adapter_config(saved, content, message):
    path = saved / "adapter_config.json"
    path.unlink()
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        PeftModel.from_pretrained(make_tiny_llama(), str(saved))
    assert str(path) in str(error.value)
