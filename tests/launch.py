"""Run the stage scripts as a user does: ``accelerate launch --cpu --num_processes 1`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CPU = ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--num_cpu_threads_per_process", "2"]


def launch(script: str, *args, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    """``accelerate launch --cpu ... <script> <args>``; fails the test with the script's output when it fails."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *ACCELERATE_CPU, str(REPO_ROOT / script),
           *[str(a) for a in args]]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(cmd, cwd=cwd or REPO_ROOT, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def run_python(script: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """Plain ``python <script> <args>`` (argument checks run before accelerate is even needed)."""
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *[str(a) for a in args]], cwd=cwd or REPO_ROOT,
                          env=dict(os.environ), capture_output=True, text=True)
