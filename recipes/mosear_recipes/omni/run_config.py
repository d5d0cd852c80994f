"""What an ``omni_finetune.py`` run folder holds and how it was made: :class:`OmniRunConfig` (``run_config.json``),
read back by inference and evaluation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_mose import environment

from ..run_config import RUN_CONFIG, run_config_values, write_run_config
from .data import MediaOptions

FORMAT = "omni-1"
# The arguments a resumed run must share with the run it resumes (see run_folder.check_resume_agrees).
RESUME_ARGUMENTS = {
    "model": ("quantization", "r", "n_experts", "eps", "lora_alpha", "lora_dropout", "router_hidden_size",
              "expert_kind", "router", "target_modules"),
    "data": ("tiny_setup", "fps", "max_frames", "max_pixels", "max_audio_seconds", "audio", "use_audio_in_video",
             "question", "system_prompt"),
    "training": ("learning_rate", "seed", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "num_train_epochs", "warmup_steps", "weight_decay", "lr_scheduler_type", "optim", "bf16", "fp16",
                 "save_strategy", "save_steps"),
}  # fmt: skip


@dataclass(frozen=True)
class OmniRunConfig:
    """One run: the base model (path and identity), the training manifest, how media were read, which input path
    (processor or frames) encoded them, every argument, and the environment."""

    model_name_or_path: str
    base_model: dict[str, str]
    train_manifest: str
    media: MediaOptions
    max_pixels: int | None
    question: str
    system_prompt: str
    input_path: str
    world_size: int = 1
    config_file: str | None = None
    arguments: dict[str, dict[str, Any]] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=environment)
    format: str = FORMAT

    def write(self, directory: str | Path) -> Path:
        """Write ``directory/run_config.json``."""
        return write_run_config(self, directory)

    @classmethod
    def read(cls, directory: str | Path) -> OmniRunConfig:
        """The run configuration of a run folder of ``omni_finetune.py``, with an error naming what is wrong."""
        values = run_config_values(directory, "omni_finetune.py", FORMAT, "it is not a run of omni_finetune.py "
                                   "(merr_finetune.py runs load with merr_infer.py).")  # fmt: skip
        path = Path(directory) / RUN_CONFIG
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}.")
        return cls(**{**values, "media": MediaOptions(**values["media"])})
