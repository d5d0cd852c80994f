"""The method's effect on a controlled conflict set, in one run (same data, same seeds): LoRA SFT, MoSE SFT, MoSE SFT
+ AR, MoSE SFT + DPO, MoSE SFT + DPO + AR; accuracy per CA-MER subset and the audio-following rate.

The conflict set is the synthetic MERR set (``merr/synthetic.py``: every feature is its label's prototype plus noise,
the face features carry the visual label, the HuBERT feature the audio label) with an audio-dominated training mix
(``TRAIN_SUBSETS``: where face and voice disagree, the voice carries the label 7 times in 10) and a balanced test
split; the answers are perceive-then-reason answers (task ``perceive``). A model trained on it plainly learns to
follow the voice: its audio-following rate (the share of ``video_aligned`` test samples, whose label is the face's,
answered with the voice's label) is the bias. DPO then tunes the MoSE SFT model on consistency-aware pairs from the
same training samples, in the mix ``--mix`` (by default the audio-aligned pairs are down-weighted, so the pairs
mostly say "the face carried it"). Nothing in a sample's features says which modality carries its label, so no
method can be right on both conflict subsets: the table shows what each trades.

    python -m mosear_recipes.preference.compare OUT_DIR              # CI size: minutes on 2 CPU cores
    python -m mosear_recipes.preference.compare OUT_DIR --size full  # docs/preference.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import set_seed

from peft_mose.attention import attention_reallocation

from ..arguments import TINY_CONFIG, parse_finetune_args, total_steps
from ..emotion_llama.model import EmotionLlama, load_llm, load_tokenizer
from ..emotion_llama.projectors import EmotionLlamaProjectors
from ..emotion_llama.prompt import PromptEncoder
from ..finetune import main as finetune_main, open_dataset
from ..merr.collator import MERRCollator
from ..merr.perceive import Cues, perceive_then_reason, read_cues
from ..merr.readers import EMOTION_LABELS
from ..merr.sampler import SingleTaskBatchSampler
from ..merr.synthetic import FILES, LABELS, SUBSETS, SyntheticSample, read_synthetic_subsets
from ..merr.tasks import normalize_answer
from ..model_choice import Reallocation
from ..run import load_trained
from ..tiny_setup import write_tiny_setup
from ..trainer import MoSETrainer
from .dpo import main as dpo_main

logger = logging.getLogger(__name__)

TRAIN_SUBSETS = {"consistent": 0.4, "audio_aligned": 0.42, "video_aligned": 0.18}
NOISE = {"eva": 6.0, "face": 3.0, "video": 3.0, "audio": 0.1}  # the voice is by far the cleaner cue
TASKS = ("emotion", "perceive")
DEFAULT_MIX = "audio_aligned=0.25"


@dataclass(frozen=True)
class Size:
    """How big a comparison is: synthetic samples (80% train, 20% test), SFT and DPO steps."""

    num_samples: int
    sft_steps: int
    dpo_steps: int


SIZES = {"ci": Size(150, 150, 40), "full": Size(900, 1500, 400)}


def sft_args(setup_dir: Path, out: Path, steps: int, seed: int) -> list[str]:
    """The SFT command line (the tiny config, on the conflict set, task ``perceive``, no evaluation)."""
    return [str(TINY_CONFIG), "--tiny_setup", "false", "--model_name_or_path", str(setup_dir / "model"),
            "--data_root", str(setup_dir / "data"), "--output_dir", str(out), "--tasks", ",".join(TASKS),
            "--max_steps", str(steps), "--val_size", "0", "--eval_strategy", "no", "--eval_annotation", "none",
            "--save_strategy", "no", "--seed", str(seed), "--disable_tqdm", "true", "--logging_steps", "20",
            # the tiny config's schedule (50 steps per epoch) stretched to the steps
            "--num_train_epochs", str(max(3, math.ceil(steps / 50)))]  # fmt: skip


def train_lora_sft(setup_dir: Path, out: Path, steps: int, seed: int) -> EmotionLlama:
    """The LoRA baseline: the SFT recipe's data, sampler, schedule and trainer with a plain PEFT LoRA (same rank,
    alpha, targets) in place of MoSE; trained in memory."""
    config = parse_finetune_args(sft_args(setup_dir, out, steps, seed))
    data_root, model_path = setup_dir / "data", setup_dir / "model"
    train = open_dataset(data_root / FILES["coarse_txt"], data_root, TASKS, False)
    tokenizer = load_tokenizer(model_path)
    encoder = PromptEncoder(tokenizer, train.spec.n_patch_tokens)
    set_seed(seed)
    margs = config.model
    lora = LoraConfig(r=margs.r, lora_alpha=margs.lora_alpha, lora_dropout=margs.lora_dropout,
                      target_modules=margs.mose_config().target_modules, task_type="CAUSAL_LM")  # fmt: skip
    llm = get_peft_model(load_llm(model_path), lora)
    model = EmotionLlama(llm, EmotionLlamaProjectors.from_spec(train.spec, llm.config.hidden_size),
                         tokenizer.pad_token_id)  # fmt: skip
    args = config.training
    sampler = SingleTaskBatchSampler(train, batch_size=args.per_device_train_batch_size,
                                     num_batches=config.schedule.iters_per_epoch, seed=args.seed)  # fmt: skip
    trainer = MoSETrainer(model=model, args=args, train_dataset=train, data_collator=MERRCollator(encoder),
                          batch_sampler=sampler, schedule=config.schedule, total_steps=total_steps(config),
                          checkpoints_kept=None)  # fmt: skip
    trainer.train()
    return model.eval()


def audio_following(predictions: Mapping[str, str], truth: Sequence[SyntheticSample]) -> dict[str, float]:
    """Accuracy per subset (the predicted label against the true one) and the audio-following rate: the share of
    ``video_aligned`` samples (label = the face's) predicted with the voice's label."""
    row: dict[str, float] = {}
    for subset in SUBSETS:
        samples = [s for s in truth if s.subset == subset]
        row[subset] = sum(predictions[s.name] == s.label for s in samples) / len(samples)
    video = [s for s in truth if s.subset == "video_aligned"]
    row["audio_following"] = sum(predictions[s.name] == s.audio_label for s in video) / len(video)
    return row


def candidates(task: str, cues: Cues) -> dict[str, str]:
    """``{label: answer}`` the model chooses among. ``emotion``: the six label words. ``perceive``: the
    perceive-then-reason answer from the sample's true cues (the perception is given) concluding each label the
    cues allow: in a conflict the face's and the voice's (with the verdict of the cue followed), when they agree the
    six labels (verdict "agree"; any other is a consistent pair's unsupported conclusion)."""
    if task == "emotion":
        return {label: label for label in LABELS}
    carriers = {cues.visual_label: "visual", cues.audio_label: "audio"}
    if cues.visual_label == cues.audio_label:
        carriers = dict.fromkeys(LABELS, "both")
    return {label: normalize_answer(perceive_then_reason(cues, label, follows)) for label, follows in carriers.items()}


def answer_logps(model: EmotionLlama, batch: dict) -> torch.Tensor:
    """Sum of the log-probabilities of each row's answer tokens (its labels), teacher-forced."""
    logits = model(batch).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (token * (labels != -100)).sum(1)


@torch.no_grad()
def predict(
    model: EmotionLlama, setup_dir: Path, task: str, reallocation: Reallocation | None
) -> tuple[dict[str, str], list[SyntheticSample]]:
    """Each test sample's prediction: the candidate (:func:`candidates`) the model scores highest, teacher-forced,
    under AR with ``reallocation``'s options (on the answer rows) when given; and the samples' truth."""
    data_root = setup_dir / "data"
    test = open_dataset(data_root / FILES["test_txt"], data_root, (task,), False)
    cues = read_cues(data_root / FILES["cues_json"], EMOTION_LABELS)
    collate = MERRCollator(PromptEncoder(load_tokenizer(setup_dir / "model"), test.spec.n_patch_tokens))
    options = reallocation.options("ar") if reallocation is not None else None
    model.eval()
    predictions = {}
    for index, record in enumerate(test.records):
        sample = test[(index, task, 0)]
        choices = candidates(task, cues[record.name])
        block = attention_reallocation(model.llm, **options) if options else contextlib.nullcontext()
        with block:
            scores = answer_logps(model, collate([replace(sample, answer=a) for a in choices.values()]))
        predictions[record.name] = list(choices)[int(scores.argmax())]
    names = {r.name for r in test.records}
    return predictions, [s for s in read_synthetic_subsets(data_root / FILES["subsets"]) if s.name in names]


def evaluate(
    model: EmotionLlama, setup_dir: Path, reallocation: Reallocation | None = None
) -> dict[str, dict[str, float]]:
    """:func:`audio_following` of :func:`predict` on the balanced test split, for recognition (``emotion``) and for
    the perceive-then-reason conclusion (``perceive``)."""
    return {task: audio_following(*predict(model, setup_dir, task, reallocation)) for task in TASKS}


def compare(
    out_dir: Path, size: Size, seed: int = 0, mix: str = DEFAULT_MIX, beta: float = 0.1, tau: float = 1.0
) -> dict[str, dict]:
    """Write the conflict set to ``out_dir/setup``, train and evaluate the five configurations (AR with threshold
    ``tau``); returns (and writes to ``out_dir/comparison.json`` and ``comparison.md``) their rows."""
    ar = Reallocation(tau=tau)
    setup_dir = out_dir / "setup"
    write_tiny_setup(setup_dir, num_samples=size.num_samples, seed=seed, train_subsets=TRAIN_SUBSETS, noise=NOISE)
    rows: dict[str, dict] = {}
    rows["LoRA SFT"] = evaluate(train_lora_sft(setup_dir, out_dir / "lora_sft", size.sft_steps, seed), setup_dir)
    finetune_main(sft_args(setup_dir, out_dir / "mose_sft", size.sft_steps, seed))
    mose = load_trained(out_dir / "mose_sft").model
    rows["MoSE SFT"] = evaluate(mose, setup_dir)
    rows["MoSE SFT + AR"] = evaluate(mose, setup_dir, ar)
    dpo_main(["--model_name_or_path", str(setup_dir / "model"), "--data_root", str(setup_dir / "data"),
              "--init_from", str(out_dir / "mose_sft"), "--output_dir", str(out_dir / "mose_dpo"), "--r", "8",
              "--mix", mix, "--beta", str(beta), "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
              "--max_steps", str(size.dpo_steps), "--per_device_train_batch_size", "4", "--save_strategy", "no",
              "--seed", str(seed), "--logging_steps", "10", "--disable_tqdm", "true", "--report_to", "none"])  # fmt: skip
    tuned = load_trained(out_dir / "mose_dpo").model
    rows["MoSE SFT + DPO"] = evaluate(tuned, setup_dir)
    rows["MoSE SFT + DPO + AR"] = evaluate(tuned, setup_dir, ar)
    record = {"size": asdict(size), "seed": seed, "mix": mix, "beta": beta, "tau": tau, "train_subsets": TRAIN_SUBSETS,
              "noise": NOISE, "rows": rows}  # fmt: skip
    (out_dir / "comparison.json").write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / "comparison.md").write_text(table(rows) + "\n")
    logger.info("conflict-set comparison (%s):\n%s", asdict(size), table(rows))
    return rows


def table(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The markdown table of docs/preference.md (percentages)."""
    lines = ["| method | task | video-aligned acc | audio-aligned acc | consistent acc | audio-following |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, per_task in rows.items():
        for task, row in per_task.items():
            values = [row[s] for s in SUBSETS] + [row["audio_following"]]
            lines.append(f"| {name} | {task} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    """``python -m mosear_recipes.preference.compare OUT_DIR [--size ci|full] [--seed] [--mix] [--beta] [--tau]``."""
    parser = argparse.ArgumentParser(prog="python -m mosear_recipes.preference.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="ci")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"DPO pair mix (default {DEFAULT_MIX})")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    parser.add_argument("--tau", type=float, default=1.0, help="AR threshold (default 1.0, Reallocation's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%X")
    rows = compare(args.out_dir, SIZES[args.size], args.seed, args.mix, args.beta, args.tau)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
