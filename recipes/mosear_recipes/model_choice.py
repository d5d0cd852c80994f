"""What evaluation and inference generate with: :class:`ModelChoice`, a trained run or the base model with its
projector weights (one type, one set of command-line options, one check, one loader), and :class:`Reallocation`,
the options of the attention strategies (:class:`~peft_mose.attention.Strategy`) they compare."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peft_mose.attention import PaiMode, Strategy

from .emotion_llama.baseline import load_baseline
from .emotion_llama.features import FeatureSpec
from .emotion_llama.model import EmotionLlama
from .emotion_llama.prompt import PromptEncoder
from .run import load_trained
from .run_config import RUN_CONFIG

logger = logging.getLogger(__name__)


def check_exists(path: Path | None, what: str, option: str) -> None:
    """Refuse a given ``path`` that does not exist, naming its command-line ``option``."""
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{option} {path}: {what} does not exist.")


@dataclass(frozen=True)
class ModelChoice:
    """The model to generate with: a trained run (``run_dir``, which brings its base model, adapter and projectors),
    or the base model (``model_name_or_path``) with its projector weights, an original ``.pth``
    (``projector_checkpoint``, its LoRA included) or a ``projectors.safetensors`` (``projectors``); and the device."""

    run_dir: Path | None = None
    model_name_or_path: Path | None = None
    projector_checkpoint: Path | None = None
    projectors: Path | None = None
    device: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelChoice:
        """The choice parsed by the options of :func:`add_model_arguments`."""
        return cls(args.run_dir, args.model_name_or_path, args.projector_checkpoint, args.projectors, args.device)

    @property
    def kind(self) -> str:
        """``"run"`` (MoSE) or ``"base"`` (Emotion-LLaMA)."""
        return "run" if self.run_dir is not None else "base"

    @property
    def weights(self) -> Path:
        """Where the trained weights come from: the run folder or the base model's projector file."""
        return Path(self.projector_checkpoint or self.projectors or self.run_dir)

    def check(self, purpose: str, run_supplies: Mapping[str, Any] | None = None) -> None:
        """One model, which exists: ``--run_dir`` (a folder of ``recipes/merr_finetune.py``, which brings its own
        projectors and whatever ``run_supplies`` names, ``{option: value}``) or ``--model_name_or_path`` with exactly
        one of the projector weights. ``purpose`` ends the message that asks for one."""
        if (self.run_dir is None) == (self.model_name_or_path is None):
            raise ValueError(
                "Give --run_dir (a MoSE run) or --model_name_or_path (the base model)"
                + (", not both." if self.run_dir is not None else f" to {purpose}.")
            )
        if self.kind == "base":
            check_exists(self.model_name_or_path, "the LLM folder", "--model_name_or_path")
            self._check_base_weights()
            return
        check_exists(self.run_dir, "the run folder", "--run_dir")
        if not (Path(self.run_dir) / RUN_CONFIG).is_file():
            raise FileNotFoundError(
                f"--run_dir {self.run_dir} holds no {RUN_CONFIG}: is it an output folder of recipes/merr_finetune.py?"
            )
        own = {"--projector_checkpoint": self.projector_checkpoint, "--projectors": self.projectors,
               **(run_supplies or {})}  # fmt: skip
        given = [option for option, value in own.items() if value is not None]
        if given:
            extras = " and ".join(option.removeprefix("--").replace("_", " ") for option in run_supplies or {})
            raise ValueError(
                f"{' and '.join(given)} go with --model_name_or_path: a run has its own projectors"
                + (f" and {extras}." if extras else ".")
            )

    def _check_base_weights(self) -> None:
        if (self.projector_checkpoint is None) == (self.projectors is None):
            raise ValueError(
                "--model_name_or_path needs the projector weights: --projector_checkpoint (an Emotion-LLaMA or "
                "MiniGPT-v2 .pth, its LoRA included) or --projectors (a projectors.safetensors)"
                + (", not both." if self.projector_checkpoint is not None else ".")
            )
        check_exists(self.projector_checkpoint, "the checkpoint", "--projector_checkpoint")
        check_exists(self.projectors, "the projector weights", "--projectors")

    def load(self, spec: FeatureSpec) -> tuple[EmotionLlama, PromptEncoder]:
        """The model (eval mode, on ``device``: default cuda when available) and its prompt encoder; the base
        model's checkpoint reports are logged."""
        if self.kind == "run":
            trained = load_trained(self.run_dir)
            model, encoder = trained.model, trained.encoder
        else:
            baseline = load_baseline(self.model_name_or_path, spec, self.projector_checkpoint, self.projectors)
            logger.info("%s", "\n".join(baseline.reports))
            model, encoder = baseline.model, baseline.encoder
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return model.to(device), encoder


def add_model_arguments(group: argparse._ActionsContainer) -> None:
    """The options of :class:`ModelChoice` (read back by :meth:`ModelChoice.from_args`)."""
    group.add_argument("--run_dir", type=Path, help="output folder of recipes/merr_finetune.py (MoSE)")
    group.add_argument("--model_name_or_path", type=Path, help="local LLM folder: the base model (Emotion-LLaMA)")
    group.add_argument("--projector_checkpoint", type=Path, help="base model: Emotion-LLaMA / MiniGPT-v2 .pth (+ LoRA)")
    group.add_argument("--projectors", type=Path, help="base model: projectors.safetensors instead of a .pth")
    group.add_argument("--device", help="default: cuda when available, else cpu")


def parse_strategies(values: Iterable[Strategy | str], allowed: Sequence[Strategy] = tuple(Strategy)) -> list[Strategy]:
    """The strategies named, in order without repeats; an empty list or one outside ``allowed`` is refused."""
    values = list(values)
    unknown = [v for v in values if v not in {s.value for s in allowed}]
    if unknown or not values:
        choices = [s.value for s in allowed]
        raise ValueError(f"Unknown strategies {unknown or values!r}; choose from {choices}.")
    return list(dict.fromkeys(Strategy.parse(v) for v in values))


def split_strategies(text: str) -> list[str]:
    """The comma-separated ``--strategies`` value as a list of names."""
    return [s.strip() for s in text.split(",") if s.strip()]


@dataclass(frozen=True)
class Reallocation:
    """The options of the strategies that change attention: AR's threshold ``tau``, PAI's amplification ``alpha``
    and ``pai_mode``, and the ``layers`` both act on (``None``: all)."""

    tau: float = 1.0
    alpha: float = 0.5
    pai_mode: PaiMode = PaiMode.LOGITS
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pai_mode", PaiMode.parse(self.pai_mode))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Reallocation:
        """The options parsed by :func:`add_reallocation_arguments`."""
        layers = tuple(int(v) for v in args.layers.split(",")) if args.layers else None
        return cls(tau=args.tau, alpha=args.alpha, pai_mode=args.pai_mode, layers=layers)

    def options(self, strategy: Strategy, gate: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """``None`` for ``none``; otherwise the :func:`~peft_mose.attention_reallocation` options of AR, gated AR (with
        the gate's options ``gate``: ``gate_labels`` and ``gate_threshold``) or PAI (the model passes its modality ids
        along, MoSE or not)."""
        strategy = Strategy.parse(strategy)
        if not strategy.reallocates:
            return None
        base = Strategy.AR if strategy.gated else strategy
        own = {"tau": self.tau} if base is Strategy.AR else {"alpha": self.alpha, "pai_mode": self.pai_mode.value}
        options = {"strategy": base.value, **own, "layers": list(self.layers) if self.layers is not None else None}
        if strategy.gated:
            if gate is None:
                raise ValueError(f"Strategy {strategy.value!r} needs the gate's options (gate_labels, gate_threshold).")
            options.update(gate="conflict", **gate)
        return options


def add_reallocation_arguments(group: argparse._ActionsContainer) -> None:
    """The options of :class:`Reallocation` (read back by :meth:`Reallocation.from_args`)."""
    group.add_argument("--tau", type=float, default=1.0, help="AR threshold")
    group.add_argument("--alpha", type=float, default=0.5, help="PAI amplification")
    group.add_argument("--pai_mode", choices=[m.value for m in PaiMode], default=PaiMode.LOGITS.value,
                       help="what PAI amplifies")  # fmt: skip
    group.add_argument("--layers", help="comma-separated layer indices for AR/PAI (default: all)")
