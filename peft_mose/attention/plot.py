"""Collect the per-step attention diagnostics of a model on a batch and draw them like the paper's Fig. 3(a)-(b), and
draw the conflict gate's decisions (:func:`plot_gate_decisions`).

Command line (writes ``diagnostics.json``, ``uap_per_layer.png`` and one ``token_weights_sample<b>.png`` per
sample)::

    python -m peft_mose.attention.plot MODEL_DIR BATCH_FILE --out plots/ [--adapter ADAPTER_DIR]
        [--strategy ar [--tau 1.0] | --strategy pai [--alpha 0.5] [--pai-mode logits|weights]] [--layers 8:24]
        [--step N|emotion] [--max-new-tokens 64] [--tokenizer DIR]
        [--gate conflict --gate-labels mer2023|dfew|merr|WORD,WORD,...|ID,ID,... [--gate-threshold 0.05]]

``--step 0`` (default) plots the row producing the first response token from one forward of the prompt; ``--step
N`` or ``--step emotion`` generate greedily first and plot step N, or for each sample the step of the token that
completes its first emotion word (Eq. 1's y_k). ``--gate conflict`` runs AR behind the conflict gate (labels: a
preset of :data:`~peft_mose.metrics.LABEL_SETS` or words, encoded with the tokenizer, or token ids) and also writes
``gate.png`` (:func:`plot_gate_decisions`); the decisions go into ``diagnostics.json``.

``BATCH_FILE`` is a ``torch.save``-d dict (``.pt``) or a JSON object with ``modality_ids`` and ``input_ids`` or
``inputs_embeds`` (and optionally ``attention_mask``), all ``[batch, seq]`` (embeddings ``[batch, seq, hidden]``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor, nn

from ..modality import Modality
from ..model import is_mose_model
from .backend import attention_reallocation
from .diagnostics import ReallocationDiagnostics, StepDiagnostics
from .gate import GateDecisions, label_token_ids

DEFAULT_NEW_TOKENS = 64
"""Tokens the command generates for a step other than 0 when ``--max-new-tokens`` is not given."""
COLORS = {
    Modality.VISUAL: "tab:blue", Modality.AUDIO: "tab:orange", Modality.TEXT: "tab:gray", Modality.ANSWER: "tab:green"
}


def middle_layers(num_layers: int, fraction: float = 0.5) -> list[int]:
    """The central ``fraction`` of ``num_layers`` layer indices, e.g. 8-23 of 32 (rounded up to stay centred)."""
    if num_layers < 1 or not 0 < fraction <= 1:
        raise ValueError(f"Need num_layers >= 1 and 0 < fraction <= 1, got {num_layers} and {fraction}.")
    count = max(1, round(num_layers * fraction))
    count += (num_layers - count) % 2
    start = (num_layers - count) // 2
    return list(range(start, start + count))


def collect_diagnostics(
    model: nn.Module,
    modality_ids: Tensor,
    *,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 0,
    **options: Any,
) -> ReallocationDiagnostics:
    """Run the prompt under :func:`attention_reallocation` (``options`` are its keywords) and return the statistics
    of every layer: with ``max_new_tokens=0`` one forward (step 0 only: the row producing the first response token),
    else a greedy ``generate`` of that many tokens (every step; the tokens are kept in ``.generated``). The ids go
    where the model takes them: the call of a MoSE model, the block otherwise."""
    given = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    inputs = {name: value for name, value in given.items() if value is not None}
    block_ids = modality_ids
    if is_mose_model(model):
        inputs["modality_ids"], block_ids = modality_ids, None
    with torch.no_grad(), attention_reallocation(model, block_ids, record=True, **options) as run:
        if max_new_tokens > 0:
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            # decoder-only generate returns the prompt ids before the new tokens (none for a prompt of embeddings)
            run.diagnostics.generated = out[:, input_ids.shape[1] :] if input_ids is not None else out
        else:
            model(**inputs)
    run.diagnostics.gate_decisions = list(run.gate_decisions)
    return run.diagnostics


class EmotionWordStep(NamedTuple):
    """Where a generated answer first expresses an emotion: the step whose token completes the word, and the word
    (its vocabulary form)."""

    step: int
    word: str


def emotion_word_steps(
    tokenizer: Any, generated: Tensor, vocabulary: Collection[str] | None = None
) -> list[EmotionWordStep | None]:
    """Per sample of ``generated`` (``[batch, new]``: the tokens of steps 0, 1, ...), the step of y_k of Eq. 1, the
    first response token that expresses the emotion: the token that completes the first emotion word of the decoded
    answer (:func:`~peft_mose.metrics.emotion_mentions`: vocabulary words and their inflections, not negated, any
    sentence); ``None`` for an answer without one. The word is located by decoding ever longer prefixes."""
    from ..metrics import emotion_mentions

    found: list[EmotionWordStep | None] = []
    for tokens in generated.tolist():
        mentions = emotion_mentions(tokenizer.decode(tokens, skip_special_tokens=True), vocabulary)
        if not mentions:
            found.append(None)
            continue
        decoded = (len(tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)) for k in range(len(tokens)))
        step = next(k for k, length in enumerate(decoded) if length >= mentions[0].end)
        found.append(EmotionWordStep(step, mentions[0].word))
    return found


def _uap_figure(stats: StepDiagnostics, settings: dict[str, Any], what: str) -> Figure:
    layers = sorted(stats.layers)
    x = np.arange(len(layers), dtype=float)
    mean = {name: stats.stacked(name).nanmean(1).numpy() for name in
            ("uap_visual", "uap_audio", "uap_visual_after", "uap_audio_after", "layer_ratio", "heads_changed")}
    changed = mean["heads_changed"] > 0
    fig = Figure(figsize=(max(6.0, 0.45 * len(layers) + 2), 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    width = 0.4
    top.bar(x - width / 2, mean["uap_visual"], width, color=COLORS[Modality.VISUAL], label="UAP$_v$")
    top.bar(x + width / 2, mean["uap_audio"], width, color=COLORS[Modality.AUDIO], label="UAP$_a$")
    if changed.any():
        for offset, name, label in ((-1, "uap_visual_after", "UAP$_v$ after"), (1, "uap_audio_after", "UAP$_a$ after")):
            top.bar(x[changed] + offset * width / 2, mean[name][changed], width, fill=False, hatch="//",
                    edgecolor="black", label=label)
    top.set_ylabel("unimodal attention proportion")
    samples = int(stats.valid.any(1).sum())
    top.set_title(f"{what[0].upper()}{what[1:]}, mean over {samples} sample(s)")
    top.legend(fontsize="small")
    bottom.plot(x, mean["layer_ratio"], "o-", color="black", label="c (Eq. 6)")
    tau = settings.get("tau", math.inf)
    if settings.get("strategy") == "ar" and math.isfinite(tau):
        bottom.axhline(tau, color="red", linestyle="--", label=f"τ = {tau:g}")
    bottom.set_ylabel("audio / visual ratio c")
    heads = bottom.twinx()
    heads.bar(x, mean["heads_changed"], 0.6, color="tab:purple", alpha=0.3, label="heads changed")
    heads.set_ylabel("heads changed (mean)")
    heads.set_ylim(0, max(1.0, float(np.nanmax(mean["heads_changed"], initial=0.0)) * 1.15))
    bottom.set_xticks(x, [str(i) for i in layers])
    bottom.set_xlabel("layer")
    lines, labels = bottom.get_legend_handles_labels()
    more, more_labels = heads.get_legend_handles_labels()
    bottom.legend(lines + more, labels + more_labels, fontsize="small")
    fig.tight_layout()
    return fig


def _token_figure(
    stats: StepDiagnostics, settings: dict[str, Any], sample: int, layers: Sequence[int], what: str
) -> Figure:
    valid = stats.valid[sample]
    modality = stats.modality_ids[sample][valid]
    position = torch.arange(valid.numel())[valid]
    panels = [("before", "token_weights")]
    if any(bool(stats.layers[i].heads_changed[sample] > 0) for i in layers):
        panels.append((f"after {settings.get('strategy', '').upper()}", "token_weights_after"))
    fig = Figure(figsize=(10, 2.6 * len(panels) + 0.6))
    axes = fig.subplots(len(panels), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    colors = [COLORS[Modality(int(m))] for m in modality]
    contiguous = list(layers) == list(range(layers[0], layers[-1] + 1))
    span = f"{layers[0]}-{layers[-1]}" if contiguous else ", ".join(map(str, layers))
    for ax, (title, name) in zip(axes, panels):
        weights = torch.stack([getattr(stats.layers[i], name)[sample] for i in layers]).mean(0)[valid]
        ax.bar(position.tolist(), weights.clamp_min(1e-12).tolist(), width=1.0, color=colors)
        ax.set_yscale("log")
        ax.set_ylabel("attention weight")
        ax.set_title(f"Sample {sample}, {what}, {title}, mean over layers {span} and heads", fontsize="medium")
    handles = [Patch(color=c, label=m.name.lower()) for m, c in COLORS.items() if bool((modality == m).any())]
    axes[0].legend(handles=handles, fontsize="small")
    axes[-1].set_xlabel("token position")
    fig.tight_layout()
    return fig


def _step_name(step: int | None) -> str:
    if step is None:
        return "no step"
    return "first response token" if step == 0 else f"generated step {step}"


def plot_diagnostics(
    diagnostics: ReallocationDiagnostics,
    out_dir: str | Path,
    *,
    samples: Sequence[int] | None = None,
    token_layers: Sequence[int] | None = None,
    step: int | Sequence[int | None] = 0,
) -> list[Path]:
    """Write ``uap_per_layer.png`` (Fig. 3(a): per-layer UAP bars, c and heads changed) and, for each sample,
    ``token_weights_sample<b>.png`` (Fig. 3(b): per-token weights averaged over ``token_layers``, default the middle
    half of the recorded layers), at ``step`` (one for all samples, or one per sample such as each sample's first
    emotion word, :func:`emotion_word_steps`; default samples: those with a step). Returns the paths."""
    if not diagnostics.steps:
        raise ValueError("No layer was recorded: run a forward or generate inside the block with record=True.")
    if isinstance(step, int):
        stats, names, what = diagnostics.step(step), None, _step_name(step)
    else:
        stats, names, what = diagnostics.select_steps(step), [_step_name(s) for s in step], "one step per sample"
    recorded = sorted(stats.layers)
    layers = sorted(token_layers) if token_layers is not None else [recorded[i] for i in middle_layers(len(recorded))]
    missing = sorted(set(layers) - set(recorded))
    if missing:
        raise ValueError(f"`token_layers` {missing} were not recorded; recorded layers: {recorded}.")
    batch = stats.modality_ids.shape[0]
    samples = [b for b in range(batch) if bool(stats.valid[b].any())] if samples is None else list(samples)
    if any(not 0 <= b < batch for b in samples):
        raise ValueError(f"`samples` must be in 0-{batch - 1}, got {samples}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "uap_per_layer.png"]
    _uap_figure(stats, diagnostics.settings, what).savefig(paths[0], dpi=120)
    for b in samples:
        paths.append(out / f"token_weights_sample{b}.png")
        _token_figure(stats, diagnostics.settings, b, layers, what if names is None else names[b]).savefig(
            paths[-1], dpi=120
        )
    return paths


def plot_gate_decisions(
    decisions: GateDecisions, path: str | Path, *, label_names: Sequence[str] | None = None
) -> Path:
    """Write one panel per sample of a call's conflict-gate decisions to ``path`` (e.g. ``gate.png``): the label
    distribution without audio (visual evidence) next to the one without visual tokens (audio evidence), titled with
    their JS divergence and the verdict. ``label_names`` (default: the token ids) name the labels."""
    if decisions.without_audio is None or decisions.without_visual is None:
        raise ValueError("These decisions hold no label distributions (a custom detector's); nothing to draw.")
    without_audio, without_visual = decisions.without_audio.cpu(), decisions.without_visual.cpu()
    batch, count = without_audio.shape
    names = list(label_names) if label_names is not None else [str(i) for i in (decisions.labels or range(count))]
    if len(names) != count:
        raise ValueError(f"`label_names` has {len(names)} names for {count} labels.")
    columns = min(batch, 4)
    rows = -(-batch // columns)
    fig = Figure(figsize=(max(3.0, 0.5 * count + 1.5) * columns, 2.8 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    x, width = np.arange(count, dtype=float), 0.4
    for b, ax in enumerate(axes):
        if b >= batch:
            ax.set_axis_off()
            continue
        ax.bar(x - width / 2, without_audio[b].tolist(), width, color=COLORS[Modality.VISUAL], label="without audio")
        ax.bar(x + width / 2, without_visual[b].tolist(), width, color=COLORS[Modality.AUDIO], label="without visual")
        compared = decisions.compared is None or bool(decisions.compared[b])
        verdict = "conflict: AR" if bool(decisions.conflict[b]) else "consistent" if compared else "not compared"
        divergence = "" if decisions.divergence is None else f", JS {float(decisions.divergence[b]):.3f}"
        ax.set_title(f"sample {b}: {verdict}{divergence}", fontsize="medium")
        ax.set_xticks(x, names, rotation=45 if count > 4 else 0, fontsize="small")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("label probability")
    axes[0].legend(fontsize="small")
    threshold = "" if decisions.threshold is None else f" (JS threshold {decisions.threshold:g})"
    fig.suptitle(f"Conflict gate{threshold}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def load_batch(path: str | Path) -> dict[str, Tensor]:
    """Read a batch file (``.pt`` dict or ``.json`` object) into tensors; ``ValueError`` if a key is missing."""
    path = Path(path)
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
        for key, rows in raw.items():
            lengths = [len(row) if isinstance(row, list) else None for row in rows] if isinstance(rows, list) else []
            if len(set(lengths)) > 1:
                raise ValueError(
                    f"{path}: the rows of `{key}` have different lengths {lengths}: a batch holds rows of one length "
                    "(pad them, with attention_mask 0 on the padding)."
                )
        batch = {
            k: torch.tensor(v, dtype=torch.float32 if k == "inputs_embeds" else torch.long) for k, v in raw.items()
        }
    else:
        batch = torch.load(path, weights_only=True)
    if "modality_ids" not in batch or not ({"input_ids", "inputs_embeds"} & set(batch)):
        raise ValueError(f"{path} must hold `modality_ids` and `input_ids` or `inputs_embeds`; found {sorted(batch)}.")
    unknown = set(batch) - {"modality_ids", "input_ids", "inputs_embeds", "attention_mask"}
    if unknown:
        raise ValueError(f"{path} has unknown keys {sorted(unknown)}.")
    shapes = {k: tuple(v.shape[:2]) for k, v in batch.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{path}: `{'`, `'.join(shapes)}` must all be [batch, seq] of one shape, got {shapes}.")
    return batch


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    if ":" in text:
        start, stop = text.split(":")
        return list(range(int(start), int(stop)))
    return [int(part) for part in text.split(",")]


def _gate_labels(spec: str, tokenizer: Callable[[], Any]) -> tuple[tuple[int, ...], list[str]]:
    """``--gate-labels``: token ids (``"12,40,7"``) as given, else a label set or words, each label's first token
    (:func:`~.gate.label_token_ids`); with the names the plot shows."""
    parts = [part.strip() for part in spec.split(",")]
    if all(part.lstrip("-").isdigit() for part in parts):
        ids = tuple(int(part) for part in parts)
        return ids, [str(i) for i in ids]
    from ..metrics import resolve_labels

    labels = resolve_labels(spec)
    return label_token_ids(tokenizer(), labels), list(labels)


def _parse_step(text: str) -> int | str:
    if text == "emotion":
        return text
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number >= 0 or 'emotion', got {text!r}") from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"expected a step number >= 0 or 'emotion', got {text!r}")
    return step


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Command-line entry point; returns the written paths."""
    parser = argparse.ArgumentParser(prog="python -m peft_mose.attention.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="transformers model directory (or hub id available offline)")
    parser.add_argument("batch", help="batch file (.pt or .json) with modality_ids and input_ids / inputs_embeds")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--adapter", help="PEFT adapter directory (e.g. a saved MoSE adapter) to load on the model")
    parser.add_argument("--strategy", default="ar", choices=["ar", "pai"])
    parser.add_argument("--tau", type=float, help="AR's threshold (default 1)")
    parser.add_argument("--alpha", type=float, help="PAI's factor (default 0.5)")
    parser.add_argument("--pai-mode", choices=["logits", "weights"], help="PAI's mode (default logits)")
    parser.add_argument("--layers", help="layers to intervene on: 'start:stop' or 'i,j,k' (default all)")
    parser.add_argument("--token-layers", help="layers averaged in the per-token plot (default the middle half)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument(
        "--step", default="0", type=_parse_step,
        help="step to plot: N (0: the row producing the first response token, k: the one producing generated token "
        "k) or 'emotion' (per sample, the token completing its first emotion word, y_k of Eq. 1)",
    )  # fmt: skip
    parser.add_argument(
        "--max-new-tokens", type=int,
        help=f"tokens generated greedily while recording (default: none, one forward, for --step 0; else "
        f"{DEFAULT_NEW_TOKENS})",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", help="tokenizer folder decoding the answer for --step emotion and encoding --gate-labels "
        "(default: MODEL)",
    )  # fmt: skip
    parser.add_argument("--gate", choices=["conflict"], help="apply AR only to the samples the conflict gate flags")
    parser.add_argument(
        "--gate-labels", help="the gate's labels: a label set (mer2023, dfew, merr), comma-separated words (their "
        "first tokens) or comma-separated token ids",
    )  # fmt: skip
    parser.add_argument("--gate-threshold", type=float, help="JS divergence above which the gate flags a conflict")
    args = parser.parse_args(argv)
    new_tokens = args.max_new_tokens
    if new_tokens is None:
        new_tokens = 0 if args.step == 0 else DEFAULT_NEW_TOKENS
    if args.step != "emotion" and args.step >= max(new_tokens, 1):
        parser.error(f"--step {args.step} needs --max-new-tokens above it (steps 0 to {max(new_tokens, 1) - 1} exist)")
    if args.step == "emotion" and new_tokens < 1:
        parser.error("--step emotion needs generated tokens: --max-new-tokens >= 1")
    if (args.gate is None) != (args.gate_labels is None) or (args.gate is None and args.gate_threshold is not None):
        parser.error("--gate conflict needs --gate-labels (and --gate-threshold goes with them)")
    if args.gate is not None and args.strategy != "ar":
        parser.error("--gate applies to --strategy ar only")

    def tokenizer() -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.tokenizer or args.model)

    try:
        batch = load_batch(args.batch)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    if "inputs_embeds" in batch:
        batch["inputs_embeds"] = batch["inputs_embeds"].to(getattr(torch, args.dtype))
    gate: dict[str, Any] = {}
    if args.gate is not None:
        gate_labels, label_names = _gate_labels(args.gate_labels, tokenizer)
        gate = dict(gate=args.gate, gate_labels=gate_labels, gate_threshold=args.gate_threshold)
    diagnostics = collect_diagnostics(
        model, batch.pop("modality_ids"), **batch, max_new_tokens=new_tokens, strategy=args.strategy, tau=args.tau,
        alpha=args.alpha, pai_mode=args.pai_mode, layers=_parse_layers(args.layers), **gate,
    )
    step, chosen = args.step, {}
    if step == "emotion":
        found = emotion_word_steps(tokenizer(), diagnostics.generated)
        if all(f is None for f in found):
            raise ValueError(f"No sample's {new_tokens} generated tokens hold an emotion word; give --step N instead.")
        step = [None if f is None else f.step for f in found]
        chosen = {"plotted_steps": step, "emotion_words": [None if f is None else f.word for f in found]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [diagnostics.save_json(out / "diagnostics.json", **chosen)]
    paths += plot_diagnostics(diagnostics, out, token_layers=_parse_layers(args.token_layers), step=step)
    if gate:
        paths.append(plot_gate_decisions(diagnostics.gate_decisions[0], out / "gate.png", label_names=label_names))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
