"""First-response-token diagnostics (Eq. 1, 6, 14 per layer), the Fig. 3-style plots, the plot command and a smoke
run of the decode benchmark."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama
from peft_mose import Modality
from peft_mose.attention import collect_diagnostics, middle_layers, plot_diagnostics, reallocate_attention
from peft_mose.attention.plot import main as plot_main
from test_ar_backend import make_batch

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def eager_llama():
    model = make_tiny_llama()
    model.set_attn_implementation("eager")
    return model


def last_rows(mask):
    return torch.where(mask.bool(), torch.arange(mask.shape[1]), -1).amax(1)


def test_recorded_statistics_match_the_eager_models_own_attention(eager_llama):
    ids, mask, mods = make_batch(side="right")
    with torch.no_grad():
        attentions = eager_llama(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    diag = collect_diagnostics(eager_llama, mods, input_ids=ids, attention_mask=mask, tau=math.inf)
    assert sorted(diag.layers) == [0, 1]
    valid = mask.bool().numpy()
    visual = valid & (mods == int(Modality.VISUAL)).numpy()
    audio = valid & (mods == int(Modality.AUDIO)).numpy()
    for layer, weights in enumerate(attentions):
        rec = diag.layers[layer]
        for b, row in enumerate(last_rows(mask).tolist()):
            w = weights[b, :, row].double().numpy()  # [heads, keys]
            s_v, s_a = w[:, visual[b]].sum(1), w[:, audio[b]].sum(1)
            assert rec.uap_visual[b].item() == pytest.approx(s_v.mean(), abs=1e-6)
            assert rec.uap_audio[b].item() == pytest.approx(s_a.mean(), abs=1e-6)
            assert rec.layer_ratio[b].item() == pytest.approx(s_a.sum() / s_v.sum(), rel=1e-5)
            np.testing.assert_allclose(rec.token_weights[b].numpy(), w.mean(0), atol=1e-6)
        assert torch.equal(rec.uap_visual_after, rec.uap_visual) and (rec.heads_changed == 0).all()
        assert (rec.mass_moved == 0).all()
    assert torch.equal(diag.modality_ids, mods) and torch.equal(diag.valid, mask.bool())


def test_recorded_reallocation_matches_the_functional_on_the_first_layer(eager_llama):
    ids, mask, mods = make_batch(side="left")
    with torch.no_grad():
        first = eager_llama(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
    diag = collect_diagnostics(eager_llama, mods, input_ids=ids, attention_mask=mask, tau=0.0)
    rec = diag.layers[0]
    valid = mask.bool()
    visual, audio = valid & (mods == int(Modality.VISUAL)), valid & (mods == int(Modality.AUDIO))
    row = ids.shape[1] - 1
    before = first[:, :, row : row + 1]
    after = reallocate_attention(before, visual, audio, tau=0.0)
    changed = (after != before).any(-1)[..., 0]
    assert changed.any()
    torch.testing.assert_close(rec.heads_changed, changed.sum(1).float())
    gained = ((after - before).double() * visual[:, None, None]).sum(-1)[..., 0].mean(1)
    torch.testing.assert_close(rec.mass_moved.double(), gained, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rec.uap_visual_after - rec.uap_visual, rec.mass_moved)
    torch.testing.assert_close(rec.token_weights_after, after[:, :, 0].mean(1))
    assert (rec.mass_moved >= 0).all()


@pytest.mark.parametrize("strategy", ["ar", "pai"])
def test_plots_and_json_are_written(tmp_path, strategy):
    model = make_tiny_llama(num_hidden_layers=4)
    ids, mask, mods = make_batch()
    options = dict(tau=0.0) if strategy == "ar" else {}
    diag = collect_diagnostics(model, mods, input_ids=ids, attention_mask=mask, strategy=strategy, **options)
    paths = plot_diagnostics(diag, tmp_path)
    assert [p.name for p in paths] == ["uap_per_layer.png"] + [f"token_weights_sample{b}.png" for b in range(3)]
    assert all(p.read_bytes().startswith(PNG) for p in paths)
    data = json.loads(diag.save_json(tmp_path / "d.json").read_text())
    assert data["settings"]["strategy"] == strategy and len(data["layers"]) == 4
    assert data["layers"][2]["uap_visual"] == pytest.approx(diag.layers[2].uap_visual.tolist())
    assert diag.stacked("token_weights").shape == (4, 3, ids.shape[1])
    with pytest.raises(ValueError, match="token_layers"):
        plot_diagnostics(diag, tmp_path, token_layers=[7])
    with pytest.raises(ValueError, match="Unknown statistic"):
        diag.stacked("nope")


@pytest.mark.parametrize("suffix", [".pt", ".json"])
def test_plot_command_writes_plots_for_a_saved_model(tmp_path, suffix):
    model_dir = tmp_path / "model"
    make_tiny_llama().save_pretrained(model_dir)
    ids, mask, mods = make_batch()
    batch = {"input_ids": ids, "attention_mask": mask, "modality_ids": mods}
    batch_file = tmp_path / f"batch{suffix}"
    if suffix == ".pt":
        torch.save(batch, batch_file)
    else:
        batch_file.write_text(json.dumps({k: v.tolist() for k, v in batch.items()}))
    out = tmp_path / "plots"
    paths = plot_main([str(model_dir), str(batch_file), "--out", str(out), "--tau", "0", "--layers", "1:2"])
    assert {p.name for p in paths} >= {"diagnostics.json", "uap_per_layer.png", "token_weights_sample2.png"}
    data = json.loads((out / "diagnostics.json").read_text())
    assert data["settings"]["layers"] == [1] and data["settings"]["tau"] == 0.0


def test_plot_command_rejects_a_batch_without_modality_ids(tmp_path, capsys):
    batch_file = tmp_path / "batch.json"
    batch_file.write_text(json.dumps({"input_ids": [[3, 4]]}))
    with pytest.raises(SystemExit) as done:
        plot_main([str(tmp_path), str(batch_file), "--out", str(tmp_path)])
    assert done.value.code == 2 and "must hold `modality_ids`" in capsys.readouterr().err


def test_middle_layers():
    assert middle_layers(32) == list(range(8, 24))
    assert middle_layers(5) == [1, 2, 3] and middle_layers(2) == [0, 1] and middle_layers(1) == [0]
    assert middle_layers(40, fraction=0.25) == list(range(15, 25))
    with pytest.raises(ValueError):
        middle_layers(0)


def test_decode_benchmark_smoke_run():
    spec = importlib.util.spec_from_file_location("ar_decode", ROOT / "benchmarks" / "ar_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.measure_ar_decode(quick=True, new_tokens=2, repeats=1, warmup=0)
    assert set(report["results"]) == {"base", "ar_tau1", "ar_tau0", "pai"}
    for result in report["results"].values():
        assert result["prefill_ms"] > 0 and result["decode_ms_per_token"] > 0
    assert report["prompt_tokens"] == 6 + 256 + 6 + 2 + 1 + 1 + 8
    gate = bench.measure_gate_cost(quick=True, new_tokens=2, repeats=1)
    assert set(gate["results"]) == {"ar", "ar_gate"} and gate["gate_vs_ar_prefill"] > 0 and gate["gate_vs_ar_decode"] > 0
