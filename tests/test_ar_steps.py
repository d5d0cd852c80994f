"""Diagnostics per generated step (Eq. 1 at y_k): every decode step recorded against the eager model's own
attentions, the first-token view unchanged, cached / uncached / static generation, one step per sample, the step of
the first emotion word, and the plot command's --step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import VOCAB, make_tiny_llama
from peft_mose import Modality
from peft_mose.attention import attention_reallocation, collect_diagnostics, emotion_word_steps, plot_diagnostics
from peft_mose.attention.plot import main as plot_main
from test_ar_backend import make_batch
from test_ar_diagnostics import PNG, eager_llama  # noqa: F401 (a fixture)

NEW = 4


def record_generation(model, tau, **generate):
    ids, mask, mods = make_batch()
    with torch.no_grad(), attention_reallocation(model, mods, tau=tau, record=True) as run:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             return_dict_in_generate=True, **generate)  # fmt: skip
    return run.diagnostics, out, (ids, mask, mods)


@pytest.mark.parametrize("tau", [math.inf, 0.0])
def test_every_step_matches_the_eager_models_own_attention(eager_llama, tau):
    diag, out, (ids, mask, mods) = record_generation(eager_llama, tau, output_attentions=True)
    assert sorted(diag.steps) == list(range(NEW))
    for step in range(NEW):
        stats = diag.step(step)
        k_len = ids.shape[1] + step
        valid = torch.cat([mask.bool(), torch.ones(len(ids), step, dtype=torch.bool)], 1)
        assert torch.equal(stats.valid, valid)
        expected_ids = torch.cat([mods, torch.full((len(ids), step), int(Modality.ANSWER))], 1)
        assert torch.equal(stats.modality_ids, expected_ids)
        visual, audio = valid & (expected_ids == Modality.VISUAL), valid & (expected_ids == Modality.AUDIO)
        for layer, weights in enumerate(out.attentions[step]):
            row = weights[:, :, -1].double()  # eager returns the (reallocated) weights of the generating row
            rec = stats.layers[layer]
            assert rec.token_weights_after.shape == (len(ids), k_len)
            torch.testing.assert_close(rec.token_weights_after.double(), row.mean(1), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(rec.uap_visual_after.double(), (row * visual[:, None]).sum(-1).mean(1),
                                       atol=1e-6, rtol=1e-5)  # fmt: skip
            torch.testing.assert_close(rec.uap_audio_after.double(), (row * audio[:, None]).sum(-1).mean(1),
                                       atol=1e-6, rtol=1e-5)  # fmt: skip
            if math.isinf(tau):
                assert torch.equal(rec.token_weights, rec.token_weights_after) and (rec.heads_changed == 0).all()
    if tau == 0.0:
        assert any(bool((s.layers[i].heads_changed > 0).any()) for s in diag.steps.values() for i in s.layers)


def test_the_first_token_view_is_step_zero_and_equals_a_single_forward(eager_llama):
    diag, _, (ids, mask, mods) = record_generation(eager_llama, 0.0)
    single = collect_diagnostics(eager_llama, mods, input_ids=ids, attention_mask=mask, tau=0.0)
    assert sorted(single.steps) == [0] and diag.layers is diag.steps[0].layers
    assert torch.equal(diag.modality_ids, single.modality_ids) and torch.equal(diag.valid, single.valid)
    for layer, rec in single.layers.items():
        torch.testing.assert_close(diag.layers[layer].uap_audio, rec.uap_audio)
        torch.testing.assert_close(diag.stacked("token_weights")[layer], single.stacked("token_weights", step=0)[layer])
    data = json.loads(json.dumps(diag.to_dict()))
    assert [s["step"] for s in data["steps"]] == list(range(NEW))
    assert data["layers"] == data["steps"][0]["layers"] and len(data["steps"][3]["valid"][0]) == ids.shape[1] + 3
    with pytest.raises(ValueError, match=r"Step 9 was not recorded; recorded steps: \[0, 1, 2, 3\]"):
        diag.step(9)


@pytest.mark.parametrize("generate", [dict(use_cache=False), dict(cache_implementation="static")])
def test_uncached_and_static_cache_generation_record_the_same_steps(eager_llama, generate):
    cached, _, _ = record_generation(eager_llama, 0.0)
    other, _, _ = record_generation(eager_llama, 0.0, **generate)
    assert sorted(other.steps) == sorted(cached.steps)
    for step, stats in cached.steps.items():
        again = other.step(step)
        k_len = stats.valid.shape[1]
        assert not again.valid[:, k_len:].any()  # a static cache's later slots are not attendable
        # transformers gives a static cache's forwards a 4-D mask only, so its left padding counts as valid there
        assert torch.equal(again.valid[:, :k_len], stats.valid) or "cache_implementation" in generate
        assert (again.valid[:, :k_len] | ~stats.valid).all()
        for layer, rec in stats.layers.items():
            torch.testing.assert_close(again.layers[layer].uap_visual_after, rec.uap_visual_after, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(again.layers[layer].token_weights[:, :k_len], rec.token_weights, atol=1e-5,
                                       rtol=1e-4)  # fmt: skip


def test_one_step_per_sample_and_plots_at_a_step(eager_llama, tmp_path):
    diag, _, (ids, _, _) = record_generation(eager_llama, 0.0)
    chosen = diag.select_steps([2, None, 0])
    assert chosen.modality_ids.shape == chosen.valid.shape == (3, ids.shape[1] + 2)
    for layer, rec in chosen.layers.items():
        assert rec.uap_visual[0] == diag.step(2).layers[layer].uap_visual[0]
        assert rec.uap_visual[2] == diag.step(0).layers[layer].uap_visual[2] and math.isnan(rec.uap_visual[1])
        assert torch.equal(rec.token_weights[2, : ids.shape[1]], diag.step(0).layers[layer].token_weights[2])
    assert torch.equal(chosen.valid[0], diag.step(2).valid[0]) and not chosen.valid[1].any()
    assert not chosen.valid[2, ids.shape[1] :].any()
    paths = plot_diagnostics(diag, tmp_path / "per_sample", step=[2, None, 0])
    assert [p.name for p in paths] == ["uap_per_layer.png", "token_weights_sample0.png", "token_weights_sample2.png"]
    paths = plot_diagnostics(diag, tmp_path / "step3", step=3)
    assert len(paths) == 4 and all(p.read_bytes().startswith(PNG) for p in paths)
    with pytest.raises(ValueError, match="one step"):
        diag.select_steps([1, 2])
    with pytest.raises(ValueError, match="every entry is None"):
        diag.select_steps([None, None, None])


class PieceTokenizer:
    """Decodes ids to the concatenation of sub-word pieces (id 0 is a special token), like sentencepiece does."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids if i or not skip_special_tokens).strip()


def test_emotion_step_is_the_token_completing_the_first_emotion_word():
    pieces = ["</s>", "She", " is", " not", " happ", "ier", " now", " mad", "e", " sad", "dened", ",", " calm"]
    tokenizer = PieceTokenizer(pieces)
    generated = torch.tensor([
        [1, 2, 4, 5, 6, 0, 0],     # "She is happier now": the word is complete at "ier" (step 3)
        [1, 7, 8, 2, 3, 4, 5],     # "She made is not happier": "made" is no "mad", the only word is negated
        [1, 2, 9, 10, 11, 12, 0],  # "She is saddened, calm": "sad" + "dened" (step 3) before "calm"
    ])  # fmt: skip
    found = emotion_word_steps(tokenizer, generated)
    assert found[0] == (3, "happy") and found[1] is None and found[2] == (3, "sad")
    assert emotion_word_steps(tokenizer, generated[2:], vocabulary={"calm"}) == [(5, "calm")]


def word_tokenizer(words: dict[int, str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for the tiny test model's ids: <pad>, <s>, </s>, then ``words`` or w<id>."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{words.get(i, f"w{i}"): i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_plot_command_plots_each_samples_first_emotion_word_or_a_given_step(tmp_path):
    model_dir, batch_file = tmp_path / "model", tmp_path / "batch.pt"
    model = make_tiny_llama()
    model.save_pretrained(model_dir)
    ids, mask, mods = make_batch()
    torch.save({"input_ids": ids, "attention_mask": mask, "modality_ids": mods}, batch_file)
    generated = collect_diagnostics(model, mods, input_ids=ids, attention_mask=mask, max_new_tokens=6).generated
    # The token sample 0 generates at step 2 reads "happier"; every other token is a neutral word.
    target = int(generated[0, 2])
    word_tokenizer({target: "happier"}).save_pretrained(model_dir)
    expected = [next((k for k, t in enumerate(row) if t == target), None) for row in generated.tolist()]

    out = tmp_path / "emotion"
    paths = plot_main([str(model_dir), str(batch_file), "--out", str(out), "--step", "emotion",
                       "--max-new-tokens", "6", "--tau", "0"])  # fmt: skip
    data = json.loads((out / "diagnostics.json").read_text())
    assert data["plotted_steps"] == expected and expected[0] <= 2
    assert data["emotion_words"] == [None if k is None else "happy" for k in expected]
    assert data["generated"] == generated.tolist() and len(data["steps"]) == 6
    shown = {f"token_weights_sample{b}.png" for b, k in enumerate(expected) if k is not None}
    assert {p.name for p in paths} == {"diagnostics.json", "uap_per_layer.png"} | shown

    out = tmp_path / "step4"
    plot_main([str(model_dir), str(batch_file), "--out", str(out), "--step", "4", "--max-new-tokens", "5"])
    data = json.loads((out / "diagnostics.json").read_text())
    assert "plotted_steps" not in data and [s["step"] for s in data["steps"]] == [0, 1, 2, 3, 4]
    with pytest.raises(SystemExit):
        plot_main([str(model_dir), str(batch_file), "--out", str(out), "--step", "5", "--max-new-tokens", "5"])
    with pytest.raises(SystemExit):
        plot_main([str(model_dir), str(batch_file), "--out", str(out), "--step", "-1"])
    word_tokenizer({}).save_pretrained(model_dir)
    with pytest.raises(ValueError, match="hold an emotion word"):
        plot_main([str(model_dir), str(batch_file), "--out", str(out), "--step", "emotion", "--max-new-tokens", "2"])
