"""Per-layer attention statistics of the response tokens, step by step (paper section 4, Fig. 3(a)-(b)), as data.

The attention backend fills a :class:`ReallocationDiagnostics` when :func:`~.backend.attention_reallocation` runs
with ``record=True``: for every generated step and layer, the attention row that produces that step's token, before
and after the intervention. Step 0 is the row of each sample's last prompt position (it produces the first response
token); step k >= 1 the row of generated token k - 1 (it produces generated token k). Eq. 1 is defined at the first
response token that expresses the emotion, y_k, so the step to look at depends on the generated text
(:func:`~.plot.emotion_word_steps`); ``layers``, ``stacked`` and ``modality_ids`` without a step are step 0's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..modality import Modality
from .json_data import to_plain
from .functional import compute_dtype, layer_ratio, modality_mass, unimodal_attention_proportion

if TYPE_CHECKING:
    from .gate import GateDecisions


@dataclass
class LayerDiagnostics:
    """One layer's statistics at one step, one entry per sample (NaN for a sample without that step's row)."""

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


_STATISTICS = tuple(f.name for f in fields(LayerDiagnostics) if f.name != "layer")


@dataclass
class StepDiagnostics:
    """The statistics of one step (or of one step per sample, :meth:`ReallocationDiagnostics.select_steps`) for
    every recorded layer (:attr:`layers`, keyed by layer index), and the keys they refer to."""

    layers: dict[int, LayerDiagnostics] = field(default_factory=dict)
    modality_ids: Tensor | None = None
    """Modality of every key position, ``[batch, k_len]``."""
    valid: Tensor | None = None
    """The keys the recorded row can attend to, ``[batch, k_len]``: no padding, nothing after the row."""

    def stacked(self, name: str) -> Tensor:
        """One per-sample statistic of every recorded layer, in layer order: ``[layers, batch]`` (or ``[..., k]``)."""
        if name not in _STATISTICS:
            raise ValueError(f"Unknown statistic {name!r}; expected a field of LayerDiagnostics.")
        if not self.layers:
            raise ValueError("No layer was recorded: run a forward or generate inside the block with record=True.")
        return torch.stack([getattr(self.layers[i], name) for i in sorted(self.layers)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy: nested lists, NaN as ``None``."""
        return {
            "modality_ids": to_plain(self.modality_ids),
            "valid": to_plain(self.valid),
            "layers": [
                {f.name: to_plain(getattr(self.layers[i], f.name)) for f in fields(LayerDiagnostics)}
                for i in sorted(self.layers)
            ],
        }


@dataclass
class ReallocationDiagnostics:
    """Statistics of every recorded step (:attr:`steps`, keyed by step, then by layer) and the settings they ran
    under; the first-token view (:attr:`layers`, :attr:`modality_ids`, :attr:`valid`, :meth:`stacked`) is step 0."""

    settings: dict[str, Any]
    steps: dict[int, StepDiagnostics] = field(default_factory=dict)
    generated: Tensor | None = None
    """The tokens generated while recording, ``[batch, new]`` (set by :func:`~.plot.collect_diagnostics`)."""
    gate_decisions: list[GateDecisions] = field(default_factory=list)
    """The conflict gate's decisions of each call recorded (set by :func:`~.plot.collect_diagnostics`)."""

    @property
    def layers(self) -> dict[int, LayerDiagnostics]:
        """Step 0's layers (the row producing the first response token); empty before anything is recorded."""
        return self.steps[0].layers if 0 in self.steps else {}

    @property
    def modality_ids(self) -> Tensor | None:
        """Step 0's key modalities, ``[batch, k_len]``."""
        return self.steps[0].modality_ids if 0 in self.steps else None

    @property
    def valid(self) -> Tensor | None:
        """Step 0's attendable keys, ``[batch, k_len]``."""
        return self.steps[0].valid if 0 in self.steps else None

    def step(self, step: int) -> StepDiagnostics:
        """The statistics of one recorded step; ``ValueError`` naming the recorded ones otherwise."""
        if step not in self.steps:
            raise ValueError(f"Step {step} was not recorded; recorded steps: {sorted(self.steps)}.")
        return self.steps[step]

    def stacked(self, name: str, step: int = 0) -> Tensor:
        """One per-sample statistic of every recorded layer at ``step``: ``[layers, batch]`` (or ``[..., k]``)."""
        if not self.steps:
            raise ValueError("No layer was recorded: run a forward or generate inside the block with record=True.")
        return self.step(step).stacked(name)

    def select_steps(self, steps: Sequence[int | None]) -> StepDiagnostics:
        """One step per sample (``None``: none, that sample's statistics are NaN), e.g. each sample's first emotion
        word; the keys are padded to the longest chosen step (padding is not ``valid``)."""
        sources = [None if s is None else self.step(s) for s in steps]
        chosen = [source for source in sources if source is not None]
        if not chosen:
            raise ValueError("No sample has a step to select (every entry is None).")
        batch = chosen[0].modality_ids.shape[0]
        if len(steps) != batch:
            raise ValueError(f"Give one step (or None) per sample: {batch} samples, got {len(steps)} steps.")
        k_len = max(source.modality_ids.shape[1] for source in chosen)

        def pick(get: Callable[[StepDiagnostics], Tensor], fill: bool | int | float) -> Tensor:
            """Sample b's row of ``get(its step)``, per-key rows padded to ``k_len`` with ``fill``."""
            template = get(chosen[0])[0]
            rows = [torch.full_like(template, fill) if s is None else get(s)[b] for b, s in enumerate(sources)]
            if template.dim():
                rows = [torch.cat([row, row.new_full((k_len - row.shape[0],), fill)]) for row in rows]
            return torch.stack(rows)

        result = StepDiagnostics(
            modality_ids=pick(lambda s: s.modality_ids, int(Modality.TEXT)), valid=pick(lambda s: s.valid, False)
        )
        for layer in sorted(set.intersection(*(set(source.layers) for source in chosen))):
            values = {name: pick(lambda s, n=name: getattr(s.layers[layer], n), math.nan) for name in _STATISTICS}
            result.layers[layer] = LayerDiagnostics(layer=layer, **values)
        return result

    def record(
        self, layer: int, before: Tensor, after: Tensor, positions: Tensor, present: Tensor, visual_mask: Tensor,
        audio_mask: Tensor, modality_ids: Tensor, valid: Tensor,
    ) -> None:
        """Store one layer of one forward from the weights ``[batch, heads, rows, k_len]`` of its response rows
        before and after: the rows at key positions ``positions`` ``[batch, rows]`` where ``present``. A row's step
        is the number of answer positions up to it (0 for the last prompt position)."""
        answers = ((modality_ids == int(Modality.ANSWER)) & valid).cumsum(1)
        row_steps = torch.where(present, answers.gather(1, positions), -1)
        index = torch.arange(before.shape[0], device=before.device)
        keys = torch.arange(valid.shape[1], device=valid.device)
        for step in sorted(set(row_steps[present].tolist())):
            chosen = row_steps == step
            have, column = chosen.any(1), chosen.to(torch.uint8).argmax(1)
            entry = self.steps.setdefault(step, StepDiagnostics())
            entry.layers[layer] = _layer_statistics(
                layer, before[index, :, column], after[index, :, column], visual_mask, audio_mask, have
            )
            entry.modality_ids = modality_ids.cpu()
            entry.valid = (valid & (keys <= positions[index, column, None]) & have[:, None]).cpu()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy: nested lists, NaN as ``None``. The top-level ``modality_ids``, ``valid`` and
        ``layers`` are step 0's; ``steps`` lists every recorded step."""
        first = self.steps[0].to_dict() if 0 in self.steps else {"modality_ids": None, "valid": None, "layers": []}
        return {
            "settings": to_plain(self.settings),
            **first,
            "generated": to_plain(self.generated),
            "gate_decisions": [decisions.to_dict() for decisions in self.gate_decisions],
            "steps": [{"step": s, **self.steps[s].to_dict()} for s in sorted(self.steps)],
        }

    def save_json(self, path: str | Path, **extra: Any) -> Path:
        """Write :meth:`to_dict` (plus the top-level entries ``extra``, e.g. which steps a plot shows) to ``path``."""
        path = Path(path)
        path.write_text(json.dumps({**self.to_dict(), **to_plain(extra)}, indent=1))
        return path


def _layer_statistics(
    layer: int, before: Tensor, after: Tensor, visual_mask: Tensor, audio_mask: Tensor, present: Tensor
) -> LayerDiagnostics:
    """One layer's statistics from the weights ``[batch, heads, k_len]`` of one row per sample (NaN where not
    ``present``), on the CPU, in the dtype the row was computed in."""
    nan = torch.tensor(math.nan)
    keep = present.cpu()

    def per_sample(value: Tensor) -> Tensor:
        value = value.detach().to(compute_dtype(value.dtype)).cpu()
        return torch.where(keep.view(-1, *[1] * (value.dim() - 1)), value, nan.to(value.dtype))

    uap_v, uap_a = (x[:, 0] for x in unimodal_attention_proportion(before[:, :, None], visual_mask, audio_mask))
    uap_v2, uap_a2 = (x[:, 0] for x in unimodal_attention_proportion(after[:, :, None], visual_mask, audio_mask))
    visual_mass, audio_mass = modality_mass(before[:, :, None], visual_mask, audio_mask)
    return LayerDiagnostics(
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
