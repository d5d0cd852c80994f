"""`MoSEConfig`: the PEFT configuration of modality-specific experts (paper section 5.1)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ._compat.peft import record_saved_config
from .modality import Modality, parse_modalities


class MoSEPeftType(str, enum.Enum):
    """PEFT type key of MoSE; a `str` mixin so that PEFT can write it to JSON and compare it with strings."""

    MOSE = "MOSE"


# MoSE and the two expert designs it is compared with in the paper's Table 6 (rows b and a).
EXPERT_KINDS = ("asymmetric", "symmetric", "moae")


@dataclass
class MoSEConfig(PeftConfig):
    """Configuration of a [`MoSEModel`].

    Each targeted linear layer gets three experts (visual, non-visual, omni). Every expert is an asymmetric soft
    mixture of LoRAs: one down-projection ``A`` (``r x in``) shared by ``n_experts`` up-projections ``B_i``
    (``out x r``), mixed per token by ``softmax(W x)`` (Eq. 2). A per-sample router gives the visual expert weight
    ``lambda = 1/2 + eps * tanh(f(v_mean; n_mean))`` and the non-visual expert ``1 - lambda`` (Eq. 3, 4).

    Args:
        r (`int`): Rank of each expert's shared down-projection.
        lora_alpha (`float`): The expert outputs are scaled by ``lora_alpha / r``.
        lora_dropout (`float`): Dropout on the input of the adapter branch (experts and their token gates).
        n_experts (`int`): ``N``, the number of up-projections ``B_i`` per expert (``N >= 1``).
        eps (`float`): ``epsilon`` of Eq. 3, in ``[0, 0.5]``; ``0`` gives ``lambda = 1/2`` (plain averaging).
        router_hidden_size (`int`): Hidden width of the router MLP ``f``.
        expert_kind (`str`): ``"asymmetric"`` (MoSE), or the Table 6 ablations ``"symmetric"`` and ``"moae"``.
        router (`bool`): ``False`` drops ``f`` and fixes ``lambda = 1/2`` (Table 6, "w.o. router").
        visual_modalities (`list[str]`): Token modalities routed to the visual expert.
        nonvisual_modalities (`list[str]`): Token modalities routed to the non-visual expert.
        answer_modality (`str`): How the experts treat answer / generated tokens (never pooled by the router).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in `LoraConfig`.
        init_weights (`bool`): ``True`` starts every ``B`` at zero, so the wrapped model equals the base model.
        task_type (`str`): ``"CAUSAL_LM"`` by default; ``None`` for models that are not transformers causal LMs.
    """

    r: int = field(default=64, metadata={"help": "Rank of each expert's shared down-projection A (r x in)."})
    lora_alpha: float = field(default=16, metadata={"help": "Expert outputs are scaled by lora_alpha / r."})
    lora_dropout: float = field(
        default=0.05, metadata={"help": "Dropout probability on the adapter branch's input, in [0, 1)."}
    )
    n_experts: int = field(
        default=2, metadata={"help": "N: up-projections B_i per expert, mixed per token by softmax(W x) (Eq. 2)."}
    )
    eps: float = field(
        default=0.1,
        metadata={"help": "epsilon of Eq. 3 in [0, 0.5]: lambda = 1/2 + eps * tanh(f(v; n)) lies in [1/2-eps, 1/2+eps]."},
    )
    router_hidden_size: int = field(
        default=2,
        metadata={
            "help": (
                "Hidden width of the router MLP f: Linear(2*in -> h) -> GELU -> Linear(h -> 1). The default 2 gives "
                "about 1M router parameters on LLaMA-2-7B with q_proj/v_proj targets, the paper's Table 6 figure."
            )
        },
    )
    expert_kind: str = field(
        default="asymmetric",
        metadata={
            "help": (
                "The experts (paper Table 6): 'asymmetric' (MoSE: each expert one shared A and N B's), 'symmetric' "
                "(row b: each of the N LoRAs of an expert has its own A), 'moae' (row a: N independent LoRAs mixed "
                "per token by softmax(W x) for every token, no modality experts and no router)."
            )
        },
    )
    router: bool = field(
        default=True,
        metadata={
            "help": (
                "False: no router f, lambda = 1/2 for every sample (paper Table 6 row c, 'w.o. router': the "
                "visual and non-visual experts averaged). Ignored for expert_kind='moae', which has no router."
            )
        },
    )
    visual_modalities: list[str] = field(
        default_factory=lambda: ["visual"],
        metadata={"help": "Modalities whose tokens the visual expert processes (names or Modality values)."},
    )
    nonvisual_modalities: list[str] = field(
        default_factory=lambda: ["text", "audio"],
        metadata={
            "help": (
                "Modalities whose tokens the non-visual expert processes. The paper's text defines it as audio and "
                "text (default); Eq. 4 literally writes audio only: use ['audio'] for that reading."
            )
        },
    )
    answer_modality: str = field(
        default="text",
        metadata={
            "help": (
                "Expert routing of answer and generated tokens (Modality.ANSWER): 'text' (default, they are text) or "
                "'omni' (only the omni expert). The router never pools over them either way."
            )
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Module names (exact or suffix match) or a regex of the linear/Conv1D layers to adapt. Default: the "
                "language model's attention q/v (fused qkv where fused), as Emotion-LLaMA's LoRA; 'all-linear': "
                "every linear layer of the language model. Layers outside it (encoders, projectors) are refused."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform (e.g. 'layers')."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the MoSE layers to train and save (e.g. a projector)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: B = 0 so the wrapped model starts equal to the base model. False: random B (tests)."},
    )
    bias: Literal["none"] = field(default="none", metadata={"help": "MoSE trains no biases; only 'none' is accepted."})
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Not supported by MoSE (nn.Parameter targets); must stay None."}
    )

    task_type: Optional[str] = field(
        default="CAUSAL_LM",
        metadata={"help": "PEFT task type; CAUSAL_LM (default) gives PeftModelForCausalLM. None for custom models."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MoSEPeftType.MOSE
        _check_int(self.r, "r", 1)
        _check_int(self.n_experts, "n_experts", 1)
        _check_int(self.router_hidden_size, "router_hidden_size", 1)
        _check_range(self.eps, "eps", 0.0, 0.5, "0 <= eps <= 0.5")
        _check_range(self.lora_dropout, "lora_dropout", 0.0, 1.0, "0 <= lora_dropout < 1", upper_open=True)
        if not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` must be a finite number > 0, got {self.lora_alpha!r}.")
        self.visual_modalities = parse_modalities(self.visual_modalities, "visual_modalities")
        self.nonvisual_modalities = parse_modalities(self.nonvisual_modalities, "nonvisual_modalities")
        for name in ("visual_modalities", "nonvisual_modalities"):
            if not getattr(self, name):
                raise ValueError(f"`{name}` must name at least one modality.")
            if "answer" in getattr(self, name):
                raise ValueError(f"`{name}` cannot contain 'answer'; use `answer_modality` to route answer tokens.")
        overlap = set(self.visual_modalities) & set(self.nonvisual_modalities)
        if overlap:
            raise ValueError(
                f"`visual_modalities` and `nonvisual_modalities` must be disjoint; both contain {sorted(overlap)}."
            )
        if self.expert_kind not in EXPERT_KINDS:
            raise ValueError(f"`expert_kind` must be one of {list(EXPERT_KINDS)}, got {self.expert_kind!r}.")
        if not isinstance(self.router, bool):
            raise ValueError(f"`router` must be True or False, got {self.router!r}.")
        if self.answer_modality not in ("text", "omni"):
            raise ValueError(f"`answer_modality` must be 'text' or 'omni', got {self.answer_modality!r}.")
        if self.bias != "none":
            raise ValueError(f"`bias` must be 'none' for MoSE, got {self.bias!r}.")
        if self.target_parameters:
            raise ValueError("MoSE adapts linear layers only; `target_parameters` must be None.")
        if isinstance(self.target_modules, (list, set, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, set, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` only applies together with `layers_to_transform`.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string.")

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json``, then record its result fields in the adapter weights saved there (so an
        edit of the JSON is refused on load: ``peft_mose/checksum.py``)."""
        super().save_pretrained(save_directory, **kwargs)
        record_saved_config(save_directory)

    def expert_modalities(self) -> tuple[frozenset[int], frozenset[int]]:
        """Modality ids routed to the visual and to the non-visual expert, answer tokens resolved."""
        visual = {int(Modality[m.upper()]) for m in self.visual_modalities}
        nonvisual = {int(Modality[m.upper()]) for m in self.nonvisual_modalities}
        if self.answer_modality == "text":  # answer tokens go wherever text goes, to either expert
            for group in (visual, nonvisual):
                if int(Modality.TEXT) in group:
                    group.add(int(Modality.ANSWER))
        return frozenset(visual), frozenset(nonvisual)


def _check_int(value: object, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _check_range(value: object, name: str, lo: float, hi: float, allowed: str, upper_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and lo <= value and (value < hi if upper_open else value <= hi)
    if not ok:
        raise ValueError(f"`{name}` must satisfy {allowed}, got {value!r}.")
