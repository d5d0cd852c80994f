"""recipes/merr_dpo.py: DPO on TRL's DPOTrainer for a MoSE Emotion-LLaMA (docs/preference.md). Modality ids in the
policy and reference passes, the reference equal to the frozen starting model, TRL's fused-head contract, resume,
the saved adapter, and the SFT recipe's perceive-then-reason option."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, set_seed
from trl.trainer.utils import add_fused_lm_head

import peft_mose
from peft_mose import Modality
from peft_mose.layer import MoSELayer
from peft_mose.model import MoSEModel

from mosear_recipes import finetune
from mosear_recipes.arguments import ModelArguments
from mosear_recipes.emotion_llama.model import load_tokenizer
from mosear_recipes.emotion_llama.prompt import PromptEncoder
from mosear_recipes.merr.dataset import MERRDataset
from mosear_recipes.merr.perceive import Cues, conclusion, read_cues
from mosear_recipes.merr.readers import EMOTION_LABELS
from mosear_recipes.merr.synthetic import LABELS, SyntheticSample
from mosear_recipes.merr.tasks import normalize_answer
from mosear_recipes.modeling import build_model
from mosear_recipes.preference import compare, dpo
from mosear_recipes.preference.data import PreferenceCollator, check_pair_samples
from mosear_recipes.preference.model import PreferenceEmotionLlama, reference_model
from mosear_recipes.preference.pairs import build_pairs
from mosear_recipes.run import load_trained

from recipe_helpers import run_args

QUIET = ["--disable_tqdm", "true", "--logging_steps", "1", "--save_steps", "2"]


def run_dpo(out, *extra: str) -> list[dict]:
    """The built-in tiny default (recipes/configs/dpo_tiny.yaml), shortened."""
    return dpo.main(["--output_dir", str(out), *QUIET, *extra])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The tiny default for 4 steps (checkpoints 2 and 4): the uninterrupted run of the resume test."""
    out = tmp_path_factory.mktemp("dpo") / "run"
    return out, run_dpo(out, "--max_steps", "4")


def test_tiny_default_logs_rewards_and_saves_a_loadable_adapter(default_run):
    out, history = default_run
    logged = [entry for entry in history if "loss" in entry]
    assert len(logged) == 4
    for key in dpo.REWARD_METRICS:
        assert all(key in entry for entry in logged), key
    # a fresh adapter is the reference at step 1: both rewards exactly 0 (beta * (policy - reference) log-ratios)
    assert logged[0]["rewards/chosen"] == 0.0 == logged[0]["rewards/rejected"]
    assert any(entry["rewards/margins"] != 0.0 for entry in logged[1:])
    assert [json.loads(line) for line in (out / dpo.METRICS_FILE).read_text().splitlines()] == history
    base = AutoModelForCausalLM.from_pretrained(out / "tiny" / "model")
    adapter = PeftModel.from_pretrained(base, str(out / "adapter"))  # `import peft_mose` registered MOSE
    assert peft_mose.is_mose_model(adapter)
    trained = load_trained(out)  # the recipe's loader reads the DPO run folder too
    assert trained.run_config.stage.name == "dpo" and trained.run_config.stage.tasks == ("perceive",)
    assert (out / "checkpoint-2" / "manifest.json").is_file() and (out / "pairs.jsonl").is_file()


def test_modality_ids_reach_the_policy_and_the_reference_for_chosen_and_rejected(tmp_path, monkeypatch):
    """Every MoSE call of a step gets the collated batch's ids: the policy pass (adapter on) and the reference pass
    (adapter off), each over the chosen rows then the rejected rows of the same pairs."""
    calls, batches = [], []
    forward, collate = MoSEModel.forward, PreferenceCollator.__call__

    def spy_forward(self, *args, modality_ids=None, **kwargs):
        layer = next(m for m in self.model.modules() if isinstance(m, MoSELayer))
        calls.append((modality_ids, layer.disable_adapters))
        return forward(self, *args, modality_ids=modality_ids, **kwargs)

    def spy_collate(self, examples):
        batch = collate(self, examples)
        batches.append(([self.pairs[int(e["pair"])] for e in examples], batch))
        return batch

    monkeypatch.setattr(MoSEModel, "forward", spy_forward)
    monkeypatch.setattr(PreferenceCollator, "__call__", spy_collate)
    run_dpo(tmp_path / "run", "--max_steps", "2", "--per_device_train_batch_size", "2")
    assert [disabled for _, disabled in calls] == [False, True, False, True]
    tokenizer = load_tokenizer(tmp_path / "run" / "tiny" / "model")
    for step, (pairs, batch) in enumerate(batches[:2]):  # accelerate's loader collates one batch ahead
        for ids, _ in calls[2 * step : 2 * step + 2]:
            assert ids is not None and torch.equal(ids, batch["modality_ids"])
        ids = batch["modality_ids"]
        assert ids.shape[0] == 2 * len(pairs) == 4
        assert ((ids == Modality.VISUAL).sum(1) == 259).all() and ((ids == Modality.AUDIO).sum(1) == 1).all()
        assert torch.equal(batch["completion_mask"].bool(), ids == Modality.ANSWER)
        answers = [batch["input_ids"][row][ids[row] == Modality.ANSWER] for row in range(4)]
        texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
        expected = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        # the word-level tokenizer decodes "low," as "low ,": compared without spaces
        assert ["".join(t.split()) for t in texts] == ["".join(normalize_answer(e).split()) for e in expected]
        for field in ("eva_patch", "audio"):  # the pair's features in both halves
            assert torch.equal(batch[field][:2], batch[field][2:])


def _tiny_policy(tiny):
    data = tiny.data
    samples = MERRDataset(data.coarse_txt, data.subtitles)
    tokenizer = load_tokenizer(tiny.model_dir)
    set_seed(0)
    start = build_model(ModelArguments(r=8), tiny.model_dir, samples.spec, tokenizer)
    policy = PreferenceEmotionLlama(start.llm, start.projectors, tokenizer.pad_token_id)
    pairs = build_pairs([(r.name, r.label) for r in samples.records][:2], read_cues(data.cues_json, EMOTION_LABELS))
    collator = PreferenceCollator(PromptEncoder(tokenizer, samples.spec.n_patch_tokens), pairs, samples,
                                  check_pair_samples(pairs, samples, "pairs"))  # fmt: skip
    return policy, collator([{"pair": 0}, {"pair": 1}])


def _answer_logps(model: PreferenceEmotionLlama, batch: dict) -> torch.Tensor:
    """Independently of TRL: sum over the completion of log softmax of the wrapper's own logits."""
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    logits = model(**inputs).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    token_logps = F.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    return (token_logps * batch["completion_mask"][:, 1:]).sum(1)


def test_trl_fused_head_scores_the_wrapper_with_its_modality_ids(tiny):
    """TRL's fused LM head (as DPOTrainer 1.16 applies it) on the wrapper gives the log-probabilities of the
    wrapper's own forward, with the modality ids; if TRL stopped reaching the backbone through ``base_model`` this
    fails."""
    policy, batch = _tiny_policy(tiny)
    with torch.no_grad():
        for name, param in policy.llm.named_parameters():
            if ".mose_B." in name:  # a trained adapter, so that the experts act and the ids matter
                param.normal_(0, 0.5)
    policy.eval()
    expected = _answer_logps(policy, batch)
    fused = copy.deepcopy(policy)
    add_fused_lm_head(fused, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        out = fused(**inputs, labels=labels, fused_lm_head=True, use_cache=False)
        # the same model without the ids (every token text): what a pass that lost them would score
        llm_inputs = policy.build_inputs(inputs)
        del llm_inputs["modality_ids"]
        logits = policy.llm(**llm_inputs).logits[:, :-1]
        targets = batch["input_ids"][:, 1:]
        without_ids = (F.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] * batch["completion_mask"][:, 1:])
    torch.testing.assert_close(out.log_probs.sum(1), expected, rtol=1e-5, atol=1e-4)
    assert (without_ids.sum(1) - expected).abs().max() > 1e-2  # so the comparison above sees lost ids


def test_reference_is_the_frozen_starting_model(tiny):
    """Fresh adapter: the reference is the adapter-disabled LLM with the starting projectors, and stays so while the
    policy (adapter and projectors) moves; a moved adapter is refused as such a reference."""
    policy, batch = _tiny_policy(tiny)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    start = copy.deepcopy(policy).eval()
    reference = reference_model(policy, fresh_adapter=True)
    assert reference.llm is policy.llm and not any(p.requires_grad for p in reference.projectors.parameters())
    with torch.no_grad():  # the policy moves: its adapter and its projectors
        for name, param in policy.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    policy.eval()
    with torch.no_grad():
        ref_logits = reference(**inputs).logits
        with start.llm.disable_adapter():
            disabled_logits = start(**inputs).logits
        torch.testing.assert_close(ref_logits, start(**inputs).logits, rtol=0, atol=0)
        torch.testing.assert_close(ref_logits, disabled_logits, rtol=0, atol=0)
        assert not torch.allclose(policy(**inputs).logits, ref_logits)
    with pytest.raises(ValueError, match="adapter is not fresh"):
        reference_model(policy, fresh_adapter=True)


def test_reference_of_a_run_is_a_frozen_copy_of_it(default_run, tmp_path, monkeypatch):
    """From a run (--init_from): after training, the reference still computes what the run computes."""
    init, _ = default_run
    made = []
    monkeypatch.setattr(dpo, "reference_model", lambda policy, fresh_adapter: made.append(
        (policy, reference_model(policy, fresh_adapter))) or made[-1][1])  # fmt: skip
    run_dpo(tmp_path / "run", "--max_steps", "2", "--init_from", str(init))
    policy, reference = made[0]
    assert reference.llm is not policy.llm and not any(p.requires_grad for p in reference.parameters())
    source = load_trained(init).model
    _, batch = _tiny_policy_batch(tmp_path / "run")
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(**inputs).logits, source(**inputs).logits, rtol=0, atol=1e-6)
        assert not torch.allclose(policy.eval()(**inputs).logits, source(**inputs).logits)


def _tiny_policy_batch(run_dir):
    """A collated pair batch of a DPO run folder's data."""
    data = run_dir / "tiny" / "data"
    samples = MERRDataset(data / "MERR_coarse_grained.txt", data / "transcription_en_all.csv")
    tokenizer = load_tokenizer(run_dir / "tiny" / "model")
    pairs = build_pairs([(r.name, r.label) for r in samples.records][:2], read_cues(data / "MERR_cues.json",
                                                                                   EMOTION_LABELS))  # fmt: skip
    collator = PreferenceCollator(PromptEncoder(tokenizer, samples.spec.n_patch_tokens), pairs, samples,
                                  check_pair_samples(pairs, samples, "pairs"))  # fmt: skip
    return pairs, collator([{"pair": 0}, {"pair": 1}])


def test_resume_ends_in_the_state_of_the_uninterrupted_run(default_run, tmp_path):
    uninterrupted, _ = default_run
    out = tmp_path / "run"
    run_dpo(out, "--max_steps", "2")
    with pytest.raises(ValueError, match=r"--beta: 0\.1 in the run, 0\.5 now"):  # what changes the training: refused
        run_dpo(out, "--max_steps", "4", "--beta", "0.5", "--resume_from_checkpoint", str(out / "checkpoint-2"))
    history = run_dpo(out, "--max_steps", "4", "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]  # 1, 2 from the checkpoint
    for path in ("adapter/adapter_model.safetensors", "projectors.safetensors"):
        resumed, reference = load_file(str(out / path)), load_file(str(uninterrupted / path))
        assert resumed.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=f"{path}: {key}")


def test_samples_left_out_by_skip_missing_are_reported(default_run, tmp_path, caplog):
    import logging
    import shutil

    out, _ = default_run
    data = tmp_path / "data"
    shutil.copytree(out / "tiny" / "data", data)
    (data / "mae_340_UTT" / "sample_00000000.npy").unlink()
    with caplog.at_level(logging.INFO, logger="mosear_recipes.preference.dpo"):
        dpo.main(["--output_dir", str(tmp_path / "run"), "--tiny_setup", "false", "--model_name_or_path",
                  str(out / "tiny" / "model"), "--data_root", str(data), "--skip_missing", "true", "--max_steps", "1",
                  "--save_strategy", "no", *QUIET[:2]])  # fmt: skip
    assert re.search(r"skipped 1 of \d+ samples in .*: 1 missing feature file", caplog.text)


def test_refused_options(tmp_path):
    for extra, message in ((["--deepspeed", "recipes/configs/zero2.json"], "--deepspeed"),
                           (["--precompute_ref_log_probs", "true"], "precompute_ref_log_probs"),
                           (["--remove_unused_columns", "true"], "remove_unused_columns"),
                           (["--label_smoothing_factor", "0.1"], "label_smoothing_factor"),
                           (["--max_length", "40"], "--max_length 40 is not supported"),
                           (["--pairs", "p.jsonl", "--mix", "consistent=0.5"], "give one of them"),
                           (["--mix", "consistent=3"], r"must be in \[0, 1\]")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            dpo.check_dpo_args(dpo.parse_dpo_args(["--output_dir", str(tmp_path), *extra]))
    with pytest.raises(ValueError, match="unknown options"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("tiny_setup: true\nbeta_typo: 1\n")
        dpo.parse_dpo_args([str(bad)])


def test_sft_recipe_trains_perceive_then_reason_answers(tiny, tmp_path):
    out = tmp_path / "sft"
    finetune.main(run_args(tiny, out, "--tasks", "emotion,perceive", "--max_steps", "2", "--val_size", "0",
                           "--eval_strategy", "no"))  # fmt: skip
    trained = load_trained(out)
    assert trained.run_config.stage.tasks == ("emotion", "perceive")


# --- the conflict-set comparison (recipes/preference_compare.py) ---


def test_audio_following_and_candidates():
    truth = [SyntheticSample(f"s{i}", "test", subset, label, visual, audio) for i, (subset, label, visual, audio) in
             enumerate([("video_aligned", "sad", "sad", "happy"), ("video_aligned", "angry", "angry", "fear"),
                        ("audio_aligned", "happy", "sad", "happy"), ("consistent", "sad", "sad", "sad")])]  # fmt: skip
    predictions = {"s0": "happy", "s1": "angry", "s2": "happy", "s3": "angry"}
    row = compare.audio_following(predictions, truth)
    assert row == {"video_aligned": 0.5, "audio_aligned": 1.0, "consistent": 0.0, "audio_following": 0.5}
    conflict = Cues("frowning", "angry", "cheerful", "happy")
    assert compare.candidates("emotion", conflict) == {label: label for label in LABELS}
    choices = compare.candidates("perceive", conflict)
    assert list(choices) == ["angry", "happy"]
    assert "the face is more telling" in choices["angry"] and conclusion(choices["happy"]) == "happy"
    agree = compare.candidates("perceive", Cues("frowning", "angry", "loud", "angry"))
    assert list(agree) == list(LABELS) and all("agree" in a and conclusion(a) == k for k, a in agree.items())


def test_comparison_runs_end_to_end(tmp_path):
    rows = compare.compare(tmp_path, compare.Size(num_samples=30, sft_steps=3, dpo_steps=2))
    assert list(rows) == ["LoRA SFT", "MoSE SFT", "MoSE SFT + AR", "MoSE SFT + DPO", "MoSE SFT + DPO + AR"]
    for per_task in rows.values():
        assert set(per_task) == {"emotion", "perceive"}
        for row in per_task.values():
            assert set(row) == {"video_aligned", "audio_aligned", "consistent", "audio_following"}
            assert all(0.0 <= v <= 1.0 for v in row.values())
    assert json.loads((tmp_path / "comparison.json").read_text())["rows"] == rows
    assert (tmp_path / "comparison.md").read_text().count("\n| MoSE SFT + DPO |") == 2
    assert (tmp_path / "mose_dpo" / "adapter").is_dir() and (tmp_path / "mose_sft" / "adapter").is_dir()
