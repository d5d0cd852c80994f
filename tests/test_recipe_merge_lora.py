"""--merge_checkpoint_lora: MoSE trained on top of MiniGPT-v2 (Llama-2-chat plus the LoRA of the original .pth,
merged), on the tiny setup: the merged weights against W + B A alpha / r computed here, a MoSE model at init equal
to the merged base, the reloaded run on the same base, and the argument checks."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import torch

from mosear_recipes.emotion_llama.checkpoint import merge_lora_checkpoint
from mosear_recipes.emotion_llama.model import load_llm, load_tokenizer
from mosear_recipes.arguments import (
    DataArguments,
    FinetuneArguments,
    FinetuneConfig,
    ModelArguments,
    ScheduleArguments,
    check_args,
)
from mosear_recipes.modeling import build_model
from mosear_recipes.run import load_trained
from mosear_recipes.run_config import RunConfig, StageConfig
from mosear_recipes.trainer import save_trained
from test_evaluate_model import checkpoint, weights  # noqa: F401 (module fixtures)

SCALE = 16 / 64  # Emotion-LLaMA's LoRA: alpha 16, r 64


def merged_by_hand(tiny, lora: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The tiny LLM with W + B A * alpha / r written into every q_proj / v_proj, from PEFT-named LoRA tensors."""
    llm = load_llm(tiny.model_dir)
    params = dict(llm.named_parameters())
    with torch.no_grad():
        for key, a in lora.items():
            if ".lora_A." not in key:
                continue
            module = re.match(r"base_model\.model\.(.+)\.lora_A\.default\.weight$", key)[1]
            b = lora[key.replace("lora_A", "lora_B")]
            params[f"{module}.weight"] += (b.double() @ a.double() * SCALE).to(a.dtype)
    return llm


def ids(tiny) -> torch.Tensor:
    return torch.arange(3, 3 + 12).remainder(load_llm(tiny.model_dir).config.vocab_size)[None].repeat(2, 1)


def test_merged_weights_are_the_base_plus_b_a_alpha_over_r(tiny, weights, checkpoint):  # noqa: F811
    _, lora = weights
    merged, report = merge_lora_checkpoint(load_llm(tiny.model_dir), checkpoint)
    assert len(report.loaded) == 8 and not report.missing
    assert not hasattr(merged, "peft_config") and not any("lora" in name for name, _ in merged.named_parameters())
    expected = merged_by_hand(tiny, lora).state_dict()
    base = load_llm(tiny.model_dir).state_dict()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)
        changed = not torch.equal(tensor, base[name])
        assert changed == (name.endswith(("q_proj.weight", "v_proj.weight"))), name


def test_mose_at_init_on_the_merged_base_equals_the_merged_base(
    tiny, weights, checkpoint, tmp_path, caplog  # noqa: F811
):
    caplog.set_level(logging.INFO, logger="mosear_recipes")
    model_args = ModelArguments(model_name_or_path=str(tiny.model_dir), projector_checkpoint=str(checkpoint),
                                merge_checkpoint_lora=True, r=8)  # fmt: skip
    tokenizer = load_tokenizer(tiny.model_dir)
    model = build_model(model_args, tiny.model_dir, tiny.data.spec, tokenizer).eval()
    assert f"LoRA checkpoint {checkpoint}: loaded 8 tensors" in caplog.text
    tokens = ids(tiny)
    with torch.no_grad():
        logits = model.llm(input_ids=tokens).logits
        expected = merged_by_hand(tiny, weights[1])(input_ids=tokens).logits
        plain = load_llm(tiny.model_dir)(input_ids=tokens).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert (logits - plain).abs().amax() > 1e-3
    # Without the option the same arguments build MoSE on the plain LLM.
    unmerged = build_model(dataclasses.replace(model_args, merge_checkpoint_lora=False), tiny.model_dir,
                           tiny.data.spec, tokenizer).eval()  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(unmerged.llm(input_ids=tokens).logits, plain)

    # A run saved with the option is reloaded on the merged base.
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # a trained adapter, so that the reload is no identity by accident
        trained = model.llm(input_ids=tokens).logits
    save_trained(model, tmp_path)
    RunConfig(model_name_or_path=str(tiny.model_dir), data_root=str(tiny.data.root), feature_spec=tiny.data.spec,
              audio_repeat=1, stage=StageConfig("coarse", "a.txt", ("emotion",), 1e-3), world_size=1,
              merged_lora_checkpoint=str(checkpoint)).write(tmp_path)  # fmt: skip
    reloaded = load_trained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model.llm(input_ids=tokens).logits, trained, atol=1e-5, rtol=1e-5)


def test_merge_arguments_are_checked(tiny, tmp_path):
    data_args, args = DataArguments(tiny_setup=True), FinetuneArguments(output_dir=str(tmp_path))

    def config(**model: object) -> FinetuneConfig:
        return FinetuneConfig(ModelArguments(**model), data_args, ScheduleArguments(), args)

    with pytest.raises(ValueError, match="--merge_checkpoint_lora merges the LoRA of --projector_checkpoint"):
        check_args(config(merge_checkpoint_lora=True))
    with pytest.raises(ValueError, match="not both"):
        check_args(config(projector_checkpoint="a.pth", init_from="run"))
    # stage 2 on the merged base: projectors and adapter from the run, the LoRA from the checkpoint
    check_args(config(projector_checkpoint="a.pth", init_from="run", merge_checkpoint_lora=True))
    projectors_only = tmp_path / "projectors_only.pth"
    torch.save({"model": {"llama_proj.bias": torch.zeros(64)}}, projectors_only)
    with pytest.raises(ValueError, match="holds no LoRA weights of the LLM to merge"):
        merge_lora_checkpoint(load_llm(tiny.model_dir), projectors_only)
