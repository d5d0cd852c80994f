"""The checksum of saved MoSE adapters (and the recipes' projector files): stored on save, verified on load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama, random_tokens
from peft_mose import MoSEConfig
from peft_mose.checksum import METADATA_KEY, ChecksumError
from mosear_recipes.emotion_llama.checkpoint import load_projectors, save_projectors
from mosear_recipes.emotion_llama.features import FeatureSpec
from mosear_recipes.emotion_llama.projectors import EmotionLlamaProjectors

WEIGHTS = "adapter_model.safetensors"


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def flip_last_byte(path: Path) -> None:
    """Flip one bit in the last byte of the file: inside the tensor data, where safetensors checks nothing."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.fixture
def saved(llama, tmp_path) -> Path:
    get_peft_model(llama, MoSEConfig(r=4, init_weights=False)).save_pretrained(str(tmp_path))
    return tmp_path


def test_save_pretrained_stores_the_checksum_and_loading_verifies_it(saved):
    assert metadata(saved / WEIGHTS)[METADATA_KEY] and metadata(saved / WEIGHTS)["format"] == "pt"
    ids = random_tokens()
    with torch.no_grad():
        before = PeftModel.from_pretrained(make_tiny_llama(), str(saved))(input_ids=ids).logits
    flip_last_byte(saved / WEIGHTS)
    with pytest.raises(ChecksumError, match=rf"{saved / WEIGHTS}: the tensors do not match the checksum saved"):
        PeftModel.from_pretrained(make_tiny_llama(), str(saved))
    model = get_peft_model(make_tiny_llama(), MoSEConfig(r=4, init_weights=False))
    with pytest.raises(ChecksumError, match=WEIGHTS):
        model.load_adapter(str(saved), adapter_name="other")
    flip_last_byte(saved / WEIGHTS)  # restored: loads again, to the same model
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(make_tiny_llama(), str(saved))(input_ids=ids).logits, before)


def test_files_without_a_checksum_still_load_and_other_adapters_get_none(saved, tmp_path):
    save_file(load_file(str(saved / WEIGHTS)), str(saved / WEIGHTS), metadata={"format": "pt"})  # an older save
    PeftModel.from_pretrained(make_tiny_llama(), str(saved))
    lora = tmp_path / "lora"
    get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(lora))
    assert metadata(lora / WEIGHTS) == {"format": "pt"}


def test_a_truncated_adapter_file_is_named(saved):
    (saved / WEIGHTS).write_bytes((saved / WEIGHTS).read_bytes()[:40])
    with pytest.raises(ChecksumError, match=rf"{saved / WEIGHTS} is not a readable safetensors file"):
        PeftModel.from_pretrained(make_tiny_llama(), str(saved))


def test_projector_files_carry_the_checksum_too(tmp_path):
    projectors = EmotionLlamaProjectors.from_spec(FeatureSpec.tiny(), 8)
    path = save_projectors(projectors, tmp_path / "projectors.safetensors")
    assert METADATA_KEY in metadata(path)
    load_projectors(projectors, path)
    flip_last_byte(path)
    with pytest.raises(ChecksumError, match=str(path)):
        load_projectors(projectors, path)
