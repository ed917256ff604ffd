"""scripts/run_concept.sh and scripts/run_all.sh end to end on the tiny SD3.5 model.

The one expensive thing, a full stage 1 -> stage 2 -> samples run with tiny settings, happens once per session in
``shared_concept_run`` and is reused here and by tests/test_infer.py (which imports it: a fixture imported into two
modules would run twice, a module-level cache does not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_CONCEPT = REPO_ROOT / "scripts" / "run_concept.sh"
RUN_ALL = REPO_ROOT / "scripts" / "run_all.sh"
CONCEPT = "robot_toy"
WEIGHTS = "pytorch_lora_weights.safetensors"
# 64 px, 2 optimizer steps per stage, 2 sampling steps. The learning rates are far above the real ones so that two
# steps move the LoRA enough to change an image visibly (tests compare LoRA and base images).
TINY_SETTINGS = dict(RESOLUTION="64", STAGE1_STEPS="2", STAGE2_STEPS="2", GRAD_ACCUM="1", INFER_STEPS="2",
                     NUM_IMAGES="1", STAGE1_LR="1e-2", STAGE2_LR="1e-2", SEED="0", FORCE="0", SAMPLES="1")

_RUNS: dict[str, dict] = {}


def run_script(script: Path, *args, env_overrides: dict | None = None, hf_home: Path,
               cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **(env_overrides or {}))
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)


def shared_concept_run(model_path: Path, tmp_path_factory) -> dict:
    """Run run_concept.sh once (tiny settings) for data/robot_toy.csv; {out, stage1, stage2, samples, env, ...}."""
    if "run" not in _RUNS:
        root = tmp_path_factory.mktemp("concept_run")
        env = dict(TINY_SETTINGS, MODEL_NAME=str(model_path), OUTPUT_DIR=str(root / "output"))
        result = run_script(RUN_CONCEPT, REPO_ROOT / "data" / f"{CONCEPT}.csv", env_overrides=env,
                            hf_home=root / "hf")
        assert result.returncode == 0, f"run_concept.sh failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        out = root / "output"
        _RUNS["run"] = dict(root=root, out=out, env=env, stdout=result.stdout, model=model_path,
                            stage1=out / "base_ckpt" / CONCEPT, stage2=out / CONCEPT, samples=out / CONCEPT / "samples")
    return _RUNS["run"]


@pytest.fixture(scope="module")
def concept_run(tiny_sd35_path, tmp_path_factory) -> dict:
    return shared_concept_run(tiny_sd35_path, tmp_path_factory)


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


def test_samples_substitute_the_instance_word(concept_run):
    samples = concept_run["samples"]
    prompts = (samples / "prompts.txt").read_text().splitlines()
    index = next(i for i, p in enumerate(prompts) if "[v]" in p)
    meta = json.loads((samples / f"p{index:03d}_img00_seed0.json").read_text())
    assert meta["prompt_template"] == prompts[index]
    assert meta["prompt"] == prompts[index].replace("[v]", "sks robot toy")
    assert meta["seed"] == 0 and meta["steps"] == 2 and meta["size"] == [64, 64]
    assert Path(meta["lora"]) == concept_run["stage2"]


def test_rerun_skips_finished_stages(concept_run):
    weights = [concept_run["stage1"] / WEIGHTS, concept_run["stage2"] / WEIGHTS]
    mtimes = [path.stat().st_mtime_ns for path in weights]
    env = dict(concept_run["env"], SAMPLES="0")  # rendering was checked above; keep the rerun cheap
    result = run_script(RUN_CONCEPT, REPO_ROOT / "data" / f"{CONCEPT}.csv", env_overrides=env,
                        hf_home=concept_run["root"] / "hf")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stage 1: skip" in result.stdout and "stage 2: skip" in result.stdout, result.stdout
    assert "training" not in result.stdout
    assert [path.stat().st_mtime_ns for path in weights] == mtimes


# ----------------------------------------------------------------------------------------------- bad inputs
def test_missing_csv_names_it(tmp_path):
    missing = tmp_path / "no_such_concept.csv"
    result = run_script(RUN_CONCEPT, missing, env_overrides={"MODEL_NAME": str(tmp_path)}, hf_home=tmp_path / "hf")
    assert result.returncode != 0
    assert str(missing) in result.stderr and "not found" in result.stderr


def test_missing_model_name_is_explained(tmp_path):
    env = dict(os.environ)
    env.pop("MODEL_NAME", None)
    result = subprocess.run(["bash", str(RUN_CONCEPT), str(REPO_ROOT / "data" / f"{CONCEPT}.csv")], cwd=REPO_ROOT,
                            env=dict(env, HF_HOME=str(tmp_path / "hf")), capture_output=True, text=True)
    assert result.returncode != 0
    assert "MODEL_NAME" in result.stderr


def test_run_all_keeps_going_and_reports_failures(concept_run, tmp_path):
    """One finished concept (skipped, nothing rendered) and one missing CSV: both attempted, failure reported."""
    missing = tmp_path / "ghost.csv"
    env = dict(concept_run["env"], SAMPLES="0")
    result = run_script(RUN_ALL, missing, REPO_ROOT / "data" / f"{CONCEPT}.csv", env_overrides=env,
                        hf_home=concept_run["root"] / "hf")
    assert result.returncode != 0
    assert "stage 2: skip" in result.stdout  # the concept after the failed one still ran
    assert "ghost" in result.stderr + result.stdout and "1 of 2" in result.stderr + result.stdout

