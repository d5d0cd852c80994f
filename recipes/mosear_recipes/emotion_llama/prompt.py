"""Emotion-LLaMA's sequence layout, used for training and generation alike::

    [BOS] "[INST] <video>" IMG x256 "</video> <feature>" FACE VIDEO AUDIO x K CLS
    "</feature> The person in video says: {subtitle}.  [{task}] {instruction}  [/INST]" answer </s>

Text segments are tokenized separately without special tokens. Modalities: BOS and prompt text TEXT; IMG, FACE,
VIDEO and CLS VISUAL; AUDIO (repeated ``audio_repeat`` = K times, 1 in Emotion-LLaMA) AUDIO; answer and ``</s>``
ANSWER (see :class:`peft_mose.Modality`).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from peft_mose import Modality
from peft_mose.layout import Segment, SegmentRow, encode_segments

HEAD = "[INST] <video>"
MIDDLE = "</video> <feature>"


def prompt_tail(subtitle: str, task: str, instruction: str) -> str:
    """The text after the feature tokens, as the original builds it from its instruction template."""
    return f"</feature> The person in video says: {subtitle}.  [{task}] {instruction}  [/INST]"


class PromptEncoder:
    """Tokenizes one sample into the layout above (a :class:`~peft_mose.layout.SegmentRow`)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        n_patch_tokens: int = 256,
        audio_repeat: int = 1,
        max_answer_tokens: int = 1024,
    ) -> None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"The tokenizer has no {name[:-3]}; Emotion-LLaMA needs bos, eos and pad tokens.")
        if n_patch_tokens < 1 or audio_repeat < 1 or max_answer_tokens < 1:
            raise ValueError(
                "n_patch_tokens, audio_repeat and max_answer_tokens must be >= 1, got "
                f"{n_patch_tokens}, {audio_repeat}, {max_answer_tokens}."
            )
        self.tokenizer = tokenizer
        self.n_patch_tokens = n_patch_tokens
        self.audio_repeat = audio_repeat
        self.max_answer_tokens = max_answer_tokens
        self._head = self._ids(HEAD)
        self._middle = self._ids(MIDDLE)

    @property
    def n_multimodal_tokens(self) -> int:
        return self.n_patch_tokens + 3 + self.audio_repeat

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def segments(self, subtitle: str, task: str, instruction: str, answer: str | None = None) -> list[Segment]:
        """The sample's segments; without ``answer`` the prompt only (for generation)."""
        segments: list[Segment] = [
            (Modality.TEXT, [self.tokenizer.bos_token_id]),
            (Modality.TEXT, self._head),
            (Modality.VISUAL, self.n_patch_tokens),
            (Modality.TEXT, self._middle),
            (Modality.VISUAL, 2),
            (Modality.AUDIO, self.audio_repeat),
            (Modality.VISUAL, 1),
            (Modality.TEXT, self._ids(prompt_tail(subtitle, task, instruction))),
        ]
        if answer is not None:
            answer_ids = self._ids(answer)[: self.max_answer_tokens - 1]
            segments.append((Modality.ANSWER, answer_ids + [self.tokenizer.eos_token_id]))
        return segments

    def encode(self, subtitle: str, task: str, instruction: str, answer: str | None = None) -> SegmentRow:
        """Token ids (multimodal slots hold the pad id), labels and modality ids of one sample."""
        return encode_segments(self.segments(subtitle, task, instruction, answer), self.tokenizer.pad_token_id)
