"""The conflict gate of attention reallocation: which samples of a call get AR (issue #16).

MoSEAR claims that AR costs nothing on samples whose modalities agree; EmoMM's CHASE goes further and steers attention
only where it detects a modality conflict. With ``attention_reallocation(model, gate="conflict", gate_labels=...)``
every call made in the block starts with a *probe* of its prompt, and AR then acts only on the samples the probe
flags; the others are computed exactly as without AR.

The default probe (:class:`LabelConflictDetector`) runs two extra forwards of the call's inputs, one with the audio
tokens and one with the visual tokens left out (nobody attends to them; the model's own positions, images and audio
kept), and reads
each sample's next-token distribution at its response row restricted to the first tokens of the emotion labels. A
sample is in conflict when the two distributions disagree: different top-1 labels, or a Jensen-Shannon divergence
above the threshold. Any callable following :class:`ConflictDetector` can replace it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import Cache

from .._compat.transformers import call_input
from ..positions import ForwardPositions
from ..modality import Modality
from .json_data import to_plain

DEFAULT_GATE_THRESHOLD = 0.05
"""Jensen-Shannon divergence (nats, in [0, ln 2]) above which two label distributions disagree; why this value:
``docs/ar.md#the-conflict-gate``."""


@dataclass(frozen=True)
class GateInputs:
    """What a detector knows about the first forward (the prefill) of one call, and how it runs extra forwards.

    An extra forward is the model's own forward of the call's inputs (prompt, images, video, audio, their grids and
    masks, the call's positions: mRoPE ones included), with some positions left out: nobody attends to them and MoSE
    leaves them out as it does padding. The gate runs it with AR off, nothing recorded and a context of its own, so it
    leaves the call alone.
    """

    model: nn.Module
    """The transformers model (a MoSE model's base model, adapters included)."""
    inputs: dict[str, Any]
    """The first forward's keywords without its cache: ``input_ids`` or ``inputs_embeds`` ``[batch, seq]`` and every
    other input of the model (``attention_mask``, ``pixel_values``, ``image_grid_thw``, ``input_features``, ...)."""
    modality_ids: Tensor
    """``[batch, seq]`` (batch expanded for beams, like the inputs)."""
    valid: Tensor
    """The real (non-padding) positions, ``[batch, seq]``."""
    response_rows: Tensor
    """Each sample's last real prompt position (its row produces the first response token), ``[batch]``."""
    run: Callable[[dict[str, Any], Tensor], Any] = field(repr=False)
    """``run(keywords, left_out)``: the model's forward with the positions ``left_out`` (bool ``[batch, seq]``) left
    out, without a cache."""

    def has(self, modality: Modality) -> Tensor:
        """Whether each sample has a real token of ``modality``, ``[batch]``."""
        return (self.valid & (self.modality_ids == int(modality))).any(1)

    def response_logits(self, attention_mask: Tensor) -> Tensor:
        """The logits ``[batch, vocab]`` at each sample's response row of one forward of the call's inputs in which
        only the positions where the 2-D ``attention_mask`` is nonzero take part (the others are left out)."""
        kwargs = dict(self.inputs)
        rows = self.response_rows
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            keep, rows = torch.unique(rows, return_inverse=True)
            kwargs["logits_to_keep"] = keep
        logits = self.run(kwargs, self.valid & ~attention_mask.bool()).logits
        return logits[torch.arange(logits.shape[0], device=logits.device), rows]

    def without(self, modality: Modality) -> Tensor:
        """:meth:`response_logits` with every token of ``modality`` left out."""
        return self.response_logits(self.valid & (self.modality_ids != int(modality)))


# Keywords of a forward that concern its cache or its outputs, not its inputs: a probe sets its own.
_NOT_INPUTS = frozenset({
    "cache", "past_key_values", "use_cache", "cache_position", "logits_to_keep", "return_dict", "output_attentions",
    "output_hidden_states", "labels", "modality_ids",
})


def gate_inputs(
    model: nn.Module, positions: ForwardPositions, args: tuple, kwargs: dict,
    run: Callable[[dict[str, Any], Tensor], Any],
) -> GateInputs:
    """The :class:`GateInputs` of a call from its first forward's arguments and ``positions``; ``ValueError`` for a
    forward that continues a cache (its prompt ran in an earlier call)."""
    if not positions.prefill:
        raise ValueError(
            f"The conflict gate decides at a call's prompt, but this call continues a KV cache ({positions.past_length} "
            "cached positions) filled by an earlier call. Run prompt and continuation in one generate, or pass the "
            "whole sequence without a cache."
        )
    ids, valid = positions.modality_ids, positions.valid
    columns = torch.arange(ids.shape[1], device=ids.device)
    last = torch.where(valid & (ids != int(Modality.ANSWER)), columns, -1).amax(1).clamp_min(0)
    prompt = call_input(args, kwargs)
    name = "inputs_embeds" if prompt.is_floating_point() else "input_ids"
    inputs = {k: v for k, v in kwargs.items() if k not in _NOT_INPUTS and not isinstance(v, Cache)}
    inputs[name] = prompt
    return GateInputs(model, inputs, ids, valid, last, run)


@dataclass
class GateDecisions:
    """What the gate decided for one call, per sample. A custom detector may fill ``conflict`` only."""

    conflict: Tensor
    """Whether AR acts on the sample, bool ``[batch]``."""
    compared: Tensor | None = None
    """Whether the sample has both visual and audio tokens; the others are never in conflict (nothing to compare)."""
    without_audio: Tensor | None = None
    """The label distribution with the audio tokens masked out (the visual and text evidence), ``[batch, labels]``."""
    without_visual: Tensor | None = None
    """The label distribution with the visual tokens masked out (the audio and text evidence), ``[batch, labels]``."""
    divergence: Tensor | None = None
    """Jensen-Shannon divergence of the two distributions (nats), ``[batch]``."""
    top_without_audio: Tensor | None = None
    """Index (into ``labels``) of the most likely label without audio, ``[batch]``."""
    top_without_visual: Tensor | None = None
    labels: tuple[int, ...] | None = None
    """The label token ids the distributions are over."""
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy: nested lists, NaN as ``None``."""
        return {f.name: to_plain(getattr(self, f.name)) for f in fields(self)}


class ConflictDetector(Protocol):
    """A conflict detector: called once per call, at its first forward, with AR off and under ``torch.no_grad()``.
    Its cost is its own (the default runs two forwards of the prompt); ``conflict`` must be bool ``[batch]``."""

    def __call__(self, inputs: GateInputs) -> GateDecisions: ...


def check_gate_threshold(threshold: float) -> float:
    """Return ``threshold`` as a float; ``ValueError`` unless it is a number in [0, ln 2] (JS divergence in nats)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"`gate_threshold` must be a number in [0, ln 2], got {threshold!r}.") from None
    if not 0.0 <= value <= math.log(2):
        raise ValueError(
            f"`gate_threshold` must be in [0, ln 2 = {math.log(2):.4f}] (the range of the Jensen-Shannon divergence "
            f"in nats), got {threshold!r}."
        )
    return value


def check_gate_labels(labels: Iterable[int], vocab_size: int | None = None) -> tuple[int, ...]:
    """Return the label token ids as a tuple; ``ValueError`` unless there are at least two, all distinct token ids
    (ints, below ``vocab_size`` when given)."""
    if labels is None or isinstance(labels, (str, bytes)):
        raise ValueError(f"`gate_labels` must be a sequence of token ids (label_token_ids gives them), got {labels!r}.")
    ids = []
    for value in labels:
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`gate_labels` must hold token ids (ints >= 0), got {value!r}.")
        if vocab_size is not None and value >= vocab_size:
            raise ValueError(f"`gate_labels` holds token id {value}, outside the model's vocabulary of {vocab_size}.")
        ids.append(value)
    if len(ids) < 2:
        raise ValueError(f"`gate_labels` needs at least two label token ids to compare distributions, got {ids}.")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"`gate_labels` repeats token id(s) {repeated}: each label needs its own first token.")
    return tuple(ids)


def label_token_ids(tokenizer: Any, labels: Sequence[str]) -> tuple[int, ...]:
    """The first token id of each label string as ``tokenizer`` encodes it alone (no special tokens): the token the
    model's answer starts the label with. Write labels as they appear in answers (e.g. ``" happy"`` for tokenizers that
    fold a leading space into the token). ``ValueError`` for an empty label or two labels with one first token."""
    ids: dict[int, str] = {}
    for label in labels:
        tokens = tokenizer.encode(label, add_special_tokens=False) if label.strip() else []
        if not tokens:
            raise ValueError(f"Label {label!r} is empty (encodes to no token).")
        if tokens[0] in ids:
            raise ValueError(
                f"Labels {ids[tokens[0]]!r} and {label!r} share their first token (id {tokens[0]}), so the gate "
                "cannot tell them apart; drop or reword one."
            )
        ids[tokens[0]] = label
    return check_gate_labels(ids)


def jensen_shannon(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) of distributions along the last dim, in float64."""
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a / m).log(), 0.0).sum(-1)

    return (kl(p) + kl(q)) / 2


@dataclass(frozen=True)
class LabelConflictDetector:
    """The default probe: two forwards of the prompt, one without audio and one without visual tokens (see the module
    docstring); in conflict when the top-1 labels differ or their JS divergence exceeds ``threshold``."""

    labels: tuple[int, ...]
    threshold: float = DEFAULT_GATE_THRESHOLD

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", check_gate_labels(self.labels))
        object.__setattr__(self, "threshold", check_gate_threshold(self.threshold))

    def __call__(self, inputs: GateInputs) -> GateDecisions:
        distributions = []
        for masked in (Modality.AUDIO, Modality.VISUAL):
            logits = inputs.without(masked)
            labels = torch.tensor(check_gate_labels(self.labels, logits.shape[-1]), device=logits.device)
            distributions.append(torch.softmax(logits[:, labels].double(), dim=-1))
        without_audio, without_visual = distributions
        divergence = jensen_shannon(without_audio, without_visual)
        top_a, top_v = without_audio.argmax(-1), without_visual.argmax(-1)
        compared = inputs.has(Modality.VISUAL) & inputs.has(Modality.AUDIO)
        return GateDecisions(
            conflict=compared & ((top_a != top_v) | (divergence > self.threshold)),
            compared=compared,
            without_audio=without_audio,
            without_visual=without_visual,
            divergence=divergence,
            top_without_audio=top_a,
            top_without_visual=top_v,
            labels=self.labels,
            threshold=self.threshold,
        )


def check_decisions(decisions: Any, batch: int) -> GateDecisions:
    """``decisions`` if it is a :class:`GateDecisions` whose ``conflict`` is bool ``[batch]``, else ``ValueError``."""
    if not isinstance(decisions, GateDecisions):
        raise ValueError(f"A conflict detector must return GateDecisions, got {type(decisions).__name__}.")
    flags = decisions.conflict
    if not isinstance(flags, Tensor) or flags.dtype != torch.bool or tuple(flags.shape) != (batch,):
        described = f"{flags.dtype} {tuple(flags.shape)}" if isinstance(flags, Tensor) else type(flags).__name__
        raise ValueError(f"GateDecisions.conflict must be a bool tensor of shape ({batch},), got {described}.")
    return decisions


def describe_gate(gate: ConflictDetector | None) -> dict[str, Any] | str | None:
    """How the gate is written into the diagnostics' settings: the default detector's fields, else its name."""
    if gate is None:
        return None
    if isinstance(gate, LabelConflictDetector):
        return {"detector": "conflict", "labels": list(gate.labels), "threshold": gate.threshold}
    return getattr(gate, "__qualname__", type(gate).__qualname__)
