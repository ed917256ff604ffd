"""Shared pytest setup: an offline Hugging Face environment, the tiny random SD3 pipelines and the training runs
several test modules read, each built once per session."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Set before anything imports huggingface_hub / transformers / diffusers: nothing is downloaded or cached
# under the home directory.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="purecc-hf-home-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "tests"):  # `import utils...` and `import helpers` whatever the directory
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from helpers import DATA, stage1  # noqa: E402

# 64 px, 2 optimizer steps per stage, 2 sampling steps. The learning rates are far above the real ones so that two
# steps move the LoRA enough to change an image visibly (tests compare LoRA and base images).
CONCEPT_RUN_SETTINGS = dict(RESOLUTION="64", STAGE1_STEPS="2", STAGE2_STEPS="2", GRAD_ACCUM="1", INFER_STEPS="2",
                            NUM_IMAGES="1", STAGE1_LR="1e-2", STAGE2_LR="1e-2", SEED="0", FORCE="0", SAMPLES="1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def _build(tmp_path_factory, variant: str) -> Path:
    from utils.tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp(f"tiny_{variant}") / "model", variant=variant, seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory) -> Path:
    """Tiny random SD3 pipeline folder (diffusers' SD3 test layout: patch 1, 4 latent channels, VAE factor 1)."""
    return _build(tmp_path_factory, "sd3")


@pytest.fixture(scope="session")
def tiny_sd35_path(tmp_path_factory) -> Path:
    """Tiny random SD3.5-Medium-like folder (dual attention, RMS qk-norm, patch 2, 16 channels, VAE factor 2)."""
    return _build(tmp_path_factory, "sd35")


@pytest.fixture(params=["sd3", "sd35"])
def tiny_model_path(request) -> Path:
    """Both tiny variants in turn (each built once per session)."""
    return request.getfixturevalue(f"tiny_{request.param}_path")


@pytest.fixture(scope="session")
def extractors(tiny_sd35_path, tmp_path_factory):
    """Two different stage-1 LoRAs (seeds 0 and 1, 3 steps at lr 1e-2) of the example concept on tiny SD3.5."""
    root = tmp_path_factory.mktemp("extractors")
    for name, seed in (("a", 0), ("b", 1)):
        stage1(tiny_sd35_path, root / name, "--learning_rate", "1e-2", "--seed", seed, steps=3)
    return root / "a", root / "b"


def run_script(script: Path, *args, env_overrides: dict | None = None, hf_home: Path,
               cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """A shell script of scripts/ as a user runs it, with this interpreter as PYTHON."""
    env = dict(os.environ, PYTHON=sys.executable, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **(env_overrides or {}))
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="session")
def script_runner():
    return run_script


@pytest.fixture(scope="session")
def concept_run(tiny_sd35_path, tmp_path_factory) -> dict:
    """scripts/run_concept.sh once (tiny settings) for data/robot_toy.csv: {out, stage1, stage2, samples, env, ...}."""
    root = tmp_path_factory.mktemp("concept_run")
    env = dict(CONCEPT_RUN_SETTINGS, MODEL_NAME=str(tiny_sd35_path), OUTPUT_DIR=str(root / "output"))
    result = run_script(REPO_ROOT / "scripts" / "run_concept.sh", DATA / "robot_toy.csv", env_overrides=env,
                        hf_home=root / "hf")
    assert result.returncode == 0, f"run_concept.sh failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    out = root / "output"
    return dict(root=root, out=out, env=env, stdout=result.stdout, stderr=result.stderr, model=tiny_sd35_path,
                stage1=out / "base_ckpt" / "robot_toy", stage2=out / "robot_toy", samples=out / "robot_toy" / "samples")


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses a second mixed precision in it; a bf16 run in
    this process (a launched run has a process of its own) starts from a fresh state and leaves one behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
