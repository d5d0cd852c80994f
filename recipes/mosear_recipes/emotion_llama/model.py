"""Emotion-LLaMA on transformers: a causal LM plus the five projectors, fed with ``inputs_embeds``."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from peft_mose import Modality, is_mose_model
from peft_mose.attention import AttentionReallocation, attention_reallocation
from peft_mose.layout import insert_embeddings, prompt_only

from .projectors import FEATURE_KEYS, EmotionLlamaProjectors

EMOTION_LLAMA_PAD_TOKEN = "$$"


def load_tokenizer(model_name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer from a local folder; without a pad token it gets Emotion-LLaMA's ``"$$"``."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_name_or_path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = EMOTION_LLAMA_PAD_TOKEN
    return tokenizer


def load_llm(
    model_name_or_path: str | Path, dtype: torch.dtype | None = None, quantization_config: Any = None
) -> PreTrainedModel:
    """Load the causal LM from a local folder (no download), quantized by ``quantization_config`` when given."""
    return AutoModelForCausalLM.from_pretrained(
        str(model_name_or_path), dtype=dtype, quantization_config=quantization_config, local_files_only=True
    )


class EmotionLlama(nn.Module):
    """Builds ``inputs_embeds``/``attention_mask``/``labels``/``modality_ids`` from a collated MERR batch and runs
    ``llm`` on them. ``llm`` is any causal LM (a plain one, a PEFT LoRA model, or a PEFT model with MoSE). The
    modality ids take the public path a user takes: the model call / ``generate`` keyword on a MoSE model, and
    :func:`~peft_mose.attention_reallocation`'s ``modality_ids`` for other models (they only matter under AR/PAI).

    Batch keys (see ``mosear_recipes.merr.collator``): ``input_ids``, ``attention_mask``, ``modality_ids``, optional
    ``labels``, and the features ``eva_patch`` [B, 256, 5632], ``eva_cls`` [B, 1408], ``face``, ``video``, ``audio``
    [B, 1024]. Other keys (sample names, tasks) are ignored.
    """

    def __init__(
        self,
        llm: nn.Module,
        projectors: EmotionLlamaProjectors,
        pad_token_id: int,
    ) -> None:
        super().__init__()
        self.llm = llm
        self.projectors = projectors
        self.pad_token_id = pad_token_id

    @property
    def takes_modality_ids(self) -> bool:
        """Whether the LLM is a PEFT model with MoSE, whose calls take ``modality_ids``."""
        return is_mose_model(self.llm)

    @property
    def config(self) -> PreTrainedConfig:
        """The LLM's configuration: HF ``Trainer`` sets ``use_cache`` there, and its DeepSpeed integration sizes the
        ``auto`` buckets from ``hidden_size``."""
        return self.llm.config

    def build_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keyword arguments for ``self.llm``: ``inputs_embeds``, ``attention_mask``, ``labels`` when the batch
        has them, and ``modality_ids`` when the LLM takes them (MoSE)."""
        missing = [k for k in ("input_ids", "attention_mask", "modality_ids", *FEATURE_KEYS) if k not in batch]
        if missing:
            raise ValueError(f"The batch lacks {missing}; it has {sorted(batch)}.")
        if "labels" in batch and batch["labels"].shape != batch["input_ids"].shape:  # else torch: "batch_size" mismatch
            raise ValueError(
                f"labels have shape {tuple(batch['labels'].shape)}, input_ids {tuple(batch['input_ids'].shape)}: a "
                "batch needs one label per token (-100 where there is none)."
            )
        modality_ids = batch["modality_ids"]
        slot_embeds = self.projectors(
            *(batch[k] for k in FEATURE_KEYS), audio_repeat=self._audio_repeat(modality_ids, batch["eva_patch"])
        )
        token_embeds = self.llm.get_input_embeddings()(batch["input_ids"])
        inputs = {
            "inputs_embeds": insert_embeddings(token_embeds, modality_ids, slot_embeds),
            "attention_mask": batch["attention_mask"],
        }
        if "labels" in batch:
            inputs["labels"] = batch["labels"]
        if self.takes_modality_ids:
            inputs["modality_ids"] = modality_ids
        return inputs

    @staticmethod
    def _audio_repeat(modality_ids: torch.Tensor, eva_patch: torch.Tensor) -> int:
        """Audio tokens per sample, read from the layout; checks that the visual token count fits the features."""
        audio = (modality_ids == Modality.AUDIO).sum(dim=1)
        visual = (modality_ids == Modality.VISUAL).sum(dim=1)
        n_visual = eva_patch.shape[1] + 3
        if bool((audio != audio[0]).any()) or int(audio[0]) < 1 or bool((visual != n_visual).any()):
            raise ValueError(
                f"Every sample needs {n_visual} VISUAL tokens ({eva_patch.shape[1]} EVA patches + face, video, CLS) "
                f"and the same number (>= 1) of AUDIO tokens; got VISUAL {visual.tolist()}, AUDIO {audio.tolist()}."
            )
        return int(audio[0])

    # HF Trainer then passes `num_items_in_batch`, which the LLM's loss uses to normalise over gradient accumulation.
    accepts_loss_kwargs = True

    def forward(
        self,
        batch: Mapping[str, torch.Tensor] | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **batch_items: torch.Tensor,
    ):
        """Run the LLM on a batch, given as a mapping (``model(batch)``) or as keywords (``model(**batch)``, as
        HF ``Trainer`` does). Returns the LLM's output (with ``loss`` when the batch has ``labels``)."""
        batch = {**(batch or {}), **batch_items}
        inputs = self.build_inputs(batch)
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        return self.llm(**inputs)

    @torch.no_grad()
    def generate(
        self,
        batch: Mapping[str, torch.Tensor],
        reallocation: Mapping[str, Any] | None = None,
        reallocation_log: list[AttentionReallocation] | None = None,
        **gen_kwargs,
    ) -> torch.Tensor:
        """Generate from the prompts of ``batch`` (its answer tokens, if any, are dropped; prompts are left padded),
        under :func:`~peft_mose.attention_reallocation` with the options ``reallocation`` (``tau``, ``strategy``,
        ``gate``, ...) when given; its :class:`~peft_mose.attention.AttentionReallocation` (diagnostics, gate
        decisions) is appended to ``reallocation_log`` when given. Returns the generated token ids only,
        [B, new_tokens]."""
        prompts = prompt_only(
            batch["input_ids"], batch["attention_mask"], batch["modality_ids"], self.pad_token_id, padding_side="left"
        )
        features = {k: batch[k] for k in FEATURE_KEYS if k in batch}
        inputs = self.build_inputs({**prompts, **features})
        gen_kwargs.setdefault("pad_token_id", self.pad_token_id)
        block: contextlib.AbstractContextManager = contextlib.nullcontext()
        if reallocation is not None:
            ids = None if self.takes_modality_ids else prompts["modality_ids"]
            block = attention_reallocation(self.llm, modality_ids=ids, **reallocation)
        with block as active:
            if reallocation_log is not None and active is not None:
                reallocation_log.append(active)
            return self.llm.generate(**inputs, **gen_kwargs)

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Enable activation (gradient) checkpointing in the LLM; HF ``Trainer`` calls this when asked to."""
        self.llm.activation_checkpointing_enable(**kwargs)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """The same under the name HF ``Trainer`` calls before transformers 5.23."""
        self.llm.gradient_checkpointing_enable(**kwargs)
