"""Per-call and per-forward memos: what a reader of the modality context computes once and reads again.

Each reader owns its memo types (MoSE's in :mod:`peft_mose.layer`, attention reallocation's in
:mod:`peft_mose.attention`), so the context that holds them knows none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

M = TypeVar("M")


class Memos:
    """What the readers of one call or one forward computed once, keyed by type: each reader owns its memo types
    (MoSE's in :mod:`peft_mose.layer`, AR's in :mod:`peft_mose.attention`) and reads no other."""

    __slots__ = ("_items",)

    def __init__(self, items: dict[type, Any] | None = None) -> None:
        self._items = {} if items is None else items

    def get(self, kind: type[M]) -> M:
        """The memo of type ``kind``, created empty (``kind()``) on first use."""
        item = self._items.get(kind)
        if item is None:
            item = self._items[kind] = kind()
        return item

    def find(self, kind: type[M]) -> M | None:
        """The memo of type ``kind`` if one was made."""
        return self._items.get(kind)

    def derived(self, derive: Callable[[CallMemo], CallMemo | None]) -> dict[type, CallMemo]:
        """``derive(memo)`` of each per-call memo, where it gives one."""
        made = ((kind, derive(memo)) for kind, memo in self._items.items() if isinstance(memo, CallMemo))
        return {kind: memo for kind, memo in made if memo is not None}

    def seed(self, memos: dict[type, CallMemo]) -> None:
        """Start from the carried ``memos`` of a cache's prompt, except where a memo of the type exists already."""
        for kind, memo in memos.items():
            if kind not in self._items:
                self._items[kind] = memo.carried()


class CallMemo:
    """A per-call memo; it outlives its call only as :meth:`carried` into the record of the KV cache the call filled
    (a later call that continues the cache starts from it) and as :meth:`closed` (the last call's statistics)."""

    def carried(self) -> CallMemo | None:
        return None

    def closed(self) -> CallMemo | None:
        return None
