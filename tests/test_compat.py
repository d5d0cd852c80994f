"""The private parts of other libraries the package and the recipes use: each test fails loudly, naming the hook,
when a release removes or reshapes one. One section per library; where each is used: docs/versions.md."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, mapping
from peft.tuners import tuners_utils
from peft.tuners.tuners_utils import BaseTuner
from safetensors import safe_open

from conftest import random_tokens
from peft_mose import MoSEModel, MoSEPeftType

P = inspect.Parameter


def parameters(fn: Callable) -> list[tuple[str, object, object]]:
    """``(name, kind, default)`` of each parameter: what a caller relies on. Annotations are left out, as a release
    may respell them (``Optional[str]`` -> ``str | None``) without breaking a call."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


# --- transformers: recipes/mosear_recipes/trainer.py ----------------------------------------------------------


def test_trainer_load_from_checkpoint():
    """``MoSETrainer`` overrides it (recipes/mosear_recipes/trainer.py): Trainer.train calls it to resume."""
    from transformers import Trainer

    assert parameters(Trainer._load_from_checkpoint) == [
        ("self", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("resume_from_checkpoint", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("model", P.POSITIONAL_OR_KEYWORD, None),
    ]


# --- accelerate: recipes/mosear_recipes/distributed.py ---------------------------------------------------------


def test_accelerator_state_reset_state():
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    assert isinstance(inspect.getattr_static(AcceleratorState, "_reset_state"), staticmethod)
    assert parameters(AcceleratorState._reset_state) == [("reset_partial_state", P.POSITIONAL_OR_KEYWORD, False)]
    # What share_cpu_deepspeed_state relies on: after the reset, the next PartialState(...) is set up afresh.
    saved = dict(PartialState._shared_state), dict(AcceleratorState._shared_state)
    try:
        PartialState(cpu=True)
        assert PartialState._shared_state
        AcceleratorState._reset_state(reset_partial_state=True)
        assert PartialState._shared_state == {} and AcceleratorState._shared_state == {}
    finally:
        PartialState._shared_state.update(saved[0])
        AcceleratorState._shared_state.update(saved[1])


# --- transformers: peft_mose/_compat/transformers.py (AR's setup) ----------------------------------------------


def test_can_set_attn_implementation_tells_interface_models_from_the_others():
    """``uses_attention_interface`` calls it: Bloom computes attention in its own modules (Falcon did too before
    transformers 5.25, which passes its ALiBi bias to AttentionInterface in the mask)."""
    from transformers import BloomForCausalLM, LlamaForCausalLM, PreTrainedModel

    assert isinstance(inspect.getattr_static(PreTrainedModel, "_can_set_attn_implementation"), classmethod)
    assert LlamaForCausalLM._can_set_attn_implementation()
    assert not BloomForCausalLM._can_set_attn_implementation()


# --- peft: peft_mose/model.py, peft_mose/_registration.py ------------------------------------------------------


def test_state_dict_key_helpers():
    assert parameters(tuners_utils._filter_state_dict_by_key_prefixes) == [
        ("state_dict", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("prefixes", P.POSITIONAL_OR_KEYWORD, P.empty),
    ]
    assert parameters(tuners_utils._get_tuner_state_dict_key_prefixes) == [
        ("model", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("adapter_name", P.POSITIONAL_OR_KEYWORD, None),
    ]
    state = {"a.mose_A.default": 1, "a.base_layer.weight": 2}
    assert tuners_utils._filter_state_dict_by_key_prefixes(state, {"a.mose_A"}) == {"a.mose_A.default": 1}


def test_remap_adapter_state_dict_for_load():
    assert isinstance(inspect.getattr_static(BaseTuner, "_remap_adapter_state_dict_for_load"), classmethod)
    assert parameters(BaseTuner._remap_adapter_state_dict_for_load) == [
        (name, P.POSITIONAL_OR_KEYWORD, P.empty) for name in ("model", "config", "adapter_name", "state_dict")
    ]
    # MoSEModel overrides it with the same call shape.
    assert parameters(MoSEModel._remap_adapter_state_dict_for_load) == parameters(
        BaseTuner._remap_adapter_state_dict_for_load
    )


def test_peft_model_enters_the_tuner_forward_hook_with_the_call_arguments(llama):
    assert parameters(PeftModel._enable_peft_forward_hooks) == [
        ("self", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("args", P.VAR_POSITIONAL, P.empty),
        ("kwargs", P.VAR_KEYWORD, P.empty),
    ]
    # MoSE reads the call's modality ids in the tuner's hook: PEFT must enter it from forward and generate.
    model = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    tuner_hook = model.base_model._enable_peft_forward_hooks
    seen = []

    def recording(*args, **kwargs):
        seen.append(sorted(kwargs))
        return tuner_hook(*args, **kwargs)

    model.base_model._enable_peft_forward_hooks = recording
    ids = random_tokens(batch=1, seq=4)
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
    assert len(seen) == 2 and all("input_ids" in kwargs for kwargs in seen)


@pytest.mark.parametrize(
    ("name", "value_check"),
    [
        ("PEFT_TYPE_TO_CONFIG_MAPPING", lambda v: issubclass(v, PeftConfig)),
        ("PEFT_TYPE_TO_TUNER_MAPPING", lambda v: issubclass(v, BaseTuner)),
        ("PEFT_TYPE_TO_PREFIX_MAPPING", lambda v: isinstance(v, str)),
    ],
)
def test_peft_type_mappings(name, value_check):
    table = getattr(mapping, name)
    assert type(table) is dict
    assert value_check(table["LORA"]) and value_check(table[MoSEPeftType.MOSE])  # a built-in method, and ours


# --- peft: peft_mose/_compat/peft.py (the adapter checksum) ---------------------------------------------------------


def test_adapter_save_and_load_globals_are_wrapped():
    from peft import peft_model
    from peft.utils import save_and_load
    from safetensors.torch import save_file

    assert peft_model.safe_save_file.__wrapped__ is save_file
    assert peft_model.load_peft_weights.__wrapped__ is save_and_load.load_peft_weights
    assert parameters(save_file) == [
        ("tensors", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("filename", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("metadata", P.POSITIONAL_OR_KEYWORD, None),
    ]
    assert parameters(save_and_load.load_peft_weights) == [
        ("model_id", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("device", P.POSITIONAL_OR_KEYWORD, None),
        ("key_mapping", P.POSITIONAL_OR_KEYWORD, None),
        ("hf_hub_download_kwargs", P.VAR_KEYWORD, P.empty),
    ]


def test_peft_model_saves_and_loads_adapters_through_the_wrapped_globals(llama, tmp_path, monkeypatch):
    from peft import peft_model

    from peft_mose import MoSEConfig

    calls = []

    def recorded(name: str) -> Callable:
        wrapped = getattr(peft_model, name)
        return lambda *args, **kwargs: calls.append((name, args, kwargs)) or wrapped(*args, **kwargs)

    for name in ("safe_save_file", "load_peft_weights"):
        monkeypatch.setattr(peft_model, name, recorded(name))
    model = get_peft_model(llama, MoSEConfig(r=2))
    model.save_pretrained(str(tmp_path))
    model.load_adapter(str(tmp_path), adapter_name="again")
    (save, save_args, save_kwargs), (load, load_args, _) = calls
    assert save == "safe_save_file" and save_args[1] == str(tmp_path / "adapter_model.safetensors")
    assert save_kwargs == {"metadata": {"format": "pt"}}  # the metadata the checksum is added to
    assert load == "load_peft_weights" and load_args == (str(tmp_path),)  # the folder comes first, positionally


def test_peft_saves_the_adapter_weights_before_its_config(llama, tmp_path, monkeypatch):
    """``MoSEConfig.save_pretrained`` records the config's result fields in the weights file it finds beside it
    (peft_mose/_compat/peft.py): PeftModel.save_pretrained must write the weights first, then the config."""
    from peft import peft_model

    from peft_mose import MoSEConfig
    from peft_mose.checksum import CONFIG_KEY

    order = []
    save = peft_model.safe_save_file
    monkeypatch.setattr(peft_model, "safe_save_file", lambda *a, **k: (order.append("weights"), save(*a, **k))[1])
    monkeypatch.setattr(PeftConfig, "to_dict", lambda self, f=PeftConfig.to_dict: (order.append("config"), f(self))[1])
    get_peft_model(llama, MoSEConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert order == ["weights", "config"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()[CONFIG_KEY])["r"] == 4


def test_peft_config_get_peft_type_is_the_classmethod_from_pretrained_calls():
    """Wrapped to name a bad adapter_config.json (peft_mose/_compat/peft.py): PeftModel.from_pretrained must call
    ``PeftConfig._get_peft_type(model_id, **hf_kwargs)`` and index ``PEFT_TYPE_TO_CONFIG_MAPPING`` with it."""
    source = inspect.getsource(PeftModel.from_pretrained)
    assert "PEFT_TYPE_TO_CONFIG_MAPPING[PeftConfig._get_peft_type(model_id, **hf_kwargs)]" in source
    assert parameters(inspect.getattr_static(PeftConfig, "_get_peft_type").__func__.__wrapped__) == [
        ("cls", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("model_id", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("hf_hub_download_kwargs", P.VAR_KEYWORD, P.empty),
    ]
