"""Shared pytest setup: offline Hugging Face environment and tiny random SD3 pipelines built once per session."""

import os
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
if str(REPO_ROOT) not in sys.path:  # `import utils...` whatever the invocation directory
    sys.path.insert(0, str(REPO_ROOT))


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
