"""`MoSELayer`: a frozen linear layer plus the three modality experts of every MoSE adapter on it."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import MoSEConfig
from .context import AdapterKey, ContextScope, ModalityContext
from .experts import (
    EXPERTS,
    ONLY_EXPERT,
    TokenGroup,
    autocast_on,
    mose_delta,
    token_groups,
    uniform_delta,
    uniform_weights,
)
from .memos import CallMemo
from .modality import Modality
from .positions import ForwardPositions
from .router import ModalityRouter, pool_modalities, routing_weight

MERGE_ERROR = (
    "MoSE adapters cannot be merged into the base weights: each token mixes its experts with its own weights "
    "(softmax(W x) over the B matrices, Eq. 2) and with a per-sample, per-modality router weight (Eq. 3-4), so the "
    "update is not one static matrix. Keep the adapter unmerged, or use `unload()` to get the base model back."
)


class TokenMasks(NamedTuple):
    """Which experts each token of one forward uses (``[batch, seq]``-shaped), for one pair of expert modality sets."""

    visual: torch.Tensor
    """1 for tokens of the visual expert, float."""
    nonvisual: torch.Tensor
    tokens: torch.Tensor
    """``[batch, seq, 3]``: the tokens each expert processes (visual, non-visual, omni: every real token)."""
    groups: tuple[TokenGroup, ...]
    """The tokens grouped by the experts they run (:func:`~peft_mose.experts.token_groups`)."""
    pool: torch.Tensor
    """``[batch, 2, seq]``: the router's averaging weights over the visual and non-visual prompt tokens (Eq. 3)."""


class _ForwardMasks(dict):
    """Per-forward memo: :class:`TokenMasks` by ``(visual ids, non-visual ids)``, shared by the layers of a forward."""


class UniformPlan(NamedTuple):
    """What a decode step whose new tokens all run the same experts needs, made once per call and layer: the
    experts' weights side by side (:func:`~peft_mose.experts.uniform_weights`), each sample's expert weights."""

    A: torch.Tensor
    B: torch.Tensor
    gate: torch.Tensor | None
    coef: torch.Tensor
    experts: tuple[int, ...]


@dataclass
class RoutingMemo(CallMemo):
    """MoSE's per-call memo, by ``(layer name, adapter name)``: the prompt's router weight ``lambda`` (Eq. 3, made at
    prefill, read by decode steps and carried with the cache), the experts' mean token gates of the call's last forward
    (made when the call closes, so that decode steps do not pay for them) and the uniform decode plans."""

    router_weights: dict[AdapterKey, torch.Tensor] = field(default_factory=dict)
    expert_weights: dict[AdapterKey, Callable[[], torch.Tensor] | torch.Tensor] = field(default_factory=dict)
    uniform_plans: dict[AdapterKey, UniformPlan | None] = field(default_factory=dict)

    def carried(self) -> RoutingMemo:
        return RoutingMemo(dict(self.router_weights))

    def closed(self) -> RoutingMemo:
        return RoutingMemo(dict(self.router_weights), {key: mean() for key, mean in self.expert_weights.items()})


class MoSELayer(BaseTunerLayer):
    """The adapter state of one targeted layer: per adapter, ``A [3, r, in]``, ``B [out, 3, N, r]``, token gates
    ``[3, N, in]`` (absent for ``N = 1``) and the router ``f``. The Table 6 ablations: ``A [3, N, r, in]``
    (symmetric), one expert of ``N`` LoRAs and no router (MoAE), no router (``router=False``)."""

    adapter_layer_names = ("mose_A", "mose_B", "mose_gate", "mose_router")
    other_param_names = (
        "r", "lora_alpha", "scaling", "n_experts", "eps", "expert_ids", "expert_kind", "mose_variant", "mose_dropout"
    )

    def __init__(self, base_layer: nn.Module, scope: Optional[ContextScope], layer_name: str) -> None:
        self.base_layer = base_layer
        self.mose_A = nn.ParameterDict({})
        self.mose_B = nn.ParameterDict({})
        self.mose_gate = nn.ParameterDict({})
        self.mose_router = nn.ModuleDict({})
        self.mose_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.n_experts: dict[str, int] = {}
        self.eps: dict[str, float] = {}
        self.expert_ids: dict[str, tuple[frozenset[int], frozenset[int]]] = {}
        self.expert_kind: dict[str, str] = {}
        self.mose_variant: dict[str, _Variant] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.scope = scope
        self.layer_name = layer_name
        self.in_features, self.out_features = _layer_dims(base_layer, layer_name)

    def update_layer(self, adapter_name: str, config: MoSEConfig) -> None:
        """Create (or re-create) the parameters of ``adapter_name`` from ``config``."""
        r, n, d_in, d_out = config.r, config.n_experts, self.in_features, self.out_features
        device = _base_device(self.get_base_layer())
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.n_experts[adapter_name] = n
        self.eps[adapter_name] = config.eps
        self.expert_ids[adapter_name] = config.expert_modalities()
        self.expert_kind[adapter_name] = kind = config.expert_kind
        self.mose_variant[adapter_name] = _MIXTURE_OF_LORAS if kind == "moae" else _MODALITY_EXPERTS
        self.mose_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        experts = 1 if kind == "moae" else len(EXPERTS)
        a_shape = (experts, r, d_in) if kind == "asymmetric" else (experts, n, r, d_in)
        self.mose_A[adapter_name] = nn.Parameter(torch.empty(a_shape, device=device))
        self.mose_B[adapter_name] = nn.Parameter(torch.empty(d_out, experts, n, r, device=device))
        for stale in (self.mose_gate, self.mose_router):  # a re-created adapter may have had a gate or router
            if adapter_name in stale:
                del stale[adapter_name]
        if n > 1:
            self.mose_gate[adapter_name] = nn.Parameter(torch.empty(experts, n, d_in, device=device))
        if config.router and kind != "moae":
            self.mose_router[adapter_name] = ModalityRouter(
                d_in, config.router_hidden_size, zero_init_output=config.init_weights, device=device
            )
        self.reset_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """``A`` and the gates like ``nn.Linear`` weights (LoRA's ``A`` init); ``B = 0`` unless ``init_weights`` is
        False. Random gates break the symmetry between the ``B_i`` of an expert."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.mose_A[adapter_name].uniform_(-bound, bound)
        if adapter_name in self.mose_gate:
            self.mose_gate[adapter_name].uniform_(-bound, bound)
        if init_weights:
            self.mose_B[adapter_name].zero_()
        else:
            self.mose_B[adapter_name].uniform_(-1.0 / math.sqrt(self.r[adapter_name]), 1.0 / math.sqrt(self.r[adapter_name]))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        raise ValueError(MERGE_ERROR)

    def _token_masks(self, positions: ForwardPositions | None, adapter_name: str, batch: int, seq: int, device) -> TokenMasks:
        """Per-token expert indicators, the tokens grouped by the experts they use and the router's pooling
        weights; once per forward (memoised with the forward's positions) and expert modality sets."""
        visual, nonvisual = self.expert_ids[adapter_name]
        if positions is None:
            ids = torch.full((batch, seq), int(Modality.TEXT), dtype=torch.long, device=device)
            valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
        else:
            if positions.batch_size != batch or positions.new_length != seq:
                raise ValueError(
                    f"MoSE layer '{self.layer_name}' received input of batch {batch} and length {seq}, but the model "
                    f"call has batch {positions.batch_size} and {positions.new_length} new tokens. MoSE targets must "
                    "be layers that process the model's token sequence (not e.g. a vision tower or cross-attention "
                    "inputs)."
                )
            memo = positions.memos.get(_ForwardMasks)
            if (visual, nonvisual) in memo:
                return memo[(visual, nonvisual)]
            ids, valid = positions.new(positions.modality_ids), positions.new(positions.valid)
        is_visual = _isin(ids, visual)
        is_nonvisual = _isin(ids, nonvisual)
        prompt = valid & (ids != int(Modality.ANSWER))
        pool = torch.stack([is_visual & prompt, is_nonvisual & prompt], dim=1).float()
        pool = pool / pool.sum(-1, keepdim=True).clamp_min(1.0)
        masks = TokenMasks(
            visual=is_visual.float(),
            nonvisual=is_nonvisual.float(),
            tokens=torch.stack([is_visual & valid, is_nonvisual & valid, valid], dim=-1).float(),
            groups=token_groups(is_visual, is_nonvisual),
            pool=pool,
        )
        if positions is not None:
            positions.memos.get(_ForwardMasks)[(visual, nonvisual)] = masks
        return masks

    def _routing_lambda(
        self, adapter_name: str, x: torch.Tensor, masks: TokenMasks | None, context: ModalityContext | None
    ) -> torch.Tensor:
        """Eq. 3 on this call's prompt; a forward that continues a cached prompt reuses the prompt's weight."""
        key = (self.layer_name, adapter_name)
        routing = None if context is None else context.memos.get(RoutingMemo)
        if adapter_name not in self.mose_router:  # router=False: the experts averaged (Table 6, row c)
            lam = x.new_full((x.shape[0],), 0.5)
            if routing is not None:
                routing.router_weights[key] = lam
            return lam
        if context is None or context.forward is None or context.forward.prefill:
            pooled = pool_modalities(x, masks.pool)
            lam = routing_weight(self.mose_router[adapter_name], pooled, self.eps[adapter_name])
            if routing is not None:
                routing.router_weights[key] = lam.detach()
            return lam
        lam = routing.router_weights.get(key)
        if lam is None or lam.shape[0] != x.shape[0]:
            raise ValueError(
                f"MoSE layer '{self.layer_name}': this call continues a KV cache ({context.forward.past_length} cached "
                f"positions, batch {x.shape[0]}) whose prompt did not run through this MoSE model, so the prompt's "
                "router weight is unknown. Run the prompt through the model first (generate does) and pass its cache "
                "back, or pass the whole sequence without a cache."
            )
        return lam.to(x.dtype)

    def _dropout(self, adapter_name: str, x: torch.Tensor, x_cast: torch.Tensor) -> torch.Tensor:
        dropout = self.mose_dropout[adapter_name]
        return x if isinstance(dropout, nn.Identity) or not dropout.training else dropout(x_cast)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        active = [name for name in self.active_adapters if name in self.mose_A]
        if not active:
            return result
        context = self.scope.current() if self.scope is not None else None
        # any input [..., features]: the first dim is the batch, the others are tokens (a 1-D input is one token);
        # with a context the input is the model's [batch, seq, features]
        reshaped = context is None or context.forward is None
        if reshaped:
            x = x.reshape(1 if x.dim() < 2 else x.shape[0], -1, x.shape[-1])
        for name in active:
            delta = self.mose_variant[name].delta(self, name, x, context)
            if reshaped:
                delta = delta.reshape(result.shape)
            result = result + (delta if delta.dtype == result.dtype else delta.to(result.dtype))
        return result

    def __repr__(self) -> str:
        return "mose." + super().__repr__()


class MoSELinear(nn.Module, MoSELayer):
    """MoSE around a ``torch.nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: MoSEConfig,
        scope: Optional[ContextScope] = None,
        layer_name: str = "",
    ) -> None:
        super().__init__()
        MoSELayer.__init__(self, base_layer, scope, layer_name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    forward = MoSELayer.forward


class _ModalityExperts:
    """MoSE's three experts (Eq. 2-4; symmetric or asymmetric by the shape of ``A``): a decode step whose new tokens
    all run the same experts takes :func:`~peft_mose.experts.uniform_delta`, any other forward
    :func:`~peft_mose.experts.mose_delta` over the tokens grouped by expert."""

    def delta(self, layer: MoSELayer, name: str, x: torch.Tensor, context: ModalityContext | None) -> torch.Tensor:
        positions = None if context is None else context.forward
        plan = self._uniform_plan(layer, name, x, positions, context)
        if plan is not None:
            x_a = layer._cast_input_dtype(x, plan.A.dtype)
            delta, gates = uniform_delta(layer._dropout(name, x_a, x_a), plan.A, plan.B, plan.gate, plan.coef)
            mean = functools.partial(_uniform_mean_gates, gates, plan.experts)
            context.memos.get(RoutingMemo).expert_weights[(layer.layer_name, name)] = mean
            return delta
        A = layer.mose_A[name]
        x_a = layer._cast_input_dtype(x, A.dtype)
        masks = layer._token_masks(positions, name, x.shape[0], x.shape[1], x.device)
        lam = layer._routing_lambda(name, x_a, masks, context)
        coef = torch.stack(
            [lam[:, None] * masks.visual, (1 - lam[:, None]) * masks.nonvisual, torch.ones_like(masks.visual)], dim=-1
        ) * layer.scaling[name]
        # without dropout the experts get `x` itself and cast it: backward keeps no copy in A's dtype
        x_d = layer._dropout(name, x, x_a)
        gate = layer.mose_gate[name] if name in layer.mose_gate else None
        delta, gates = mose_delta(x_d, A, layer.mose_B[name], gate, coef.to(A.dtype), masks.groups)
        if context is not None:
            mean = functools.partial(_mean_gates, gates, masks.tokens)
            context.memos.get(RoutingMemo).expert_weights[(layer.layer_name, name)] = mean
        return delta

    @staticmethod
    def _uniform_plan(
        layer: MoSELayer, name: str, x: torch.Tensor, positions: ForwardPositions | None,
        context: ModalityContext | None,
    ) -> UniformPlan | None:
        """The plan of a decode step whose new tokens all have one modality (known from the cache, no data read),
        made once per call; ``None`` for the general path: other forwards, visual + omni (not neighbours), autocast."""
        if positions is None or positions.prefill or positions.uniform is None:
            return None
        plans, key = context.memos.get(RoutingMemo).uniform_plans, (layer.layer_name, name)
        if key in plans:
            return plans[key]
        visual, nonvisual = layer.expert_ids[name]
        modality = int(positions.uniform)
        A, B = layer.mose_A[name], layer.mose_B[name]
        if modality in visual or autocast_on(A.device.type):
            plans[key] = None
            return None
        experts = (1, 2) if modality in nonvisual else (2,)
        lam = layer._routing_lambda(name, x, None, context).to(A.dtype)
        weights = (1 - lam, torch.ones_like(lam)) if experts == (1, 2) else (torch.ones_like(lam),)
        coef = (torch.stack(weights, dim=1) * layer.scaling[name])[:, None, :, None]
        plans[key] = plan = UniformPlan(*uniform_weights(A, B, layer.mose_gate.get(name), experts), coef, experts)
        return plan


class _MixtureOfLoRAs:
    """Table 6 row a (MoAE): ``N`` independent LoRAs mixed by ``softmax(W x)`` on every token, whatever its
    modality; no modality experts, no router."""

    def delta(self, layer: MoSELayer, name: str, x: torch.Tensor, context: ModalityContext | None) -> torch.Tensor:
        A = layer.mose_A[name]
        coef = x.new_full((*x.shape[:-1], 1), layer.scaling[name], dtype=A.dtype)
        gate = layer.mose_gate[name] if name in layer.mose_gate else None
        x_d = layer._dropout(name, x, layer._cast_input_dtype(x, A.dtype))
        delta, gates = mose_delta(x_d, A, layer.mose_B[name], gate, coef, ONLY_EXPERT)
        if context is not None:
            mean = functools.partial(_mean_gates, gates, torch.ones_like(coef))
            context.memos.get(RoutingMemo).expert_weights[(layer.layer_name, name)] = mean
        return delta


_Variant = _ModalityExperts | _MixtureOfLoRAs
_MODALITY_EXPERTS, _MIXTURE_OF_LORAS = _ModalityExperts(), _MixtureOfLoRAs()


@torch.no_grad()
def _mean_gates(gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each expert's mean gate weights over the tokens it processes, ``[batch, 3, N]`` (routing statistics)."""
    counts = tokens.sum(1).clamp_min(1.0)
    return (tokens.to(gates.dtype).unsqueeze(-1) * gates).sum(1) / counts[..., None].to(gates.dtype)


@torch.no_grad()
def _uniform_mean_gates(gates: torch.Tensor, experts: tuple[int, ...]) -> torch.Tensor:
    """:func:`_mean_gates` of a uniform step: the unused experts processed no token (zeros)."""
    means = gates.new_zeros(gates.shape[0], len(EXPERTS), gates.shape[-1])
    means[:, list(experts)] = gates.mean(1)
    return means



def _isin(ids: torch.Tensor, values: frozenset[int]) -> torch.Tensor:
    return torch.isin(ids, torch.tensor(sorted(values), dtype=ids.dtype, device=ids.device))


def _layer_dims(layer: nn.Module, name: str) -> tuple[int, int]:
    """``(in_features, out_features)``, also for ZeRO-3 partitioned weights (``ds_shape``) and quantized ``nn.Linear``
    subclasses (bitsandbytes, whose packed weight has another shape; torchao's weight subclasses)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        shape = getattr(layer.weight, "ds_shape", None) or layer.weight.shape
        return int(shape[0]), int(shape[1])
    raise ValueError(
        f"MoSE can adapt torch.nn.Linear and transformers Conv1D layers, got {type(layer).__name__} at '{name}'. "
        "Quantized bases work when their layers stay nn.Linear: bitsandbytes 4-bit/8-bit (BitsAndBytesConfig) and "
        "torchao weight-only (TorchAoConfig); see docs/quantization.md. Choose other `target_modules`."
    )


def _base_device(layer: nn.Module) -> torch.device:
    weight = getattr(layer, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
