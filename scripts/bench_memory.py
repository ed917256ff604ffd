"""Peak memory of stage 1 vs stage 2 on the same model, data and settings (prints figures; not a test).

Each stage runs in its own fresh process for a few steps. On CUDA the figure is torch.cuda.max_memory_allocated
(what the training itself holds); on the CPU it is the process's peak RSS (libraries included, so the tiny model's
difference is small next to the interpreter's ~1 GB). Stage 2 keeps one base transformer for the frozen extractor,
the frozen base and the trainable LoRA, so it should cost little more than stage 1 (paper: 30 vs 28 GB on an A100).

    python scripts/bench_memory.py --pretrained_model_name_or_path tiny_models/sd35 --resolution 64
    python scripts/bench_memory.py --pretrained_model_name_or_path /path/to/SD3.5-medium --resolution 512 \
        --extra "--mixed_precision bf16 --gradient_checkpointing"
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs inside the child process: train, then report this process's peak memory as one JSON line.
CHILD = """
import json, resource, sys, torch
sys.path.insert(0, {repo!r})
import {module} as stage
stage.main({argv!r})
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("PEAK " + json.dumps({{"bytes": peak, "device": "cuda" if torch.cuda.is_available() else "cpu"}}))
"""


def peak_of(module: str, argv: list[str]) -> dict:
    code = CHILD.format(repo=str(REPO), module=module, argv=argv)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{module} failed:\n{result.stderr[-3000:]}")
    line = [line for line in result.stdout.splitlines() if line.startswith("PEAK ")][-1]
    return json.loads(line[5:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--data_path", default=str(REPO / "data"))
    p.add_argument("--csv_name", default="robot_toy.csv")
    p.add_argument("--resolution", default="512")
    p.add_argument("--steps", default="3")
    p.add_argument("--extra", default="", help="Extra flags for both stages, one string.")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        common = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--data_path",
                  args.data_path, "--csv_name", args.csv_name, "--resolution", args.resolution, "--max_train_steps",
                  args.steps, "--report_to", "none", "--checkpointing_steps", "100000", *shlex.split(args.extra)]
        concept = Path(args.csv_name).stem
        stage1 = peak_of("train_stage1_sd3", common + ["--output_dir", f"{out}/base_ckpt/{concept}"])
        stage2 = peak_of("train_stage2_v2_sd3", common + ["--output_dir", out])
    gib = 2**30
    print(f"device: {stage1['device']}  (peak {'allocated' if stage1['device'] == 'cuda' else 'RSS'})")
    print(f"stage 1: {stage1['bytes'] / gib:8.3f} GiB")
    print(f"stage 2: {stage2['bytes'] / gib:8.3f} GiB   ({stage2['bytes'] / stage1['bytes'] - 1:+.1%} vs stage 1)")


if __name__ == "__main__":
    main()
