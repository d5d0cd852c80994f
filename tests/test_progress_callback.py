"""`TrainingProgressCallback` (recipes/mosear_recipes/progress.py): silent on a run that trains, stops a run that
trains nothing and names the cause (the bitsandbytes CPU repacking, no gradient, no change)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from conftest import make_tiny_llama, random_tokens
from mosear_recipes.progress import TrainingProgressCallback, TrainingProgressError
from peft_mose import MoSEConfig
from quantized_models import load_quantized

CONFIG = MoSEConfig(r=8, n_experts=2, lora_dropout=0.0, init_weights=False)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = random_tokens(batch=8, seq=12)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(model, tmp_path, learning_rate: float = 1e-2, steps: int = 3) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=learning_rate, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[TrainingProgressCallback(steps=2)]).train()


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_silent_on_a_run_that_trains(tmp_path):
    model = get_peft_model(make_tiny_llama(), CONFIG)
    before = trainable(model)
    train(model, tmp_path)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


def test_names_the_bitsandbytes_repacking_after_a_no_grad_eval_forward(tmp_path):
    """The trap of tests/test_quantized.py on a MoSE model: stopped at step 2 on CPUs with AVX512-BF16, where it
    happens; elsewhere nothing is repacked and the run trains."""
    path = tmp_path / "ckpt"
    make_tiny_llama().save_pretrained(path)
    model = get_peft_model(load_quantized(path, "bnb-nf4", torch.float32), CONFIG)
    with torch.no_grad():
        model.eval()(input_ids=random_tokens())
    if bnb.functional.has_avx512bf16():
        repack = r"repacked the 4-bit weights of 14 layer.*'base_model.*layers\.0\.self_attn\.q_proj'"
        with pytest.raises(TrainingProgressError, match=repack):
            train(model, tmp_path)
    else:
        train(model, tmp_path)


def test_stops_a_run_whose_adapters_get_no_gradient(tmp_path):
    """A bug that keeps trainable adapters out of the loss (switched off in the forward, their parameters still
    trainable) while the loss still has a graph (input embeddings require grad, as with gradient checkpointing)
    trains nothing without any error."""
    model = get_peft_model(make_tiny_llama(), CONFIG)
    model.enable_input_require_grads()
    model.base_model.disable_adapter_layers()
    for name, param in model.named_parameters():
        param.requires_grad_(".mose_" in name)
    with pytest.raises(TrainingProgressError, match="received a non-zero gradient.*'base_model.*mose_A"):
        train(model, tmp_path)


def test_stops_a_run_whose_parameters_do_not_change(tmp_path):
    model = get_peft_model(make_tiny_llama(), CONFIG)
    with pytest.raises(TrainingProgressError, match="none changed.*learning rate now 0"):
        train(model, tmp_path, learning_rate=0.0)


def test_refuses_bad_arguments_and_models_without_trainable_parameters(tmp_path):
    with pytest.raises(ValueError, match="steps >= 1"):
        TrainingProgressCallback(steps=0)
    model = make_tiny_llama().requires_grad_(False)
    with pytest.raises(TrainingProgressError, match="no trainable parameter"):
        train(model, tmp_path)
