"""``accelerate launch`` with the shipped DeepSpeed configs (``recipes/configs/accelerate_zero2.yaml``,
``accelerate_zero3.yaml``): two CPU ranks over gloo train the built-in default on different batches, one process
saves, and the saved adapter reloads to the trained model's outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from conftest import free_port

from mosear_recipes.modeling import read_reference_outputs
from mosear_recipes.run import load_trained
from mosear_recipes.run_config import ADAPTER_DIR, REFERENCE_FILE, RUN_CONFIG

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "merr_finetune.py"
STEPS = 4  # one epoch of 4 optimizer steps per rank
SHORT = ["--iters_per_epoch", str(STEPS), "--num_train_epochs", "1", "--warmup_steps", "1", "--logging_steps", "1",
         "--save_strategy", "no", "--eval_annotation", "none", "--val_size", "0", "--eval_strategy", "no",
         "--disable_tqdm", "true"]  # fmt: skip

# Runs recipes/merr_finetune.py itself (runpy) and records, for every training step of this process, what the process
# believes about itself and which samples it trained on: <output_dir>/accelerate_rank<R>.json, R the rank the launcher
# gave the process (the real one, even when accelerate miscounts). The script must have ended its process group.
RECORDER = """
import json, os, runpy, sys
from pathlib import Path

import torch
from mosear_recipes.trainer import MoSETrainer

seen = []
training_step = MoSETrainer.training_step


def recording_step(self, model, inputs, *args, **kwargs):
    plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
    seen.append({{
        "step": self.state.global_step, "process_index": self.args.process_index,
        "world_size": self.args.world_size, "should_save": self.args.should_save,
        "engine": type(model).__name__, "zero_stage": plugin.zero_stage if plugin is not None else None,
        # ZeRO-3 releases its partitions between forward passes: the frozen LLM's weights hold 0 elements here
        "partitioned": any(getattr(p, "ds_numel", 0) > 0 and p.numel() == 0 for p in model.parameters()),
        "task": inputs["tasks"][0], "names": list(inputs["names"]),
    }})
    return training_step(self, model, inputs, *args, **kwargs)


MoSETrainer.training_step = recording_step
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
assert not torch.distributed.is_initialized(), "the script left its process group to interpreter shutdown"
out = Path(sys.argv[sys.argv.index("--output_dir") + 1])
(out / f"accelerate_rank{{os.environ['RANK']}}.json").write_text(json.dumps(seen))
"""


def run_accelerate(config: Path, script: Path, script_args: list[str], extensions_dir: str) -> None:
    """``accelerate launch --config_file config --num_processes 2 script ...`` on CPU with its own port; afterwards
    remove any shared-memory all-reduce buffers of DeepSpeed's CPU backend left in ``/dev/shm`` (they carry the port in
    their name) and check that none is left."""
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": extensions_dir}
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [accelerate, "launch", "--config_file", str(config), "--num_processes", "2",
               "--main_process_port", str(port), str(script), *script_args]  # fmt: skip
    try:
        done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            buffer.unlink(missing_ok=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_launch_deepspeed_two_cpu_ranks(tmp_path, extensions_dir, stage):
    """The documented command with a short schedule: ranks 0 and 1 of 2 (accelerate counts them right, not each as
    process 0 of 1), DeepSpeed's engine at the config's ZeRO stage, different batches on the two ranks, only rank 0
    saves, the saved adapter has its real shapes and reloads to the trained model's reference outputs."""
    config = ROOT / "recipes" / "configs" / f"accelerate_zero{stage}.yaml"
    recorder = tmp_path / "record.py"
    recorder.write_text(RECORDER.format(script=str(SCRIPT)))
    out = tmp_path / "run"
    start = time.monotonic()
    run_accelerate(config, recorder, ["--output_dir", str(out), *SHORT], extensions_dir)
    print(f"accelerate launch, ZeRO-{stage}, 2 ranks: {time.monotonic() - start:.1f} s")

    run_config = json.loads((out / RUN_CONFIG).read_text())
    assert run_config["world_size"] == 2
    assert run_config["arguments"]["training"]["deepspeed"] is None  # DeepSpeed from the accelerate config only
    ranks = [json.loads((out / f"accelerate_rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, steps in enumerate(ranks):
        assert [s["step"] for s in steps] == list(range(STEPS))
        assert {(s["process_index"], s["world_size"]) for s in steps} == {(rank, 2)}
        assert {(s["engine"], s["zero_stage"]) for s in steps} == {("DeepSpeedEngine", stage)}
        assert {s["partitioned"] for s in steps} == {stage == 3}
        assert {s["should_save"] for s in steps} == {rank == 0}  # one process saves
    for step in range(STEPS):
        assert ranks[0][step]["names"] != ranks[1][step]["names"], f"both ranks trained on the same batch at {step}"
    batches = [tuple(s["names"]) for steps in ranks for s in steps]  # 4 steps x 2 ranks: the sampler's 8 batches
    assert len(set(batches)) == len(batches)

    trained = load_trained(out)
    expected = {k: v.shape for k, v in get_peft_model_state_dict(trained.model.llm).items()}
    adapter = load_file(str(out / ADAPTER_DIR / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in adapter.items()} == expected  # under ZeRO-3 gathered, not empty (0,) tensors
    assert any(bool(v.abs().sum() > 0) for k, v in adapter.items() if k.endswith("mose_B"))  # trained, not the init
    batch, logits = read_reference_outputs(out / REFERENCE_FILE)
    with torch.no_grad():  # the subprocess ran with one thread, this one may use more
        torch.testing.assert_close(trained.model(**batch).logits, logits, rtol=0, atol=1e-5)
