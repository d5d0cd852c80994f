"""Statistics as JSON-friendly data, for the diagnostics and gate decisions that the recipes write to files."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor


def to_plain(value: Any) -> Any:
    """``value`` as JSON-friendly data: tensors as nested lists, NaN as ``None``, infinities as strings."""
    if isinstance(value, Tensor):
        return to_plain(value.tolist())
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value
