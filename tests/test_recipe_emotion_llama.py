"""Emotion-LLaMA wiring: the training layout, forward and gradients, generation, checkpoint key mapping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from recipe_helpers import coarse_dataset
from torch import nn
from torch.utils.data import DataLoader

from peft_mose import Modality
from peft_mose.layout import IGNORE_INDEX
from mosear_recipes.emotion_llama.checkpoint import (
    load_projector_checkpoint,
    load_projectors,
    save_projectors,
)
from mosear_recipes.emotion_llama.features import FeatureSpec
from mosear_recipes.emotion_llama.model import EmotionLlama, load_llm, load_tokenizer
from mosear_recipes.emotion_llama.projectors import FEATURE_KEYS, EmotionLlamaProjectors
from mosear_recipes.emotion_llama.prompt import HEAD, MIDDLE, PromptEncoder, prompt_tail
from mosear_recipes.merr.collator import MERRCollator
from mosear_recipes.merr.dataset import MERRDataset
from mosear_recipes.merr.sampler import SingleTaskBatchSampler
from mosear_recipes.merr.synthetic import write_synthetic_merr


class Parts:
    """The tiny configuration loaded once: dataset, tokenizer, frozen LLM."""

    def __init__(self, tiny) -> None:
        self.dataset = coarse_dataset(tiny.data)
        self.tokenizer = load_tokenizer(tiny.model_dir)
        self.llm = load_llm(tiny.model_dir).eval().requires_grad_(False)

    def model(self, seed: int = 0, **kwargs) -> EmotionLlama:
        torch.manual_seed(seed)
        projectors = EmotionLlamaProjectors.from_spec(self.dataset.spec, self.llm.config.hidden_size)
        return EmotionLlama(self.llm, projectors, self.tokenizer.pad_token_id, **kwargs)

    def batch(self, keys, audio_repeat: int = 1, with_answer: bool = True) -> dict:
        collate = MERRCollator(PromptEncoder(self.tokenizer, audio_repeat=audio_repeat), with_answer=with_answer)
        return collate([self.dataset[k] for k in keys])


@pytest.fixture(scope="module")
def parts(tiny) -> Parts:
    return Parts(tiny)


KEYS = [(0, "reason", 1), (1, "emotion", 0), (2, "reason", 3)]


def _n_text_tokens(tokenizer, sample) -> int:
    """Text tokens of the layout counted independently: BOS, three prompt segments, answer and EOS."""
    segments = [HEAD, MIDDLE, prompt_tail(sample.subtitle, sample.task, sample.instruction), sample.answer]
    return 2 + sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in segments)


# --- layout ---------------------------------------------------------------------------------------------------------


def test_real_configuration_has_text_plus_260_multimodal_tokens(tmp_path, parts):
    spec = FeatureSpec()
    data = write_synthetic_merr(tmp_path, num_samples=3, test_fraction=0.0, spec=spec)
    dataset = MERRDataset(data.coarse_txt, data.subtitles, tasks="emotion")
    assert dataset.spec == spec and spec.n_multimodal_tokens() == 260
    samples = [dataset[(i, "emotion", 0)] for i in range(3)]
    assert samples[0].eva_patch.shape == (256, 5632) and samples[0].eva_cls.shape == (1408,)
    batch = MERRCollator(PromptEncoder(parts.tokenizer))(samples)
    for row, sample in enumerate(samples):
        assert int(batch["attention_mask"][row].sum()) == _n_text_tokens(parts.tokenizer, sample) + 260
        mods = batch["modality_ids"][row]
        assert int((mods == Modality.VISUAL).sum()) == 259 and int((mods == Modality.AUDIO).sum()) == 1
    torch.manual_seed(0)
    projectors = EmotionLlamaProjectors.from_spec(spec, parts.llm.config.hidden_size)
    model = EmotionLlama(parts.llm, projectors, parts.tokenizer.pad_token_id)
    inputs = model.build_inputs(batch)
    assert inputs["inputs_embeds"].shape == (*batch["input_ids"].shape, parts.llm.config.hidden_size)
    assert torch.isfinite(model(batch).loss)


def test_real_projector_shapes():
    with torch.device("meta"):
        projectors = EmotionLlamaProjectors.from_spec(FeatureSpec(), hidden_size=4096)
    shapes = {k: tuple(v.shape) for k, v in projectors.state_dict().items() if k.endswith("weight")}
    assert shapes == {
        "eva_patch.weight": (4096, 5632),
        "eva_cls.weight": (4096, 1408),
        "face.weight": (4096, 1024),
        "video.weight": (4096, 1024),
        "audio.weight": (4096, 1024),
    }


def test_embeddings_land_in_their_slots(parts):
    model = parts.model()
    batch = parts.batch(KEYS, audio_repeat=3)
    embeds = model.build_inputs(batch)["inputs_embeds"]
    projected = model.projectors(*(batch[k] for k in FEATURE_KEYS), audio_repeat=3)
    token_embeds = parts.llm.get_input_embeddings()(batch["input_ids"])
    for row in range(len(KEYS)):
        mods = batch["modality_ids"][row]
        slots = (mods == Modality.VISUAL) | (mods == Modality.AUDIO)
        assert torch.equal(embeds[row, slots], projected[row])
        assert torch.equal(embeds[row, ~slots], token_embeds[row, ~slots])
        audio = embeds[row, mods == Modality.AUDIO]
        assert audio.shape[0] == 3 and torch.equal(audio[0], audio[2])
        assert torch.allclose(audio[0], model.projectors.audio(batch["audio"][row]), atol=1e-6)


# --- forward, loss, gradients ---------------------------------------------------------------------------------------


def test_loss_only_on_answer_and_projectors_get_gradients(parts):
    model = parts.model()
    sampler = SingleTaskBatchSampler(parts.dataset, batch_size=3, num_batches=1, seed=0)
    loader = DataLoader(parts.dataset, batch_sampler=sampler, collate_fn=MERRCollator(PromptEncoder(parts.tokenizer)))
    batch = next(iter(loader))
    output = model(**batch)
    assert torch.allclose(output.loss, model(batch).loss)
    inputs = model.build_inputs(batch)
    labels = inputs.pop("labels")
    logits = parts.llm(**inputs).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(output.loss, expected, atol=1e-5)
    n_answer = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(model(batch, num_items_in_batch=2 * n_answer).loss, expected / 2, atol=1e-5)
    output.loss.backward()
    for name, param in model.projectors.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


class RecordingLM(nn.Module):
    """Stands in for a tuner-wrapped LLM: records the keyword arguments it is called with."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding
        self.calls: list[dict] = []

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def forward(self, **kwargs):
        self.calls.append(kwargs)

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        return torch.zeros(kwargs["inputs_embeds"].shape[0], 1, dtype=torch.long)


@pytest.mark.parametrize("accepts", [False, True])
def test_modality_ids_reach_the_llm_only_when_it_is_a_mose_model(parts, accepts, monkeypatch):
    recorder = RecordingLM(parts.llm.get_input_embeddings())
    projectors = EmotionLlamaProjectors.from_spec(parts.dataset.spec, parts.llm.config.hidden_size)
    model = EmotionLlama(recorder, projectors, parts.tokenizer.pad_token_id)
    monkeypatch.setattr(EmotionLlama, "takes_modality_ids", accepts)
    batch = parts.batch(KEYS)
    model(batch)
    model.generate(batch, max_new_tokens=2)
    forward, generate = recorder.calls
    assert set(forward) == {"inputs_embeds", "attention_mask", "labels"} | ({"modality_ids"} if accepts else set())
    assert set(generate) == {"inputs_embeds", "attention_mask", "max_new_tokens", "pad_token_id"} | (
        {"modality_ids"} if accepts else set()
    )
    if accepts:
        assert torch.equal(forward["modality_ids"], batch["modality_ids"])
        prompt_mods = generate["modality_ids"]
        assert prompt_mods.shape == generate["attention_mask"].shape
        assert not (prompt_mods == Modality.ANSWER).any() and generate["attention_mask"][:, -1].all()  # left padded


def test_build_inputs_reports_missing_keys_and_wrong_token_counts(parts):
    model = parts.model()
    batch = parts.batch(KEYS[:2])
    with pytest.raises(ValueError, match=r"The batch lacks \['eva_cls'\]"):
        model.build_inputs({k: v for k, v in batch.items() if k != "eva_cls"})
    message = r"needs 131 VISUAL tokens \(128 EVA patches \+ face, video, CLS\).*VISUAL \[259, 259\]"
    with pytest.raises(ValueError, match=message):
        model.build_inputs({**batch, "eva_patch": batch["eva_patch"][:, :128]})


# --- generation -----------------------------------------------------------------------------------------------------


def test_generate_left_pads_prompts_like_single_samples(parts):
    model = parts.model(seed=1)
    train_batch = parts.batch(KEYS)
    together = model.generate(train_batch, max_new_tokens=4, do_sample=False)
    prompts_only = model.generate(parts.batch(KEYS, with_answer=False), max_new_tokens=4, do_sample=False)
    assert together.shape == (3, 4) and torch.equal(together, prompts_only)
    for row, key in enumerate(KEYS):
        alone = model.generate(parts.batch([key]), max_new_tokens=4, do_sample=False)
        assert torch.equal(together[row], alone[0])


# --- checkpoints ----------------------------------------------------------------------------------------------------


def _original_checkpoint(projectors: EmotionLlamaProjectors) -> dict[str, torch.Tensor]:
    """Random projector weights under the original MiniGPT-v2 / Emotion-LLaMA key names."""
    names = {"llama_proj": projectors.eva_patch, "cls_tk_llama_proj": projectors.eva_cls}
    features = [projectors.face, projectors.video, projectors.audio]
    names.update({f"feats_llama_proj{i}": module for i, module in enumerate(features, start=1)})
    generator = torch.Generator().manual_seed(5)
    return {
        f"{name}.{param}": torch.randn(getattr(module, param).shape, generator=generator)
        for name, module in names.items()
        for param in ("weight", "bias")
    }


def _tiny_projectors() -> EmotionLlamaProjectors:
    return EmotionLlamaProjectors.from_spec(FeatureSpec.tiny(), hidden_size=64)


def test_emotion_llama_checkpoint_key_mapping(tmp_path):
    projectors = _tiny_projectors()
    weights = _original_checkpoint(projectors)
    state = {
        **weights,
        "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(64, 64),
        "llama_model.base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.zeros(64, 64),
        "attention.fc_att.weight": torch.zeros(7, 128),
        "mystery_head.weight": torch.zeros(2),
    }
    path = tmp_path / "checkpoint_best.pth"
    optimizer = {"state": {}, "param_groups": []}
    config = {"model": {"arch": "minigpt_v2"}}
    torch.save({"model": state, "optimizer": optimizer, "config": config, "scaler": None, "epoch": 29}, path)
    report = load_projector_checkpoint(projectors, path)
    mapping = {"llama_proj": "eva_patch", "cls_tk_llama_proj": "eva_cls"}
    mapping.update({"feats_llama_proj1": "face", "feats_llama_proj2": "video", "feats_llama_proj3": "audio"})
    own = projectors.state_dict()
    for key, tensor in weights.items():
        module, param = key.split(".")
        assert torch.equal(own[f"{mapping[module]}.{param}"], tensor), key
    assert len(report.loaded) == 10 and report.missing == [] and report.unknown == ["mystery_head.weight"]
    assert not report.complete
    assert report.ignored == {
        "LLM / LoRA adapter weights (not projectors: see load_lora_checkpoint)": 2,
        "MiniGPTBase's unused auxiliary classifier": 1,
    }
    summary = report.summary()
    assert f"Projector checkpoint {path}: loaded 10 tensors." in summary
    assert "unknown keys (not loaded): mystery_head.weight" in summary and "ignored 2 keys: LLM / LoRA" in summary
    with pytest.raises(ValueError, match=r"unknown keys \(not loaded\): mystery_head.weight"):
        load_projector_checkpoint(_tiny_projectors(), path, strict=True)


def test_minigptv2_checkpoint_reports_missing_projectors(tmp_path):
    projectors = _tiny_projectors()
    weights = _original_checkpoint(projectors)
    path = tmp_path / "minigptv2_checkpoint.pth"
    torch.save({"model": {k: v for k, v in weights.items() if k.startswith("llama_proj.")}}, path)
    report = load_projector_checkpoint(projectors, path)
    assert report.loaded == ["eva_patch.bias", "eva_patch.weight"]
    assert report.missing == [f"{m}.{p}" for m in ("audio", "eva_cls", "face", "video") for p in ("bias", "weight")]
    assert "missing (left at their initial values): audio.bias, audio.weight" in report.summary()
    with pytest.raises(ValueError, match="missing"):
        load_projector_checkpoint(_tiny_projectors(), path, strict=True)


def test_checkpoint_shape_mismatch_names_key_and_file(tmp_path):
    weights = _original_checkpoint(_tiny_projectors())
    weights["feats_llama_proj3.weight"] = torch.zeros(64, 1024)
    path = tmp_path / "ckpt.pth"
    torch.save(weights, path)  # a flat state dict is accepted too
    message = rf"Checkpoint {path}: feats_llama_proj3.weight has shape \(64, 1024\), but audio.weight needs \(64, 16\)"
    with pytest.raises(ValueError, match=message):
        load_projector_checkpoint(_tiny_projectors(), path)


class _Pickled:
    pass


def test_checkpoint_loading_never_unpickles_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": _Pickled()}, path)
    with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\) refuses to unpickle"):
        load_projector_checkpoint(_tiny_projectors(), path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match=r"has no state dict.*found list"):
        load_projector_checkpoint(_tiny_projectors(), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_projector_checkpoint(_tiny_projectors(), tmp_path / "nope.pth")


def test_save_and_load_projectors_roundtrip(tmp_path):
    torch.manual_seed(0)
    source, target = _tiny_projectors(), _tiny_projectors()
    path = save_projectors(source, tmp_path / "projectors.safetensors")
    load_projectors(target, path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(ValueError, match="do not match the projectors"):
        load_projectors(EmotionLlamaProjectors(hidden_size=32, eva_dim=8, feature_dim=16), path)


# --- tiny configuration ---------------------------------------------------------------------------------------------


def test_tiny_model_folder_loads_and_covers_the_synthetic_text(parts):
    config = parts.llm.config
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    tokenizer = parts.tokenizer
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "$$")
    keys = [(i, task, draw) for i in range(0, 48, 5) for task in ("emotion", "reason") for draw in range(5)]
    batch = parts.batch(keys)
    assert not (batch["input_ids"] == tokenizer.unk_token_id).any()
