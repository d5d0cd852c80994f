"""Registers MoSE with PEFT's mappings, the way `peft.utils.register_peft_method` would for a built-in method.

`register_peft_method` only accepts names of PEFT's own `PeftType` enum, so the three mappings are written here,
once, with the same uniqueness checks. PEFT has no plugin entry point: adapters of type ``MOSE`` load only after
``import peft_mose``.
"""

from __future__ import annotations

from peft import mapping

from ._compat import peft as peft_compat
from .config import MoSEConfig, MoSEPeftType
from .model import MoSEModel


def register() -> None:
    """Make ``MOSE`` known to `get_peft_model`, `PeftModel.from_pretrained` and `PeftConfig`, and checksum MoSE
    adapter files (idempotent)."""
    key = MoSEPeftType.MOSE
    entries = (
        (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, MoSEConfig),
        (mapping.PEFT_TYPE_TO_TUNER_MAPPING, MoSEModel),
        (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, MoSEModel.prefix),
    )
    for table, value in entries:
        if table.get(key, value) is not value and table.get(key) != value:
            raise KeyError(f"PEFT already has a different method registered as {key.value!r}.")
    if MoSEModel.prefix in {p for k, p in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items() if k != key}:
        raise KeyError(f"The prefix {MoSEModel.prefix!r} is already used by another PEFT method.")
    for table, value in entries:
        table[key] = value
    peft_compat.install(MoSEModel.prefix)  # the adapter checksum: saved with MoSE adapters, verified on load
