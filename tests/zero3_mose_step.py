"""One rank of DeepSpeed ZeRO-3 on CPU with every parameter partitioned (gathered by hooks for forward and backward):
MoSE's loss and gradients, with the tokens grouped by expert and with every expert on every token, equal those of
the same model trained without DeepSpeed, also after a step. Run by ``test_mose_peft.py`` in its own process
(DeepSpeed initialises torch.distributed); prints ``ok``."""

from __future__ import annotations

import copy
import os

import deepspeed
import torch
from peft import get_peft_model

from conftest import layout, make_tiny_llama, random_tokens
from expert_paths import expert_path
from peft_mose import MoSEConfig

LR = 0.1


def main() -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    deepspeed.init_distributed(dist_backend="gloo")
    model = get_peft_model(make_tiny_llama(), MoSEConfig(r=8, n_experts=2, init_weights=False, lora_dropout=0.0))
    plain = copy.deepcopy(model)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**6,
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=LR), config=config)
    q_proj = engine.module.base_model.model.model.layers[0].self_attn.q_proj
    ids, mods = random_tokens(), layout()
    for grouped in (True, False):
        with expert_path(grouped):
            loss = engine(input_ids=ids, modality_ids=mods, labels=ids).loss
            engine.backward(loss)
            expected = plain(input_ids=ids, modality_ids=mods, labels=ids).loss
            expected.backward()
        assert q_proj.mose_A["default"].numel() == 0, "ZeRO-3 did not partition the MoSE parameters"
        torch.testing.assert_close(loss, expected)
        for (name, p), q in zip(engine.module.named_parameters(), plain.parameters()):
            if q.requires_grad:
                full_grad = deepspeed.utils.safe_get_full_grad(p)
                torch.testing.assert_close(full_grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
        engine.step()
        with torch.no_grad():
            for q in plain.parameters():
                if q.requires_grad:
                    q -= LR * q.grad
                    q.grad = None
    print("ok")


if __name__ == "__main__":
    main()
