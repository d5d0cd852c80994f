"""The conflict gate of attention reallocation (issue #16) on tiny random Llamas: the probe against a slow per-sample
reference, AR only on flagged samples (the others bit-identical to no AR), batch against per-sample runs, MoSE and
plain models, custom detectors, samples without a modality, per-call decisions, option errors and the plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import get_peft_model

from conftest import VOCAB, cache_of, make_tiny_llama
from peft_mose import Modality, MoSEConfig
from peft_mose.attention import (
    GateDecisions,
    GateInputs,
    LabelConflictDetector,
    attention_reallocation,
    label_token_ids,
    plot_gate_decisions,
)
from peft_mose.attention.plot import main as plot_main
from test_ar_backend import make_batch
from test_ar_diagnostics import PNG
from test_ar_steps import word_tokenizer

LABELS = (10, 20, 30, 40)
GEN = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
CONFLICT_SEED = 7
"""Seed of :func:`conflict_batch` whose two differing samples the probe flags (checked in the tests that use it)."""


def gated(model, modality_ids=None, **options):
    return attention_reallocation(model, modality_ids, tau=0.0, gate="conflict", gate_labels=LABELS, **options)


def conflict_batch(model, seed=CONFLICT_SEED, batch=4, seq=12):
    """Prompts of embeddings: text, five visual tokens, one audio token, text. In samples 1 and 3 the audio token
    has the visual tokens' embedding (nothing to disagree about); in samples 0 and 2 its own random embedding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, seq), int(Modality.TEXT))
    ids[:, 2:7] = int(Modality.VISUAL)
    ids[:, 7] = int(Modality.AUDIO)
    embeds = model.get_input_embeddings().weight.detach()[torch.randint(3, VOCAB, (batch, seq), generator=gen)].clone()
    for b in range(batch):
        visual = torch.randn(embeds.shape[-1], generator=gen) * 0.1
        embeds[b, 2:7] = visual
        embeds[b, 7] = visual if b % 2 else torch.randn(embeds.shape[-1], generator=gen) * 0.1
    return embeds, ids


def reference_decisions(model, ids, mask, mods, threshold, **call):
    """The probe by hand, one sample at a time: the sample's real tokens alone, two forwards with the audio (then
    visual) positions zeroed in the attention mask and positions 0..n-1, the label logits of the last prompt row,
    softmax and JS divergence in float64 Python arithmetic."""
    decisions = []
    for b in range(len(ids)):
        keep = mask[b].bool()
        tokens, kinds = ids[b][keep][None], mods[b][keep][None]
        positions = torch.arange(tokens.shape[1])[None]
        last = int(torch.nonzero(kinds[0] != int(Modality.ANSWER)).max())
        dists = []
        for masked in (Modality.AUDIO, Modality.VISUAL):
            attention = (kinds != int(masked)).long()
            extra = {name: value[b : b + 1][:, keep] for name, value in call.items()}
            with torch.no_grad():
                logits = model(input_ids=tokens, attention_mask=attention, position_ids=positions, **extra).logits
            row = [float(logits[0, last, i].double()) for i in LABELS]
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            dists.append([e / sum(exps) for e in exps])
        p, q = dists
        m = [(x + y) / 2 for x, y in zip(p, q)]
        js = 0.5 * sum(x * math.log(x / z) for x, z in zip(p, m)) + 0.5 * sum(y * math.log(y / z) for y, z in zip(q, m))
        top_p, top_q = p.index(max(p)), q.index(max(q))
        compared = bool((kinds == int(Modality.VISUAL)).any() and (kinds == int(Modality.AUDIO)).any())
        conflict = compared and (top_p != top_q or js > threshold)
        decisions.append(dict(p=p, q=q, js=js, top=(top_p, top_q), compared=compared, conflict=conflict))
    return decisions


def assert_matches_reference(decisions, expected):
    assert decisions.conflict.tolist() == [e["conflict"] for e in expected]
    assert decisions.compared.tolist() == [e["compared"] for e in expected]
    assert decisions.top_without_audio.tolist() == [e["top"][0] for e in expected]
    assert decisions.top_without_visual.tolist() == [e["top"][1] for e in expected]
    def column(key: str) -> torch.Tensor:
        return torch.tensor([e[key] for e in expected], dtype=torch.float64)

    torch.testing.assert_close(decisions.without_audio, column("p"), atol=1e-5, rtol=0)
    torch.testing.assert_close(decisions.without_visual, column("q"), atol=1e-5, rtol=0)
    torch.testing.assert_close(decisions.divergence, column("js"), atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_probe_matches_a_slow_per_sample_reference(side):
    model = make_tiny_llama()
    ids, mask, mods = make_batch(side=side)
    with gated(model, mods, gate_threshold=0.001) as run:
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, **GEN)  # generate passes its own position_ids
            model(ids, attention_mask=mask)  # a forward: positions counted over the real tokens
    assert len(run.gate_decisions) == 2
    expected = reference_decisions(model, ids, mask, mods, threshold=0.001)
    assert any(e["conflict"] for e in expected) and not all(e["conflict"] for e in expected)
    for decisions in run.gate_decisions:
        assert_matches_reference(decisions, expected)
        assert decisions.labels == LABELS and decisions.threshold == 0.001


def test_only_flagged_samples_get_ar_and_the_others_are_bit_identical_to_no_ar():
    model = make_tiny_llama()
    embeds, mods = conflict_batch(model)
    with torch.no_grad():
        base = model(inputs_embeds=embeds).logits
        base_gen = model.generate(inputs_embeds=embeds, **GEN)
        with gated(model, mods) as run:
            out = model(inputs_embeds=embeds).logits
            out_gen = model.generate(inputs_embeds=embeds, **GEN)
        with attention_reallocation(model, mods, tau=0.0):
            ungated = model(inputs_embeds=embeds).logits
    flags = [True, False, True, False]
    assert [d.conflict.tolist() for d in run.gate_decisions] == [flags, flags]
    # the probe saw what was constructed: identical embeddings agree, different ones disagree on the top label
    first = run.gate_decisions[0]
    assert torch.equal(first.top_without_audio[1::2], first.top_without_visual[1::2])
    assert not torch.equal(first.top_without_audio[0::2], first.top_without_visual[0::2])
    for b, flagged in enumerate(flags):
        if flagged:
            assert (out[b, -1] - base[b, -1]).abs().amax() > 1e-4
            torch.testing.assert_close(out[b], ungated[b])  # exactly the ungated AR of that sample
        else:
            assert torch.equal(out[b], base[b])
            assert all(torch.equal(s[b], t[b]) for s, t in zip(out_gen.scores, base_gen.scores))
    assert torch.equal(out_gen.sequences[1::2], base_gen.sequences[1::2])


def test_a_mixed_batch_generates_what_each_sample_generates_alone():
    model = make_tiny_llama()
    embeds, mods = conflict_batch(model)
    with torch.no_grad(), gated(model, mods) as run:
        batched = model.generate(inputs_embeds=embeds, **GEN)
    assert run.gate_decisions[0].conflict.tolist() == [True, False, True, False]
    for b in range(len(embeds)):
        with torch.no_grad(), gated(model, mods[b : b + 1]) as alone_run:
            alone = model.generate(inputs_embeds=embeds[b : b + 1], **GEN)
        assert alone_run.gate_decisions[0].conflict.tolist() == [b % 2 == 0]
        assert torch.equal(batched.sequences[b : b + 1], alone.sequences)
        for step_batched, step_alone in zip(batched.scores, alone.scores):
            torch.testing.assert_close(step_batched[b : b + 1], step_alone, atol=1e-4, rtol=1e-4)


def make_mose():
    config = MoSEConfig(r=8, n_experts=2, eps=0.3, init_weights=False, lora_dropout=0.0)
    return get_peft_model(make_tiny_llama(), config).eval()


def test_mose_model_gets_the_gate_per_call_and_keeps_its_routing():
    mose = make_mose()
    ids, mask, mods = make_batch()
    with torch.no_grad():
        base = mose(input_ids=ids, attention_mask=mask, modality_ids=mods).logits
        base_lambda = {k: v["lambda"] for k, v in mose.base_model.routing_stats().items()}
        base_gen = mose.generate(input_ids=ids, attention_mask=mask, modality_ids=mods, **GEN)
        with gated(mose) as run:
            out = mose(input_ids=ids, attention_mask=mask, modality_ids=mods).logits
            out_lambda = {k: v["lambda"] for k, v in mose.base_model.routing_stats().items()}
            out_gen = mose.generate(input_ids=ids, attention_mask=mask, modality_ids=mods, **GEN)
    expected = reference_decisions(mose, ids, mask, mods, threshold=0.05, modality_ids=mods)
    assert len(run.gate_decisions) == 2
    for decisions in run.gate_decisions:
        assert_matches_reference(decisions, expected)
    flags = run.gate_decisions[0].conflict
    assert flags.any() and not flags.all()
    for b, flagged in enumerate(flags.tolist()):
        if flagged:
            assert (out[b] - base[b]).abs().amax() > 1e-4
        else:
            assert torch.equal(out[b], base[b])
            assert all(torch.equal(s[b], t[b]) for s, t in zip(out_gen.scores, base_gen.scores))
    # the probes (which route the masked prompts) left the call's router weights alone
    first_layer = min(base_lambda)
    assert torch.equal(out_lambda[first_layer], base_lambda[first_layer])


def test_plain_model_forward_with_eager_attention_and_recording():
    model = make_tiny_llama()
    model.set_attn_implementation("eager")
    embeds, mods = conflict_batch(model)
    with torch.no_grad():
        base = model(inputs_embeds=embeds).logits
        with gated(model, mods, record=True) as run:
            out = model(inputs_embeds=embeds).logits
    assert run.gate_decisions[0].conflict.tolist() == [True, False, True, False]
    assert run.diagnostics.settings["gate"] == {"detector": "conflict", "labels": list(LABELS), "threshold": 0.05}
    assert sorted(run.diagnostics.steps) == [0]  # the probes recorded nothing
    heads = run.diagnostics.stacked("heads_changed")
    assert (heads[:, 1::2] == 0).all() and (heads[:, 0::2] > 0).any()
    assert torch.equal(out[1::2], base[1::2])
    assert (out[0::2, -1] - base[0::2, -1]).abs().amax() > 1e-4


def test_a_custom_detector_sees_the_prompt_with_ar_off():
    model = make_tiny_llama()
    ids, mask, mods = make_batch()
    seen = []

    def first_sample_only(inputs: GateInputs) -> GateDecisions:
        seen.append((inputs, inputs.response_logits(inputs.valid)))
        return GateDecisions(conflict=torch.arange(len(inputs.valid)) == 0)

    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        with attention_reallocation(model, mods, tau=0.0, gate=first_sample_only) as run:
            out = model(input_ids=ids, attention_mask=mask).logits
    inputs, logits = seen[0]
    assert torch.equal(inputs.inputs["input_ids"], ids) and torch.equal(inputs.modality_ids, mods)
    assert torch.equal(inputs.valid, mask.bool()) and inputs.response_rows.tolist() == [13, 13, 13]
    torch.testing.assert_close(logits, base[:, -1], atol=1e-5, rtol=1e-5)  # its forward ran without AR
    assert run.gate_decisions[0].conflict.tolist() == [True, False, False]
    assert torch.equal(out[1:], base[1:]) and (out[0] - base[0]).abs().amax() > 1e-4
    assert run.settings.gate is first_sample_only


def test_samples_without_audio_or_visual_tokens_are_never_in_conflict():
    model = make_tiny_llama()
    ids, mask, mods = make_batch()
    mods[1][mods[1] == int(Modality.AUDIO)] = int(Modality.TEXT)
    mods[2][mods[2] == int(Modality.VISUAL)] = int(Modality.TEXT)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        with gated(model, mods, gate_threshold=0.0) as run:  # threshold 0: any difference is a conflict
            out = model(input_ids=ids, attention_mask=mask).logits
    decisions = run.gate_decisions[0]
    assert decisions.compared.tolist() == [True, False, False]
    assert decisions.conflict.tolist() == [True, False, False]
    assert torch.equal(out[1:], base[1:])


def test_decisions_are_made_afresh_for_every_call():
    model = make_tiny_llama()
    embeds, mods = conflict_batch(model)
    swapped = embeds[[1, 0, 3, 2]]
    with torch.no_grad(), gated(model, mods) as run:
        model(inputs_embeds=embeds)
        model.generate(inputs_embeds=swapped, **GEN)
    with torch.no_grad(), gated(model, mods) as alone:
        model.generate(inputs_embeds=swapped, **GEN)
    flags = [d.conflict.tolist() for d in run.gate_decisions]
    assert flags == [[True, False, True, False], [False, True, False, True]]
    torch.testing.assert_close(run.gate_decisions[1].divergence, alone.gate_decisions[0].divergence)

    mose = make_mose()
    ids, mask, mods = make_batch()
    with torch.no_grad(), gated(mose) as run:
        out = mose(input_ids=ids, attention_mask=mask, modality_ids=mods, use_cache=True)
        assert mose.base_model.scope.open_context() is None
        mose.generate(input_ids=ids[2:], attention_mask=mask[2:], modality_ids=mods[2:], **GEN)  # another batch
        with pytest.raises(ValueError, match="continues a KV cache"):
            mose(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), **cache_of(out))
    assert [len(d.conflict) for d in run.gate_decisions] == [3, 1]
    assert run.gate_decisions[1].conflict.tolist() == run.gate_decisions[0].conflict[2:].tolist()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(gate="chase", gate_labels=LABELS), r"Unknown gate 'chase'"),
        (dict(gate="conflict"), r"needs `gate_labels`"),
        (dict(gate="conflict", gate_labels=LABELS, gate_threshold=-0.1), r"must be in \[0, ln 2"),
        (dict(gate="conflict", gate_labels=LABELS, gate_threshold=0.7), r"must be in \[0, ln 2"),
        (dict(gate="conflict", gate_labels=LABELS, gate_threshold=math.nan), r"must be in \[0, ln 2"),
        (dict(gate="conflict", gate_labels=LABELS, gate_threshold="high"), r"must be a number"),
        (dict(gate="conflict", gate_labels=[]), r"at least two label token ids"),
        (dict(gate="conflict", gate_labels=[7]), r"at least two label token ids"),
        (dict(gate="conflict", gate_labels=[7, 9, 7]), r"repeats token id\(s\) \[7\]"),
        (dict(gate="conflict", gate_labels=[7, VOCAB]), rf"token id {VOCAB}, outside the model's vocabulary"),
        (dict(gate="conflict", gate_labels=[7, -1]), r"ints >= 0"),
        (dict(gate="conflict", gate_labels=LABELS, strategy="pai"), r"strategy='ar' only"),
        (dict(gate_labels=LABELS), r"configure gate='conflict'"),
        (dict(gate=lambda inputs: None, gate_threshold=0.1), r"configure gate='conflict'"),
    ],
)
def test_bad_gate_options_are_refused(llama, options, message):
    with pytest.raises(ValueError, match=message):
        with attention_reallocation(llama, make_batch()[2], **options):
            pass
    assert llama.config._attn_implementation == "sdpa"


def test_a_detector_returning_bad_decisions_is_refused(llama):
    ids, mask, mods = make_batch()
    for wrong, message in [(None, "must return GateDecisions"), (GateDecisions(torch.ones(2, dtype=torch.bool)),
                                                                "shape \\(3,\\), got torch.bool \\(2,\\)")]:
        with torch.no_grad(), attention_reallocation(llama, mods, gate=lambda inputs, w=wrong: w):
            with pytest.raises(ValueError, match=message):
                llama(input_ids=ids, attention_mask=mask)


def test_label_token_ids():
    tokenizer = word_tokenizer({10: "happy", 20: "sad", 30: "very", 40: "angry"})
    assert label_token_ids(tokenizer, ["happy", "sad", "angry"]) == (10, 20, 40)
    assert label_token_ids(tokenizer, ["very happy", "sad"]) == (30, 20)
    with pytest.raises(ValueError, match=r"Labels 'very happy' and 'very sad' share their first token \(id 30\)"):
        label_token_ids(tokenizer, ["very happy", "very sad"])
    with pytest.raises(ValueError, match=r"Label ' ' is empty"):
        label_token_ids(tokenizer, ["happy", " "])
    with pytest.raises(ValueError, match="at least two"):
        label_token_ids(tokenizer, [])
    assert LabelConflictDetector([10, 20]).labels == (10, 20)


def test_decisions_are_json_friendly_and_plotted(tmp_path):
    model = make_tiny_llama()
    embeds, mods = conflict_batch(model)
    with torch.no_grad(), gated(model, mods) as run:
        model(inputs_embeds=embeds)
    decisions = run.gate_decisions[0]
    data = json.loads(json.dumps(decisions.to_dict()))
    assert data["conflict"] == [True, False, True, False] and data["labels"] == list(LABELS)
    path = plot_gate_decisions(decisions, tmp_path / "gate.png", label_names=["happy", "sad", "angry", "neutral"])
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="3 names for 4 labels"):
        plot_gate_decisions(decisions, tmp_path / "x.png", label_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="no label distributions"):
        plot_gate_decisions(GateDecisions(conflict=decisions.conflict), tmp_path / "y.png")


@pytest.mark.parametrize("labels", ["10,20,30,40", "happy,sad,angry,neutral"])
def test_plot_command_runs_the_gate_and_draws_its_decisions(tmp_path, labels):
    model_dir, batch_file = tmp_path / "model", tmp_path / "batch.pt"
    model = make_tiny_llama()
    model.save_pretrained(model_dir)
    word_tokenizer({10: "happy", 20: "sad", 30: "angry", 40: "neutral"}).save_pretrained(model_dir)
    embeds, mods = conflict_batch(model)
    torch.save({"inputs_embeds": embeds, "modality_ids": mods}, batch_file)
    out = tmp_path / "plots"
    paths = plot_main([str(model_dir), str(batch_file), "--out", str(out), "--tau", "0", "--gate", "conflict",
                       "--gate-labels", labels, "--gate-threshold", "0.05"])  # fmt: skip
    assert (out / "gate.png") in paths and (out / "gate.png").read_bytes()[:8] == PNG
    data = json.loads((out / "diagnostics.json").read_text())
    (decisions,) = data["gate_decisions"]
    assert decisions["conflict"] == [True, False, True, False] and decisions["labels"] == list(LABELS)
    assert data["settings"]["gate"] == {"detector": "conflict", "labels": list(LABELS), "threshold": 0.05}


@pytest.mark.parametrize("options, message", [
    (["--gate", "conflict"], "--gate conflict needs --gate-labels"),
    (["--gate-threshold", "0.1"], "--gate conflict needs --gate-labels"),
    (["--gate", "conflict", "--gate-labels", "10,20", "--strategy", "pai"], "--strategy ar only"),
])  # fmt: skip
def test_plot_command_rejects_incomplete_gate_options(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit):
        plot_main([str(tmp_path), str(tmp_path / "batch.pt"), "--out", str(tmp_path), *options])
    assert message in capsys.readouterr().err
