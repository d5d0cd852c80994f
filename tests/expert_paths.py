"""Choose how MoSE runs its experts in a test: tiny test models are always below the size where grouping the tokens
by expert pays, so without this only the every-expert-on-every-token plan would be exercised."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from unittest import mock

from peft_mose import experts


@contextlib.contextmanager
def expert_path(grouped: bool) -> Iterator[None]:
    """Inside the block, tokens are grouped by expert whenever they fall into several groups (``grouped``), or
    every token runs every expert."""
    with mock.patch.object(experts, "GROUPING_OVERHEAD_FLOPS", -math.inf if grouped else math.inf):
        yield
