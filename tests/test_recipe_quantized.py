"""recipes/merr_finetune.py --quantization: the tiny default trained on a 4-bit (NF4, with activation checkpointing
and 8-bit AdamW) and an 8-bit frozen LLM, the
adapter learning (the progress guard stays silent), the run reloaded on the same quantized base; bad combinations
refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from mosear_recipes import finetune
from mosear_recipes.modeling import read_reference_outputs
from mosear_recipes.run import load_trained
from mosear_recipes.run_config import REFERENCE_FILE, RunConfig
from test_recipe_finetune import on_tiny

SHORT = ["--iters_per_epoch", "3", "--num_train_epochs", "1", "--warmup_steps", "1", "--logging_steps", "1",
         "--save_strategy", "steps", "--save_steps", "3", "--eval_annotation", "none", "--disable_tqdm", "true"]  # fmt: skip


@pytest.mark.parametrize("quantization, layer, extra", [
    ("4bit", "Linear4bit", ["--gradient_checkpointing", "true", "--optim", "adamw_bnb_8bit"]),  # QLoRA-style
    ("8bit", "Linear8bitLt", []),
])
def test_a_quantized_llm_trains_and_reloads(tiny, tmp_path, quantization, layer, extra):
    finetune.main(on_tiny(tiny, "--output_dir", str(tmp_path), "--quantization", quantization, *extra, *SHORT))
    assert RunConfig.read(tmp_path).arguments["model"]["quantization"] == quantization
    history = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 3 and len(set(losses)) > 1
    trained = load_trained(tmp_path)
    base_layers = {type(m).__name__ for m in trained.model.llm.modules()}
    assert layer in base_layers
    batch, logits = read_reference_outputs(tmp_path / REFERENCE_FILE)
    with torch.no_grad():
        torch.testing.assert_close(trained.model(**batch).logits.float(), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--quantization", "3bit"], r"--quantization must be one of \['none', '4bit', '8bit'\]"),
    (["--quantization", "4bit", "--merge_checkpoint_lora", "true", "--projector_checkpoint", "x.pth"],
     "a quantized LLM"),
])
def test_bad_quantization_options_are_refused(tiny, tmp_path, extra, message):
    out = tmp_path / "run"
    with pytest.raises((ValueError, SystemExit), match=message):
        finetune.main(on_tiny(tiny, "--output_dir", str(out), *extra, *SHORT))
    assert not out.exists()
