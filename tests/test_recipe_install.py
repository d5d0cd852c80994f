"""The recipe library is installed with the project: its ``python -m`` commands work from any folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from mosear_recipes.merr.readers import read_annotations


def test_tiny_setup_module_runs_from_any_folder(tmp_path: Path):
    """``python -m mosear_recipes.tiny_setup OUT`` run in an unrelated folder writes the data and the model there."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    done = subprocess.run([sys.executable, "-m", "mosear_recipes.tiny_setup", "tiny", "--num_samples", "8"],
                          cwd=work, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data, model = work / "tiny" / "data", work / "tiny" / "model"
    assert done.stdout.splitlines()[-2:] == ["data: tiny/data", "model: tiny/model"]  # relative to the folder
    train, test = (read_annotations(data / name) for name in ("MERR_coarse_grained.txt", "synthetic_test.txt"))
    assert len(train) + len(test) == 8 and len(test) >= 1
    spec = json.loads((data / "feature_spec.json").read_text())
    eva = np.load(next((data / spec["eva_dir"]).glob("*.npy")))
    assert eva.shape == (spec["eva_patches"] + 1, spec["eva_dim"])
    assert json.loads((model / "config.json").read_text())["model_type"] == "llama"
