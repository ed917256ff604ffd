"""Helpers the tests share (not a test module): running the scripts as a user does, in a subprocess, or their
``main(argv)`` in this process (the same code ``accelerate launch`` runs, minus ~8 s of imports per process)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "data"
ACCELERATE_CPU = ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
TINY = ["--report_to", "none", "--rank", "4"]
RESOLUTION = {"sd3": "32", "sd35": "64"}  # the smallest sizes: the sd35 variant needs a multiple of 4


def launch(script: str, *args, check: bool = True, cwd=None, launcher=ACCELERATE_CPU,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch <launcher flags> <script> <args>``; fails the test with the script's output when it fails."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(REPO_ROOT / script),
           *[str(a) for a in args]]
    result = subprocess.run(cmd, cwd=cwd or REPO_ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def run_python(script: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """Plain ``python <script> <args>`` (argument checks run before accelerate is even needed)."""
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *[str(a) for a in args]], cwd=cwd or REPO_ROOT,
                          env=dict(os.environ), capture_output=True, text=True)


def run_cli(main, *args, monkeypatch, capsys) -> tuple[int, str]:
    """What ``python <script> <args>`` does (its ``__main__`` is ``exit_on_error(main)``), in this process:
    (exit status, stderr). Saves the ~8 s of imports a new interpreter pays."""
    from utils.checks import exit_on_error

    monkeypatch.setattr(sys, "argv", ["script.py", *map(str, args)])
    capsys.readouterr()
    try:
        exit_on_error(main)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def script_status(result) -> int:
    """The training script's own exit status. ``accelerate launch`` exits 1 whatever its child's status was and
    reports the child's in its CalledProcessError ("returned non-zero exit status N")."""
    if result.returncode == 0:
        return 0
    found = re.findall(r"returned non-zero exit status (\d+)", result.stderr)
    return int(found[-1]) if found else result.returncode


def error_line(result) -> str:
    """The script's one ``error: ...`` line (utils.checks.exit_on_error)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def stage1(model, out_dir, *flags, steps: int = 2, data="csv"):
    """train_stage1_sd3.main in this process; ``data``: "csv" (data/robot_toy.csv), "folder" (its images) or the
    Path of another image folder (both folder forms with the instance prompt "a photo of sks robot toy"), or None
    when ``flags`` carry the data flags themselves."""
    import train_stage1_sd3

    if data is None:  # the caller passes its own data flags
        source = []
    elif data == "csv":
        source = ["--data_path", str(DATA), "--csv_name", "robot_toy.csv"]
    else:
        folder = DATA / "robot_toy" if data == "folder" else data
        source = ["--instance_data_dir", str(folder), "--instance_prompt", "a photo of sks robot toy"]
    return train_stage1_sd3.main(["--pretrained_model_name_or_path", str(model), "--output_dir", str(out_dir),
                                  "--resolution", resolution_of(model), "--max_train_steps", str(steps), *TINY,
                                  *source, *map(str, flags)])


def stage2(model, out_root, *flags, steps: int = 2, csv: Path = DATA / "robot_toy.csv"):
    """train_stage2_v2_sd3.main in this process on a concept CSV (default data/robot_toy.csv); lr 1e-3 unless
    ``flags`` say otherwise."""
    import train_stage2_v2_sd3

    return train_stage2_v2_sd3.main(["--pretrained_model_name_or_path", str(model), "--data_path", str(csv.parent),
                                     "--csv_name", csv.name, "--output_dir", str(out_root), "--resolution",
                                     resolution_of(model), "--max_train_steps", str(steps), "--learning_rate", "1e-3",
                                     *TINY, *map(str, flags)])


def resolution_of(model) -> str:
    config = json.loads((Path(model) / "transformer" / "config.json").read_text())
    return RESOLUTION["sd3"] if config["patch_size"] == 1 else RESOLUTION["sd35"]


def lora_tensors(folder) -> dict[str, torch.Tensor]:
    from utils.lora import read_transformer_lora

    return read_transformer_lora(folder)[0]


def checkpoint_names(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("checkpoint-"))


@contextmanager
def logged_messages(logger_name: str):
    """The messages one library logger emits while the block runs, read from a handler on that logger itself
    (diffusers' loggers do not propagate to the root logger that pytest's caplog watches)."""
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
