"""Per-layer attention statistics of the first response token (paper section 4, Fig. 3(a)-(b)), as data.

The attention backend fills a :class:`ReallocationDiagnostics` when :func:`~.backend.attention_reallocation` runs
with ``record=True``: for every layer, the attention row of each sample's last prompt position (the row that
produces the first response token) before and after the intervention.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .functional import layer_ratio, modality_mass, unimodal_attention_proportion


@dataclass
class LayerDiagnostics:
    """One layer's statistics, one entry per sample (NaN for a sample without a prompt row in the call)."""

    layer: int
    uap_visual: Tensor
    """UAP_v (Eq. 1) before the intervention, ``[batch]``."""
    uap_audio: Tensor
    """UAP_a (Eq. 1) before the intervention, ``[batch]``."""
    uap_visual_after: Tensor
    uap_audio_after: Tensor
    layer_ratio: Tensor
    """c (Eq. 6) before the intervention, ``[batch]``."""
    heads_changed: Tensor
    """Number of heads whose weights changed (for AR: |H_bias| of Eq. 7), ``[batch]``."""
    mass_moved: Tensor
    """Visual mass gained, averaged over heads (for AR: mean of Δ_h, Eq. 14) = ``uap_visual_after - uap_visual``."""
    token_weights: Tensor
    """Attention weight of every key position, averaged over heads, ``[batch, k_len]``."""
    token_weights_after: Tensor


@dataclass
class ReallocationDiagnostics:
    """Statistics of every recorded layer (:attr:`layers`, keyed by layer index) and the key layout they refer to."""

    settings: dict[str, Any]
    layers: dict[int, LayerDiagnostics] = field(default_factory=dict)
    modality_ids: Tensor | None = None
    """Modality of every key position, ``[batch, k_len]`` (padding included; see :attr:`valid`)."""
    valid: Tensor | None = None

    def record(
        self, layer: int, before: Tensor, after: Tensor, visual_mask: Tensor, audio_mask: Tensor, present: Tensor,
        modality_ids: Tensor, valid: Tensor,
    ) -> None:
        """Store one layer from the weights ``[batch, heads, k_len]`` of the recorded row before and after."""
        nan = torch.tensor(math.nan)
        keep = present.cpu()

        def per_sample(value: Tensor) -> Tensor:
            return torch.where(keep.view(-1, *[1] * (value.dim() - 1)), value.detach().float().cpu(), nan)

        uap_v, uap_a = (x[:, 0] for x in unimodal_attention_proportion(before[:, :, None], visual_mask, audio_mask))
        uap_v2, uap_a2 = (x[:, 0] for x in unimodal_attention_proportion(after[:, :, None], visual_mask, audio_mask))
        visual_mass, audio_mass = modality_mass(before[:, :, None], visual_mask, audio_mask)
        self.layers[layer] = LayerDiagnostics(
            layer=layer,
            uap_visual=per_sample(uap_v),
            uap_audio=per_sample(uap_a),
            uap_visual_after=per_sample(uap_v2),
            uap_audio_after=per_sample(uap_a2),
            layer_ratio=per_sample(layer_ratio(visual_mass, audio_mass)[:, 0, 0]),
            heads_changed=per_sample(after.ne(before).any(-1).sum(-1)),
            mass_moved=per_sample(uap_v2 - uap_v),
            token_weights=per_sample(before.mean(1)),
            token_weights_after=per_sample(after.mean(1)),
        )
        self.modality_ids = modality_ids.cpu()
        self.valid = valid.cpu()

    def stacked(self, name: str) -> Tensor:
        """One per-sample statistic of every recorded layer, in layer order: ``[layers, batch]`` (or ``[..., k]``)."""
        if name not in {f.name for f in fields(LayerDiagnostics)} - {"layer"}:
            raise ValueError(f"Unknown statistic {name!r}; expected a field of LayerDiagnostics.")
        if not self.layers:
            raise ValueError("No layer was recorded: run a forward or generate inside the block with record=True.")
        return torch.stack([getattr(self.layers[i], name) for i in sorted(self.layers)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy: nested lists, NaN as ``None``."""

        def plain(value: Any) -> Any:
            if isinstance(value, Tensor):
                return plain(value.tolist())
            if isinstance(value, list):
                return [plain(v) for v in value]
            if isinstance(value, float) and not math.isfinite(value):
                return None if math.isnan(value) else str(value)
            return value

        return {
            "settings": plain(self.settings),
            "modality_ids": plain(self.modality_ids),
            "valid": plain(self.valid),
            "layers": [
                {f.name: plain(getattr(self.layers[i], f.name)) for f in fields(LayerDiagnostics)}
                for i in sorted(self.layers)
            ],
        }

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path
