"""recipes/merr_infer.py: one sample's answers, by its id or from its own feature files, with a trained run and with
the base model, equal evaluation's answers for that sample; bad inputs are refused before the model is loaded."""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from mosear_recipes import finetune, inference
from mosear_recipes.emotion_llama import model as model_module
from mosear_recipes.emotion_llama.baseline import load_baseline
from mosear_recipes.emotion_llama.checkpoint import ORIGINAL_TO_OURS
from mosear_recipes.emotion_llama.model import load_llm
from mosear_recipes.emotion_llama.projectors import EmotionLlamaProjectors
from mosear_recipes.generation import generate_predictions
from mosear_recipes.inference import InferenceConfig, infer
from mosear_recipes.merr.dataset import MERRDataset
from mosear_recipes.merr.readers import read_annotations, read_subtitles
from mosear_recipes.model_choice import ModelChoice, Reallocation
from mosear_recipes.run import load_trained

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "merr_infer.py"
REALLOCATION = {"none": None, "ar": {"tau": 0.0}, "pai": {"strategy": "pai", "alpha": 5.0}}
"""The options each strategy's generate call must get (``--tau 0 --alpha 5``), written out here."""
OPTIONS = ["--tau", "0", "--alpha", "5"]


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory) -> Path:
    """A MoSE run of two optimizer steps on the tiny setup."""
    out = tmp_path_factory.mktemp("infer_run")
    finetune.main(["--output_dir", str(out), "--model_name_or_path", str(tiny.model_dir),
                   "--data_root", str(tiny.data.root), "--r", "8", "--learning_rate", "3e-3",
                   "--iters_per_epoch", "2", "--num_train_epochs", "1", "--warmup_steps", "1",
                   "--save_strategy", "no", "--eval_annotation", "none", "--report_to", "none",
                   "--disable_tqdm", "true"])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def name(tiny) -> str:
    """The first test sample."""
    return read_annotations(tiny.data.test_txt)[0].name


def _expected(
    model, encoder, dataset: MERRDataset, name: str, max_new_tokens: int, task: str = "emotion",
    strategies: tuple[str, ...] = tuple(REALLOCATION),
) -> dict[str, str]:  # fmt: skip
    """What evaluation answers about ``name`` per strategy: ``generate_predictions`` on that sample, greedy."""
    one = dataset.subset([[r.name for r in dataset.records].index(name)])
    return {
        strategy: generate_predictions(model, one, encoder, torch.device("cpu"), 1, max_new_tokens, task=task,
                                       reallocation=REALLOCATION[strategy])[name]
        for strategy in strategies
    }  # fmt: skip


@pytest.fixture(scope="module")
def by_id(run, name) -> tuple[dict[str, str], list[dict]]:
    """The run's answers about ``name`` by its id (the run's data root), and the options of every reallocation
    block the generate calls opened."""
    opened = []
    reallocate = model_module.attention_reallocation

    def recording(llm, **options):
        opened.append(options)
        return reallocate(llm, **options)

    config = InferenceConfig(model=ModelChoice(run_dir=run), sample_id=name, strategies=list(REALLOCATION),
                             reallocation=Reallocation(tau=0.0, alpha=5.0))  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_module, "attention_reallocation", recording)
        return infer(config), opened


def test_answers_by_id_are_evaluations_answers(tiny, run, name, by_id):
    answers, opened = by_id
    trained = load_trained(run)
    dataset = MERRDataset(tiny.data.test_txt, tiny.data.subtitles, tasks=("emotion",))
    assert answers == _expected(trained.model, trained.encoder, dataset, name, max_new_tokens=8)
    assert list(answers) == ["none", "ar", "pai"] and all(answers.values())
    assert [{k: v for k, v in o.items() if k != "modality_ids"} for o in opened] == [
        {"strategy": "ar", "tau": 0.0, "layers": None},
        {"strategy": "pai", "alpha": 5.0, "pai_mode": "logits", "layers": None},
    ]


def test_reasoning_prompt_by_id(tiny, run, name):
    answers = infer(InferenceConfig(model=ModelChoice(run_dir=run), sample_id=name, task="reason_v2", strategies=["none"],
                                    max_new_tokens=4))  # fmt: skip
    trained = load_trained(run)
    dataset = MERRDataset(tiny.data.test_txt, tiny.data.subtitles, tasks=("reason_v2",), fine_json=tiny.data.fine_json)
    assert answers == _expected(trained.model, trained.encoder, dataset, name, 4, "reason_v2", strategies=("none",))


def _copied_files(tiny, name: str, folder: Path) -> dict[str, Path]:
    """The sample's four feature files copied to ``folder`` under other names, as a user would hold them."""
    folder.mkdir()
    files = {}
    for kind, feature_dir in tiny.data.spec.folders.items():
        files[kind] = folder / f"{kind}.npy"
        shutil.copy(tiny.data.root / feature_dir / f"{name}.npy", files[kind])
    return files


def _file_options(files: dict[str, Path]) -> list[str]:
    return [arg for kind, path in files.items() for arg in (f"--{kind}_file", str(path))]


def test_answers_from_feature_files_equal_the_answers_by_id(tiny, run, name, by_id, tmp_path):
    files = _copied_files(tiny, name, tmp_path / "clip")
    subtitle = read_subtitles(tiny.data.subtitles)[name]
    config = InferenceConfig(model=ModelChoice(run_dir=run), feature_files=files, subtitle=subtitle,
                             strategies=list(REALLOCATION), reallocation=Reallocation(tau=0.0, alpha=5.0))  # fmt: skip
    assert infer(config) == by_id[0]


def test_script_prints_each_strategy(run, name, by_id, monkeypatch, capsys, caplog):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--run_dir", str(run), "--sample_id", name, *OPTIONS])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    answers = by_id[0]
    assert capsys.readouterr().out.splitlines() == [f"none: {answers['none']}", f"ar: {answers['ar']}"]
    assert f"Sample {name}, task emotion: a prompt of " in caplog.text
    assert "text, 259 visual, 1 audio." in caplog.text


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory) -> Path:
    """An Emotion-LLaMA .pth in the original layout: random projectors under their original names and a random LoRA
    (r 64, alpha 16 on q_proj, v_proj) under ``llama_model.``."""
    torch.manual_seed(3)
    llm = get_peft_model(load_llm(tiny.model_dir), LoraConfig(r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    projectors = EmotionLlamaProjectors.from_spec(tiny.data.spec, llm.config.hidden_size).state_dict()
    ours_to_original = {ours: original for original, ours in ORIGINAL_TO_OURS.items()}
    state = {f"{ours_to_original[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in projectors.items()}
    state.update({f"llama_model.{k}": torch.randn_like(v) * 0.1 for k, v in llm.state_dict().items() if ".lora_" in k})
    path = tmp_path_factory.mktemp("checkpoint") / "emotion_llama.pth"
    torch.save({"model": state}, path)
    return path


def test_base_model_by_id_and_from_files(tiny, checkpoint, name, capsys):
    baseline = load_baseline(tiny.model_dir, tiny.data.spec, projector_checkpoint=checkpoint)
    dataset = MERRDataset(tiny.data.test_txt, tiny.data.subtitles, tasks=("emotion",))
    expected = _expected(baseline.model, baseline.encoder, dataset, name, max_new_tokens=3)
    base = ["--model_name_or_path", str(tiny.model_dir), "--projector_checkpoint", str(checkpoint),
            "--max_new_tokens", "3", "--strategies", "none,ar,pai", *OPTIONS]  # fmt: skip
    files = _file_options({kind: tiny.data.root / d / f"{name}.npy" for kind, d in tiny.data.spec.folders.items()})
    subtitle = read_subtitles(tiny.data.subtitles)[name]
    assert inference.main([*base, "--data_root", str(tiny.data.root), "--sample_id", name]) == expected
    spec = ["--feature_spec", str(tiny.data.root / "feature_spec.json")]
    assert inference.main([*base, *spec, *files, "--subtitle", subtitle]) == expected
    assert capsys.readouterr().out.splitlines() == [f"{s}: {a}" for s, a in expected.items()] * 2


BAD_INPUTS = [  # (arguments, expected message); {run}, {data}, {model}, {checkpoint}, {clip} are filled in by the test
    (["--sample_id", "{name}"], "Give --run_dir (a MoSE run) or --model_name_or_path (the base model) to answer with."),
    (["--run_dir", "{run}", "--model_name_or_path", "{model}", "--sample_id", "{name}"], "(the base model), not both."),
    (["--run_dir", "{data}/nope", "--sample_id", "{name}"], "nope: the run folder does not exist"),
    (["--run_dir", "{run}", "--projectors", "{checkpoint}", "--sample_id", "{name}"],
     "--projectors go with --model_name_or_path: a run has its own projectors and feature spec."),
    (["--model_name_or_path", "{model}", "--sample_id", "{name}", "--data_root", "{data}"],
     "needs the projector weights"),
    (["--model_name_or_path", "{model}", "--projector_checkpoint", "{checkpoint}", "--sample_id", "{name}"],
     "--sample_id with --model_name_or_path needs --data_root"),
    (["--model_name_or_path", "{model}", "--projector_checkpoint", "{checkpoint}", "--feature_spec", "{data}/nope",
      "{files}", "--subtitle", "hi"], "nope/feature_spec.json does not exist"),
    (["--run_dir", "{run}"], "Give --sample_id (a sample of --data_root) or the sample's feature files"),
    (["--run_dir", "{run}", "--sample_id", "{name}", "{files}", "--subtitle", "hi"], "with --subtitle), not both."),
    (["--run_dir", "{run}", "--sample_id", "{name}", "--subtitle", "hi"], "--subtitle goes with the feature files"),
    (["--run_dir", "{run}", "--sample_id", "sample_0000004"], "close matches: 'sample_000000"),
    (["--run_dir", "{run}", "--sample_id", "clip"], "--sample_id 'clip' is not a sample of"),
    (["--run_dir", "{run}", "--sample_id", "{name}", "--data_root", "{data}/nope"], "the data folder"),
    (["--run_dir", "{run}", "{files}"], "The feature files need --subtitle"),
    (["--run_dir", "{run}", "{files}", "--subtitle", "hi", "--data_root", "{data}"], "do not need it"),
    (["--run_dir", "{run}", "--eva_file", "{clip}/eva.npy", "--subtitle", "hi"],
     "--face_file, --video_file, --audio_file missing"),
    (["--run_dir", "{run}", "--eva_file", "{clip}/nope.npy", "--face_file", "{clip}/face.npy", "--video_file",
      "{clip}/video.npy", "--audio_file", "{clip}/audio.npy", "--subtitle", "hi"],
     "Sample 'nope': missing feature file: no such file ({clip}/nope.npy)"),
    (["--run_dir", "{run}", "{files}", "--subtitle", "hi", "--audio_file", "{clip}/short.npy"],
     "Sample 'eva': wrong feature shape: got (3,) float32, expected (16,) or (1, 16) float ({clip}/short.npy)"),
    (["--run_dir", "{run}", "--sample_id", "{name}", "--strategies", "none,foo"], "Unknown strategies ['foo']"),
    (["--run_dir", "{run}", "--sample_id", "{name}", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["--run_dir", "{run}", "--sample_id", "{name}", "--task", "sing"], "invalid choice: 'sing'"),
]  # fmt: skip


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_inputs_are_refused_before_the_model_is_loaded(tiny, run, name, checkpoint, tmp_path, monkeypatch,
                                                           capsys, argv, message):  # fmt: skip
    clip = tmp_path / "clip"
    files = _copied_files(tiny, name, clip)
    np.save(clip / "short.npy", np.zeros(3, dtype=np.float32))
    values = {"run": run, "data": tiny.data.root, "model": tiny.model_dir, "checkpoint": checkpoint, "clip": clip,
              "name": name}  # fmt: skip
    args = [arg for item in argv for arg in (_file_options(files) if item == "{files}" else [item.format(**values)])]
    monkeypatch.setattr(ModelChoice, "load", lambda *_: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        inference.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message.format(**values) in err, err
