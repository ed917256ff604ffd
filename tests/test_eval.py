"""eval.py: drift is zero for a LoRA that changes nothing, positive for a trained one; bad inputs fail early."""

from __future__ import annotations

import json

import pytest
from helpers import REPO_ROOT, run_python

import eval as evaluate
import train_stage1_sd3 as stage1
from utils.lora import make_lora_config, save_lora_both_formats, transformer_target_modules


@pytest.fixture(scope="module")
def loras(tiny_sd35_path, tmp_path_factory):
    """A trained stage-1 LoRA and an untrained one (gaussian A, zero B: exactly the base model)."""
    root = tmp_path_factory.mktemp("eval_loras")
    result = stage1.main(["--pretrained_model_name_or_path", str(tiny_sd35_path), "--data_path",
                          str(REPO_ROOT / "data"), "--csv_name", "robot_toy.csv", "--output_dir", str(root / "trained"),
                          "--max_train_steps", "3", "--learning_rate", "1e-2", "--resolution", "64",
                          "--report_to", "none"])
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(result.transformer, adapter_name="default")
    zero = {k: (v * 0 if "lora_B" in k else v).detach().clone() for k, v in state.items()}
    save_lora_both_formats(root / "zero", zero, make_lora_config(4, transformer_target_modules(None, None)))
    return root / "trained", root / "zero"


def test_drift_zero_for_identity_lora_and_positive_for_trained(tiny_sd35_path, loras, tmp_path):
    trained, zero = loras
    out = tmp_path / "eval.json"
    results = evaluate.main(["--pretrained_model_name_or_path", str(tiny_sd35_path), "--data_path",
                             str(REPO_ROOT / "data"), "--csv_name", "robot_toy.csv", "--lora", str(trained),
                             "--lora", str(zero), "--resolution", "64", "--num_noise_seeds", "1",
                             "--sigmas", "0.5", "--output_json", str(out)])
    assert results[str(zero)]["preservation_drift"] == 0.0
    assert results[str(zero)]["concept_loss"] == pytest.approx(results["base"]["concept_loss"], rel=1e-6)
    assert results[str(trained)]["preservation_drift"] > 1e-8
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"base", str(trained), str(zero)}
    assert saved["sigmas"] == [0.5]
    assert not any("sks" in prompt for prompt in saved["preservation_prompts"])


def test_preservation_prompt_with_the_concept_is_rejected(tiny_sd35_path, loras, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a dog\na photo of sks robot toy in paris\n")
    result = run_python("eval.py", "--pretrained_model_name_or_path", tiny_sd35_path, "--data_path", "data",
                        "--csv_name", "robot_toy.csv", "--lora", loras[0], "--preservation_prompts_file", prompts)
    assert result.returncode == 2
    assert "sks robot toy" in result.stderr and "Traceback" not in result.stderr


def test_missing_lora_is_rejected(tiny_sd35_path, tmp_path):
    result = run_python("eval.py", "--pretrained_model_name_or_path", tiny_sd35_path, "--data_path", "data",
                        "--csv_name", "robot_toy.csv", "--lora", tmp_path / "nothing")
    assert result.returncode == 2
    assert "--lora" in result.stderr and str(tmp_path / "nothing") in result.stderr
