"""recipes/merr_evaluate.py in model-running mode with the base model (Emotion-LLaMA from an original .pth, its LoRA
included), AR on a model without MoSE, the reasoning task, and the model-mode option errors. Runs of
recipes/merr_finetune.py are evaluated in tests/test_recipe_finetune.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_mose import Modality
from peft_mose.attention import attention_reallocation
from peft_mose.layout import prompt_only
from mosear_recipes import evaluate_cli
from mosear_recipes.emotion_llama.baseline import load_baseline
from mosear_recipes.emotion_llama.checkpoint import ORIGINAL_TO_OURS, load_lora_checkpoint, save_projectors
from mosear_recipes.emotion_llama.model import EmotionLlama, load_llm
from mosear_recipes.emotion_llama.projectors import EmotionLlamaProjectors
from mosear_recipes.merr.collator import MERRCollator
from mosear_recipes.merr.dataset import MERRDataset
from mosear_recipes.merr.readers import read_annotations
from mosear_recipes.merr.synthetic import SUBSETS
from mosear_recipes.merr.tasks import REASON_INSTRUCTIONS

# Emotion-LLaMA's LoRA, written out here rather than taken from the loader under test.
LORA = LoraConfig(r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def weights(tiny) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random projector weights (our names) and LoRA weights (PEFT's names, B non-zero) for the tiny model."""
    torch.manual_seed(3)
    projectors = EmotionLlamaProjectors.from_spec(tiny.data.spec, 64).state_dict()
    state = get_peft_model(load_llm(tiny.model_dir), LORA).state_dict()
    lora = {k: torch.randn_like(v) * 0.1 for k, v in state.items() if ".lora_" in k}
    return projectors, lora


@pytest.fixture(scope="module")
def checkpoint(tiny, weights, tmp_path_factory) -> Path:
    """An Emotion-LLaMA .pth in the original layout: projectors, the LoRA of layer 0 as peft 0.2.0 saved it (no
    adapter name) and of layer 1 as later peft versions do, a RoPE buffer and one unknown LLM key."""
    projectors, lora = weights
    ours_to_original = {ours: original for original, ours in ORIGINAL_TO_OURS.items()}
    state = {f"{ours_to_original[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in projectors.items()}
    for key, tensor in lora.items():
        state["llama_model." + (key.replace(".default", "") if ".layers.0." in key else key)] = tensor
    state["llama_model.base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    state["llama_model.base_model.model.model.norm.weight"] = torch.ones(64)
    path = tmp_path_factory.mktemp("checkpoint") / "emotion_llama.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 29}, path)
    return path


def _base_args(tiny, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(tiny.model_dir), "--data_root", str(tiny.data.root), "--out_dir", str(out),
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def recognition_run(tiny, checkpoint, tmp_path_factory) -> Path:
    """The base model's recognition evaluation, with and without AR (AR asked first: it is still compared with the
    plain model's answers, generated first)."""
    out = tmp_path_factory.mktemp("recognition")
    argv = _base_args(tiny, out, "--projector_checkpoint", str(checkpoint), "--scoring", "recognition",
                      "--strategies", "ar,none", "--tau", "0", "--max_new_tokens", "3")  # fmt: skip
    assert evaluate_cli.main(argv) == 0
    return out


def _batch(tiny, encoder, task: str = "emotion") -> dict:
    dataset = MERRDataset(tiny.data.test_txt, tiny.data.subtitles, tasks=(task,))
    return MERRCollator(encoder, with_answer=False)([dataset[k] for k in dataset.keys(task)[:3]])


def test_original_lora_is_applied_as_a_peft_lora_adapter(tiny, weights, checkpoint, capsys):
    projectors, lora = weights
    baseline = load_baseline(tiny.model_dir, tiny.data.spec, projector_checkpoint=checkpoint)
    lora_report, projector_report = baseline.reports[1], baseline.reports[0]
    assert "loaded 10 tensors" in projector_report and "missing" not in projector_report
    assert f"LoRA checkpoint {checkpoint}: loaded 8 tensors (r 64, alpha 16, on q_proj, v_proj)." in lora_report
    assert "unknown LLM keys (not loaded): llama_model.base_model.model.model.norm.weight" in lora_report
    assert "ignored 1 keys: RoPE inv_freq buffers" in lora_report and "missing" not in lora_report

    def wrapper(llm: torch.nn.Module) -> EmotionLlama:
        modules = EmotionLlamaProjectors.from_spec(tiny.data.spec, 64)
        modules.load_state_dict(projectors)
        return EmotionLlama(llm, modules, baseline.model.pad_token_id).eval()

    reference = get_peft_model(load_llm(tiny.model_dir), LORA)
    assert not reference.load_state_dict(lora, strict=False).unexpected_keys
    batch = _batch(tiny, baseline.encoder)
    with torch.no_grad():
        logits = baseline.model(batch).logits
        assert torch.equal(logits, wrapper(reference)(batch).logits)
        assert not torch.allclose(logits, wrapper(load_llm(tiny.model_dir))(batch).logits, atol=1e-4)


def test_checkpoint_without_lora_and_lora_of_another_rank(tiny, weights, tmp_path):
    projectors, _ = weights
    ours_to_original = {ours: original for original, ours in ORIGINAL_TO_OURS.items()}
    state = {f"{ours_to_original[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in projectors.items()}
    torch.save({"model": state}, tmp_path / "projectors_only.pth")
    baseline = load_baseline(tiny.model_dir, tiny.data.spec, projector_checkpoint=tmp_path / "projectors_only.pth")
    assert "no LoRA weights; the LLM runs without an adapter" in baseline.reports[1]
    assert not hasattr(baseline.model.llm, "peft_config")
    key = "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    torch.save({"model": {**state, key: torch.zeros(8, 64)}}, tmp_path / "rank8.pth")
    with pytest.raises(ValueError, match=re.escape(f"{key} has shape (8, 64), but base_model.model.model.layers.0")):
        load_lora_checkpoint(load_llm(tiny.model_dir), tmp_path / "rank8.pth")


def test_ar_sees_the_visual_and_audio_tokens_of_a_model_without_mose(tiny, checkpoint):
    baseline = load_baseline(tiny.model_dir, tiny.data.spec, projector_checkpoint=checkpoint)
    batch = _batch(tiny, baseline.encoder)
    prompts = prompt_only(batch["input_ids"], batch["attention_mask"], batch["modality_ids"],
                          baseline.model.pad_token_id, padding_side="left")  # what EmotionLlama.generate runs on
    with attention_reallocation(baseline.model.llm, modality_ids=prompts["modality_ids"], tau=0.0, record=True) as ar:
        recorded = baseline.model.generate(batch, max_new_tokens=2, do_sample=False)
    ids = ar.diagnostics.modality_ids
    assert (ids == Modality.AUDIO).sum(1).tolist() == [1, 1, 1]
    assert (ids == Modality.VISUAL).sum(1).tolist() == [259, 259, 259]
    assert all(bool((layer.uap_audio > 0).all()) for layer in ar.diagnostics.layers.values())
    # EmotionLlama opens the same block itself when given the options
    assert torch.equal(baseline.model.generate(batch, reallocation={"tau": 0.0}, max_new_tokens=2), recorded)
    with torch.no_grad():
        plain = baseline.model(batch).logits
        with attention_reallocation(baseline.model.llm, modality_ids=batch["modality_ids"], tau=0.0):
            reallocated = baseline.model(batch).logits
    assert not torch.equal(plain, reallocated)


def test_base_model_rows_predictions_and_rescoring(tiny, recognition_run):
    out = recognition_run
    table = (out / "scores.md").read_text()
    scores, trade_off = table.split("\nAnswers changed against the plain model")
    assert scores.index("| Emotion-LLaMA + AR |") < scores.index("| Emotion-LLaMA |") and scores.count("\n") == 4
    assert trade_off.count("| Emotion-LLaMA + AR |") == 1  # the trade-off table: AR's row against the plain model
    names = [a.name for a in read_annotations(tiny.data.test_txt)]
    references = _read_jsonl(out / "references.jsonl")
    assert [r["id"] for r in references] == names and {r["subset"] for r in references} == set(SUBSETS)
    for strategy in ("none", "ar"):
        assert [p["id"] for p in _read_jsonl(out / f"predictions_{strategy}.jsonl")] == names
        assert (out / strategy / "scores.png").stat().st_size > 0
    summary = json.loads((out / "scores.json").read_text())
    assert [(row["name"], row["strategy"]) for row in summary] == [("Emotion-LLaMA + AR", "ar"),
                                                                  ("Emotion-LLaMA", "none")]  # fmt: skip
    assert summary[0]["settings"]["generation"]["tau"] == 0.0 and (out / "scores.png").stat().st_size > 0
    assert summary[0]["trade_off"]["changed_vs_none"]
    # Scoring mode on the written files gives the same scores.
    rescored = out / "rescored"
    argv = ["--scoring", "recognition", "--predictions", str(out / "predictions_ar.jsonl"),
            "--references", str(out / "references.jsonl"), "--out_dir", str(rescored)]  # fmt: skip
    assert evaluate_cli.main(argv) == 0
    again = json.loads((rescored / "scores.json").read_text())
    assert (again["scores"], again["gap"]) == (summary[0]["scores"], summary[0]["gap"])


def test_reasoning_with_the_base_model_scores_each_subset(tiny, weights, tmp_path, capsys):
    projectors = tmp_path / "projectors.safetensors"
    modules = EmotionLlamaProjectors.from_spec(tiny.data.spec, 64)
    modules.load_state_dict(weights[0])
    save_projectors(modules, projectors)
    out = tmp_path / "out"
    argv = _base_args(tiny, out, "--projectors", str(projectors), "--strategies", "none,pai", "--max_new_tokens", "6",
                      "--name", "Plain LLM")  # fmt: skip
    assert evaluate_cli.main(argv) == 0
    assert "| Plain LLM | " in capsys.readouterr().out
    summary = json.loads((out / "scores.json").read_text())
    assert [row["name"] for row in summary] == ["Plain LLM", "Plain LLM + PAI"]
    for row in summary:
        assert row["scoring"] == "reasoning" and list(row["scores"]) == [*SUBSETS, "overall"]
        assert [row["scores"][s]["num_samples"] for s in SUBSETS] == [4, 4, 4]
        assert all(0 <= row["scores"][s][m] <= 1 for s in row["scores"] for m in ("accuracy", "recall", "average"))
        assert row["settings"]["generation"]["instruction"] == REASON_INSTRUCTIONS[0]
        assert row["settings"]["generation"]["prompt_task"] == "reason_v2"
    fine = json.loads(tiny.data.fine_json.read_text())
    references = _read_jsonl(out / "references.jsonl")
    assert all(r["reference"] == fine[r["id"]]["smp_reason_caption"] for r in references)
    per_sample = _read_jsonl(out / "none" / "per_sample.jsonl")
    assert all(row["reference_words"] for row in per_sample)  # the conclusion of each caption names its label
    argv = ["--predictions", str(out / "predictions_pai.jsonl"), "--references", str(out / "references.jsonl"),
            "--out_dir", str(tmp_path / "rescored")]  # fmt: skip
    assert evaluate_cli.main(argv) == 0
    again = json.loads((tmp_path / "rescored" / "scores.json").read_text())
    assert (again["scores"], again["gap"]) == (summary[1]["scores"], summary[1]["gap"])


BAD_OPTIONS = [  # (extra arguments after --out_dir, expected message); {model} etc. are filled in by the test
    (["--run_dir", "{run}", "--model_name_or_path", "{model}"], "not both"),
    ([], "give --predictions and --references (scoring mode), or --run_dir or --model_name_or_path"),
    (["--model_name_or_path", "{model}", "--predictions", "{checkpoint}"], "(model-running mode), not both"),
    (["--model_name_or_path", "{model}", "--projector_checkpoint", "{checkpoint}"], "needs --data_root"),
    (["--model_name_or_path", "{model}", "--data_root", "{data}"], "needs the projector weights"),
    (["--model_name_or_path", "{model}", "--data_root", "{data}", "--projector_checkpoint", "{checkpoint}",
      "--projectors", "{checkpoint}"], "projectors.safetensors), not both"),
    (["--model_name_or_path", "{model}", "--data_root", "{data}", "--projector_checkpoint", "{data}/nope.pth"],
     "nope.pth: the checkpoint does not exist"),
    (["--model_name_or_path", "{data}/nope", "--data_root", "{data}"], "nope: the LLM folder does not exist"),
    (["--model_name_or_path", "{model}", "--data_root", "{data}/nope", "--projector_checkpoint", "{checkpoint}"],
     "nope: the data folder does not exist"),
    (["--run_dir", "{data}/nope"], "nope: the run folder does not exist"),
    (["--run_dir", "{data}"], "holds no run_config.json"),
    (["--run_dir", "{run}"], "has format None, merr_finetune.py writes format 2"),
    (["--run_dir", "{run}", "--projectors", "{checkpoint}"], "--projectors go with --model_name_or_path"),
    (["{base}", "--annotation", "nope.txt"], "--annotation nope.txt: the file does not exist"),
    (["{base}", "--subsets", "{data}/nope.csv"], "nope.csv: the subsets file does not exist"),
    (["{base}", "--subsets", "{partial}"], "lists no subset for 1 samples: 'sample_00000059'"),
    (["{base}", "--strategies", "none,foo"], "Unknown strategies"),
    (["{base}", "--batch_size", "0"], "must be >= 1"),
    (["{base}", "--reasoning_task", "emotion"], "invalid choice: 'emotion'"),
]  # fmt: skip


@pytest.mark.parametrize("extra, message", BAD_OPTIONS)
def test_bad_model_mode_options_give_clear_errors(tiny, checkpoint, tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text("{}")
    partial = tmp_path / "partial.csv"  # the synthetic subsets file without the last test sample
    partial.write_text("".join(tiny.data.subsets.read_text().splitlines(keepends=True)[:-1]))
    base = ["--model_name_or_path", str(tiny.model_dir), "--data_root", str(tiny.data.root),
            "--projector_checkpoint", str(checkpoint)]  # fmt: skip
    values = {"model": tiny.model_dir, "data": tiny.data.root, "checkpoint": checkpoint, "run": run, "partial": partial}
    argv = ["--out_dir", str(tmp_path / "out")]
    for item in extra:
        argv += base if item == "{base}" else [item.format(**values)]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()  # refused before anything is written
