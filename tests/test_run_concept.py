"""scripts/run_concept.sh and scripts/run_all.sh end to end on the tiny SD3.5 model.

The one expensive thing, a full stage 1 -> stage 2 -> samples run with tiny settings, is the session fixture
``concept_run`` (tests/conftest.py), which tests/test_infer.py reads too."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import REPO_ROOT

RUN_CONCEPT = REPO_ROOT / "scripts" / "run_concept.sh"
RUN_ALL = REPO_ROOT / "scripts" / "run_all.sh"
CONCEPT = "robot_toy"
WEIGHTS = "pytorch_lora_weights.safetensors"

# the session's run_concept.sh run is shared with the other concept_run module: same xdist worker
pytestmark = pytest.mark.xdist_group("concept_run")


# ----------------------------------------------------------------------------------------------- the full run
def test_run_writes_both_loras_and_samples(concept_run):
    for stage_dir in (concept_run["stage1"], concept_run["stage2"]):
        for name in (WEIGHTS, "adapter_model.safetensors", "adapter_config.json"):
            assert (stage_dir / name).is_file(), f"{stage_dir / name} missing"
    samples = concept_run["samples"]
    prompts = (samples / "prompts.txt").read_text().splitlines()
    assert len(prompts) >= 6 and any("[v]" in p for p in prompts)
    assert (samples / "grid.png").is_file()
    for i in range(len(prompts)):  # NUM_IMAGES=1: one LoRA image, base image and comparison per prompt
        stem = f"p{i:03d}_img00_seed0"
        for name in (f"{stem}.png", f"{stem}.json", f"base_{stem}.png", f"compare_{stem}.png"):
            assert (samples / name).is_file(), f"{name} missing from {samples}"
    assert "stage 1: training" in concept_run["stdout"] and "stage 2: training" in concept_run["stdout"]


def test_the_chain_prints_none_of_the_known_harmless_library_messages(concept_run):
    """Stage 1, stage 2 and infer.py each start an interpreter of their own here; none of them prints a message
    that utils/quiet.py drops (infer.py printed transformers' torchvision notice while it imported diffusers
    before utils)."""
    for fragment in ("requires torchvision (not installed)", "should be kept in float32: []",
                     "Already found a `peft_config` attribute"):
        assert fragment not in concept_run["stderr"], fragment


def test_samples_substitute_the_instance_word(concept_run):
    samples = concept_run["samples"]
    prompts = (samples / "prompts.txt").read_text().splitlines()
    index = next(i for i, p in enumerate(prompts) if "[v]" in p)
    meta = json.loads((samples / f"p{index:03d}_img00_seed0.json").read_text())
    assert meta["prompt_template"] == prompts[index]
    assert meta["prompt"] == prompts[index].replace("[v]", "sks robot toy")
    assert meta["seed"] == 0 and meta["steps"] == 2 and meta["size"] == [64, 64]
    assert Path(meta["lora"]) == concept_run["stage2"]


def test_rerun_skips_finished_stages(concept_run, script_runner):
    weights = [concept_run["stage1"] / WEIGHTS, concept_run["stage2"] / WEIGHTS]
    mtimes = [path.stat().st_mtime_ns for path in weights]
    env = dict(concept_run["env"], SAMPLES="0")  # rendering was checked above; keep the rerun cheap
    result = script_runner(RUN_CONCEPT, REPO_ROOT / "data" / f"{CONCEPT}.csv", env_overrides=env,
                           hf_home=concept_run["root"] / "hf")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stage 1: skip" in result.stdout and "stage 2: skip" in result.stdout, result.stdout
    assert "training" not in result.stdout
    assert [path.stat().st_mtime_ns for path in weights] == mtimes


# ----------------------------------------------------------------------------------------------- bad inputs
def test_missing_csv_names_it(tmp_path, script_runner):
    missing = tmp_path / "no_such_concept.csv"
    result = script_runner(RUN_CONCEPT, missing, env_overrides={"MODEL_NAME": str(tmp_path)}, hf_home=tmp_path / "hf")
    assert result.returncode != 0
    assert str(missing) in result.stderr and "not found" in result.stderr


def test_missing_model_name_is_explained(tmp_path):
    env = dict(os.environ)
    env.pop("MODEL_NAME", None)
    result = subprocess.run(["bash", str(RUN_CONCEPT), str(REPO_ROOT / "data" / f"{CONCEPT}.csv")], cwd=REPO_ROOT,
                            env=dict(env, HF_HOME=str(tmp_path / "hf")), capture_output=True, text=True)
    assert result.returncode != 0
    assert "MODEL_NAME" in result.stderr


def test_run_all_keeps_going_and_reports_failures(concept_run, tmp_path, script_runner):
    """One finished concept (skipped, nothing rendered) and one missing CSV: both attempted, failure reported."""
    missing = tmp_path / "ghost.csv"
    env = dict(concept_run["env"], SAMPLES="0")
    result = script_runner(RUN_ALL, missing, REPO_ROOT / "data" / f"{CONCEPT}.csv", env_overrides=env,
                           hf_home=concept_run["root"] / "hf")
    assert result.returncode != 0
    assert "stage 2: skip" in result.stdout  # the concept after the failed one still ran
    assert "ghost" in result.stderr + result.stdout and "1 of 2" in result.stderr + result.stdout
    summary = result.stdout[result.stdout.index("[run_all] summary"):].splitlines()
    assert summary[1].split() == ["concept", "stage", "status", "time", "output"]
    assert summary[2].split()[:4] == ["ghost", "inputs", "FAILED", "(2)"]
    assert summary[3].split()[:3] == [CONCEPT, "done", "ok"] and summary[3].endswith(f"output/{CONCEPT}")


def test_run_all_spreads_concepts_over_gpus(concept_run, tmp_path, script_runner):
    """--gpus 0,1: one concept per GPU id in parallel (CUDA_VISIBLE_DEVICES), each logged to its own file."""
    missing = tmp_path / "ghost.csv"
    env = dict(concept_run["env"], SAMPLES="0")
    result = script_runner(RUN_ALL, "--gpus", "0,1", missing, REPO_ROOT / "data" / f"{CONCEPT}.csv",
                           env_overrides=env, hf_home=concept_run["root"] / "hf")
    assert result.returncode == 1
    assert "[run_all] GPU 0: " in result.stdout and "[run_all] GPU 1: " in result.stdout
    logs = Path(env["OUTPUT_DIR"]) / "logs"
    assert "stage 2: skip" in (logs / f"{CONCEPT}.log").read_text()
    assert "not found" in (logs / "ghost.log").read_text()
    assert "1 of 2 concept(s) failed" in result.stderr


def test_bad_stage2_flag_is_one_line_before_anything_trains(tmp_path, script_runner, tiny_sd35_path):
    """Every stage's inputs are checked before the first launch: a bad stage-2 flag stops the run before stage 1
    trains, with the script's one error line and no traceback."""
    env = dict(MODEL_NAME=str(tiny_sd35_path), OUTPUT_DIR=str(tmp_path / "output"), RESOLUTION="64",
               STAGE2_ARGS="--eta nan")
    result = script_runner(RUN_CONCEPT, REPO_ROOT / "data" / f"{CONCEPT}.csv", env_overrides=env, hf_home=tmp_path / "hf")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--eta" in errors[0], result.stderr
    assert result.stderr.splitlines() == errors  # nothing else: no library noise at import of either script
    assert "Traceback" not in result.stderr and "training" not in result.stdout
    assert not (tmp_path / "output" / "base_ckpt").exists()
