"""Both stages run unchanged under 2-process DDP (gloo on the CPU; torchrun + ACCELERATE_USE_CPU, as
``accelerate launch --multi_gpu`` would on GPUs): every rank trains, rank 0 writes, checkpoints hold each rank's RNG."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO_ROOT

from utils.lora import read_transformer_lora


def torchrun(script, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO_ROOT / script),
           *[str(a) for a in args]]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_stage1_then_stage2_under_ddp(tiny_sd35_path, tmp_path):
    common = ["--pretrained_model_name_or_path", tiny_sd35_path, "--data_path", "data", "--csv_name",
              "robot_toy.csv", "--resolution", "64", "--max_train_steps", "2", "--checkpointing_steps", "2",
              "--learning_rate", "1e-2", "--report_to", "none"]
    torchrun("train_stage1_sd3.py", *common, "--output_dir", tmp_path / "base_ckpt" / "robot_toy")
    torchrun("train_stage2_v2_sd3.py", *common, "--output_dir", tmp_path)
    for folder in (tmp_path / "base_ckpt" / "robot_toy", tmp_path / "robot_toy"):
        checkpoint = folder / "checkpoint-2"
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
        state, _ = read_transformer_lora(folder)
        assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in state.items())
