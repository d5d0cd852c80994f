"""``recipes/omni_infer.py``: answer about one clip with a finished omni run (verified) or a base Qwen2.5-Omni model,
under a chosen attention strategy; ``--verbose`` prints the prompt's visual and audio token counts and MoSE's
router weight λ per layer."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from peft_mose.attention import Strategy
from peft_mose.attention.gate import label_token_ids
from peft_mose.metrics import resolve_labels

from ..logs import setup_logging
from ..model_choice import Reallocation, add_reallocation_arguments, check_exists
from .data import MediaOptions, clip_media
from .evaluation import answer
from .inputs import DEFAULT_QUESTION, DEFAULT_SYSTEM, OmniEncoder
from .manifest import ClipRecord
from .model import load_run, load_thinker

logger = logging.getLogger(__name__)

GATED = "gated"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipes/omni_infer.py", description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", type=Path, help="output folder of recipes/omni_finetune.py (MoSE)")
    parser.add_argument("--model_name_or_path", type=Path, help="base Qwen2.5-Omni model (no run)")
    parser.add_argument("--video", type=Path, help=".mp4 (its audio track is used unless --audio or --no_audio)")
    sound = parser.add_mutually_exclusive_group()  # --audio with --no_audio would drop the file unsaid
    sound.add_argument("--audio", type=Path, help=".wav (or any audio file) instead of the video's track")
    sound.add_argument("--no_audio", action="store_true", help="show the model the frames only")
    parser.add_argument("--strategy", choices=[*(s.value for s in Strategy), GATED], default="none",
                        help=f"{GATED}: the same as ar+gate (AR where the conflict gate finds the modalities disagree)")
    parser.add_argument("--gate_labels", default="mer2023", help="label set of the gated strategy's conflict gate")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--verbose", action="store_true", help="token counts and λ per layer")
    add_reallocation_arguments(parser)
    return parser


def infer(args: argparse.Namespace) -> str:
    """The answer to the clip (printed by :func:`main`)."""
    if (args.run_dir is None) == (args.model_name_or_path is None):
        raise ValueError("Give --run_dir (a run of omni_finetune.py) or --model_name_or_path (a base model), one.")
    if args.video is None and args.audio is None:
        raise ValueError("Give --video and/or --audio.")
    check_exists(args.run_dir, "the run folder", "--run_dir")
    if args.run_dir is not None:
        model, encoder, run = load_run(args.run_dir)
        options = run.media
    else:
        check_exists(args.model_name_or_path, "the model folder", "--model_name_or_path")
        model = load_thinker(args.model_name_or_path).eval()
        encoder = OmniEncoder.from_pretrained(args.model_name_or_path, model.config, question=DEFAULT_QUESTION,
                                              system_prompt=DEFAULT_SYSTEM)  # fmt: skip
        options = MediaOptions()
    if options.audio == "none" and args.audio:  # the run's own choice, which --no_audio only repeats
        raise ValueError(f"{args.run_dir} was trained with --audio none: it has never seen audio; leave out --audio.")
    mode = "none" if args.no_audio or options.audio == "none" else ("required" if args.audio else "optional")
    options = MediaOptions(options.fps, options.max_frames, options.max_audio_seconds, mode, options.use_audio_in_video)
    record = ClipRecord("clip", args.video.resolve() if args.video else None,
                        args.audio.resolve() if args.audio else None, None, None, None, Path("<command line>"), 0)  # fmt: skip
    clip = encoder.encode(clip_media(record, encoder, options))
    strategy = Strategy.AR_GATE if args.strategy == GATED else Strategy.parse(args.strategy)
    gate = None
    if strategy.gated:
        gate = {"gate_labels": label_token_ids(encoder.tokenizer, resolve_labels(args.gate_labels)),
                "gate_threshold": None}  # fmt: skip
    reallocation = Reallocation.from_args(args).options(strategy, gate)
    if reallocation is not None and args.verbose:
        reallocation["record"] = True
    text, _ = answer(model, encoder, clip, args.max_new_tokens, reallocation)
    if args.verbose:
        print(f"prompt: {clip.visual_tokens} visual tokens, {clip.audio_tokens} audio tokens "
              f"({'interleaved' if clip.use_audio_in_video else 'separate'}); inputs: {encoder.path}")  # fmt: skip
        stats = model.base_model.routing_stats() if hasattr(model.base_model, "routing_stats") else {}
        for layer, values in stats.items():
            lam = values["lambda"]
            print(f"λ {layer}: {'n/a' if lam is None else ', '.join(f'{v:.4f}' for v in lam.flatten().tolist())}")
    return text


def main(argv: Sequence[str] | None = None) -> str:
    """Parse, answer, print ``<strategy>: <answer>``; a refused input exits with status 2 and its message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.INFO, logging.INFO)
    try:
        text = infer(args)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    print(f"{args.strategy}: {text}")
    return text
