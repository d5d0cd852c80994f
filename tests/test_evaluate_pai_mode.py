"""recipes/merr_evaluate.py --pai_mode: both PAI variants of Table 7 from the command line, down to the attention
block."""

from __future__ import annotations

import json

import pytest

from mosear_recipes import evaluate_cli
from mosear_recipes.emotion_llama import model as emotion_llama_model
from mosear_recipes.model_choice import Reallocation
from test_evaluate_model import _base_args, checkpoint, weights  # noqa: F401 (module fixtures)


def test_reallocation_options_carry_the_pai_mode():
    reallocation = Reallocation(pai_mode="weights")
    assert reallocation.options("pai")["pai_mode"] == "weights"
    assert reallocation.options("none") is None
    assert Reallocation().pai_mode == "logits"


def test_reallocation_options_of_the_gated_strategy_need_the_gates_options():
    reallocation = Reallocation(tau=0.5)
    gate = {"gate_labels": (10, 20), "gate_threshold": 0.1}
    options = reallocation.options("ar+gate", gate)
    assert options["strategy"] == "ar" and options["tau"] == 0.5
    assert (options["gate"], options["gate_labels"], options["gate_threshold"]) == ("conflict", (10, 20), 0.1)
    with pytest.raises(ValueError, match="'ar\\+gate' needs the gate's options"):
        reallocation.options("ar+gate")


@pytest.mark.parametrize("mode", ["weights", None])
def test_pai_mode_reaches_the_attention_block_and_the_scores(
    tiny, checkpoint, tmp_path, monkeypatch, mode  # noqa: F811
):
    calls = []
    block = emotion_llama_model.attention_reallocation

    def recording_block(*args, **options):
        calls.append(options)
        return block(*args, **options)

    monkeypatch.setattr(emotion_llama_model, "attention_reallocation", recording_block)
    out = tmp_path / "out"
    extra = ["--pai_mode", mode] if mode else []
    argv = _base_args(tiny, out, "--projector_checkpoint", str(checkpoint), "--scoring", "recognition",
                      "--strategies", "none,pai", "--alpha", "2", "--max_new_tokens", "2", *extra)  # fmt: skip
    assert evaluate_cli.main(argv) == 0
    expected = mode or "logits"
    assert calls and all(c["strategy"] == "pai" and c["pai_mode"] == expected and c["alpha"] == 2 for c in calls)
    summary = json.loads((out / "scores.json").read_text())
    assert summary[1]["settings"]["generation"]["pai_mode"] == expected
    assert "pai_mode" not in summary[0]["settings"]["generation"]


def test_an_unknown_pai_mode_is_refused_before_anything_runs(tiny, checkpoint, tmp_path, capsys):  # noqa: F811
    argv = _base_args(tiny, tmp_path / "out", "--projector_checkpoint", str(checkpoint), "--pai_mode", "heads")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(argv)
    assert exit_info.value.code == 2
    assert "argument --pai_mode: invalid choice: 'heads' (choose from 'logits', 'weights')" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
