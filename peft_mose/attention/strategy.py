"""What an inference run does to attention: the one definition of the strategies, for the library and the recipes.

``none`` leaves attention alone; ``ar`` is MoSEAR's attention reallocation (section 5.2); ``ar+gate`` is AR on the
samples the conflict gate flags only (:mod:`.gate`); ``pai`` is the PAI baseline (paper Table 7), which amplifies the
visual attention of every sample by ``alpha``, in the logits or in the weights (:class:`PaiMode`).
"""

from __future__ import annotations

import enum


class Strategy(str, enum.Enum):
    """An inference strategy; a ``str`` so that it reads and writes as its value (CLI options, JSON)."""

    NONE = "none"
    AR = "ar"
    AR_GATE = "ar+gate"
    PAI = "pai"

    @classmethod
    def parse(cls, value: Strategy | str) -> Strategy:
        """``Strategy`` of a value such as ``"ar"``; ``ValueError`` naming the choices otherwise."""
        return _parse(cls, value, "strategy")

    @property
    def reallocates(self) -> bool:
        """Whether the strategy changes attention (every one but ``none``)."""
        return self is not Strategy.NONE

    @property
    def gated(self) -> bool:
        """Whether the conflict gate decides which samples the strategy acts on."""
        return self is Strategy.AR_GATE


class PaiMode(str, enum.Enum):
    """Where PAI amplifies the visual attention: the pre-softmax ``logits`` (the paper's baseline) or the
    ``weights`` (renormalised after)."""

    LOGITS = "logits"
    WEIGHTS = "weights"

    @classmethod
    def parse(cls, value: PaiMode | str) -> PaiMode:
        """``PaiMode`` of a value such as ``"logits"``; ``ValueError`` naming the choices otherwise."""
        return _parse(cls, value, "pai_mode")


def _parse(kind: type[enum.Enum], value: object, name: str):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {[m.value for m in kind]}.") from None
