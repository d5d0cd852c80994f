"""The Emotion-LLaMA wrapper as TRL's ``DPOTrainer`` calls it, and the reference it compares against.

``DPOTrainer`` scores sequences through TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, applied by the
trainer to any model that is not a bare ``PeftModel``): ``model(**batch, labels=labels, fused_lm_head=True)`` runs
``model.base_model(**batch)`` (the transformers convention: the backbone, returning ``last_hidden_state``) and
projects only the labelled positions through ``model.get_output_embeddings()``. :class:`PreferenceEmotionLlama`
gives the wrapper that contract: its ``base_model`` builds the embeddings from the batch's features and runs the
PEFT model's own forward, so ``modality_ids`` enter MoSE the public way (one modality context per call) in every
pass, policy and reference, chosen and rejected rows alike. Checked with TRL 1.16.0 (the fused head's backbone is
``base_model`` for a model whose text config is its config); ``tests/test_recipe_dpo.py`` fails if that changes.

The reference (:func:`reference_model`) is the starting point, frozen:

- from scratch (a fresh adapter, whose ``B`` is zero): the same LLM with the adapter disabled (TRL's convention for
  PEFT), plus a frozen copy of the starting projectors. The projectors train with the adapter, so a reference that
  shared them would move with the policy; the copy keeps it equal to the starting model.
- from a trained run (``--init_from``): the adapter-disabled LLM is not the starting model (the run's adapter is
  part of it), so the reference is a frozen copy of the whole starting model, the LLM included (memory: one more
  copy of the frozen LLM; TRL copies the adapter into a second one for the same reason).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

from torch import nn
from transformers import GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..emotion_llama.model import EmotionLlama
from ..emotion_llama.projectors import EmotionLlamaProjectors


class PreferenceEmotionLlama(EmotionLlama):
    """:class:`~mosear_recipes.emotion_llama.model.EmotionLlama` with the backbone contract of TRL's fused LM head
    (above). ``adapter_disabled``: every pass runs with the PEFT adapter disabled (the reference of a fresh
    adapter)."""

    def __init__(
        self, llm: nn.Module, projectors: EmotionLlamaProjectors, pad_token_id: int, adapter_disabled: bool = False
    ) -> None:
        super().__init__(llm, projectors, pad_token_id)
        self.adapter_disabled = adapter_disabled

    @property
    def generation_config(self) -> GenerationConfig:
        """The LLM's generation config (``DPOTrainer`` writes the pad token there)."""
        return self.llm.generation_config

    def get_output_embeddings(self) -> nn.Module:
        """The LLM's LM head, which TRL's fused head projects the backbone's states through."""
        return self.llm.get_output_embeddings()

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Tag the LLM (TRL tags the models it trains; the tags go into a saved model card)."""
        self.llm.add_model_tags(tags)

    # TRL 1.16 turns activation checkpointing off around the reference pass under transformers' old names; the LLM
    # is asked under the new ones where it has them (transformers >= 5.23), which do not warn.
    def _checkpointing(self, new: str, old: str) -> Any:
        return getattr(self.llm, new if hasattr(self.llm.get_base_model(), new) else old)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the LLM checkpoints activations."""
        return self._checkpointing("is_activation_checkpointing", "is_gradient_checkpointing")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Enable activation checkpointing in the LLM (Trainer and TRL pass the options positionally)."""
        self._checkpointing("activation_checkpointing_enable", "gradient_checkpointing_enable")(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Disable activation checkpointing in the LLM."""
        self._checkpointing("activation_checkpointing_disable", "gradient_checkpointing_disable")()

    def adapter_context(self) -> contextlib.AbstractContextManager:
        """The adapter disabled for a reference of a fresh adapter, else nothing."""
        return self.llm.disable_adapter() if self.adapter_disabled else contextlib.nullcontext()

    def base_model(self, use_cache: bool | None = None, **batch: Any) -> BaseModelOutputWithPast:
        """The backbone's output for a collated batch: the decoder's ``last_hidden_state`` (after its final norm),
        from one forward of the PEFT model with ``modality_ids``, so that MoSE sees them; the LM head runs on the
        last position only (``logits_to_keep=1``), TRL's fused head scores the rest."""
        inputs = self.build_inputs({k: v for k, v in batch.items() if k != "labels"})
        captured: list[BaseModelOutputWithPast] = []
        decoder = self.llm.get_base_model().get_decoder()
        handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            with self.adapter_context():
                self.llm(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"The decoder ran {len(captured)} times in one forward; expected once.")
        return captured[0]

    def forward(self, batch: Any = None, num_items_in_batch: Any = None, **batch_items: Any):
        """The wrapper's forward (logits), with the adapter disabled for a fresh adapter's reference."""
        with self.adapter_context():
            return super().forward(batch, num_items_in_batch, **batch_items)


def frozen(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter frozen, in eval mode."""
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin.eval()


def reference_model(policy: PreferenceEmotionLlama, fresh_adapter: bool) -> PreferenceEmotionLlama:
    """The frozen starting point of ``policy`` (call before training; see the module's docstring): the shared LLM
    with the adapter disabled and copied projectors when ``fresh_adapter``, else a copy of the whole model."""
    if fresh_adapter:
        moved = [name for name, p in policy.llm.named_parameters() if ".mose_B." in name and bool(p.any())]
        if moved:
            raise ValueError(
                f"The adapter is not fresh ({moved[0]} is not zero): with it disabled the reference would not be the "
                "starting model. Start from a run with --init_from, whose reference is a copy of the whole model."
            )
        return PreferenceEmotionLlama(policy.llm, frozen(policy.projectors), policy.pad_token_id, adapter_disabled=True)
    return PreferenceEmotionLlama(frozen(policy.llm), frozen(policy.projectors), policy.pad_token_id)
