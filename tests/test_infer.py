"""infer.py and the authors' inference snippet on a stage-2 output of our own trainers (tiny SD3.5 model).

The stage-2 LoRA comes from the session's run_concept.sh run (the ``concept_run`` fixture). Pipelines run in this
process: no extra interpreter start-ups."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
from utils.checks import BadInput, exit_on_error

PROMPT = "a photo of sks robot toy on a wooden table"
SEED = 42
SIZE = 64
STEPS = 2


def snippet_image(model: Path, lora_dir: Path | None = None, route: str = "peft") -> np.ndarray:
    """The authors' README snippet (fp32, tiny size), float image in [0, 1] of shape [H, W, 3]."""
    from diffusers import DiffusionPipeline
    from peft import PeftModel

    pipe = DiffusionPipeline.from_pretrained(str(model))
    if lora_dir is not None and route == "peft":
        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(lora_dir))
    elif lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, generator=torch.manual_seed(SEED), height=SIZE, width=SIZE,
               num_inference_steps=STEPS, output_type="np")
    return out.images[0]


@pytest.fixture(scope="module")
def snippet(concept_run) -> dict:
    model, lora = concept_run["model"], concept_run["stage2"]
    return {"base": snippet_image(model), "peft": snippet_image(model, lora, "peft"),
            "diffusers": snippet_image(model, lora, "diffusers")}


def as_uint8(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().astype(np.int16)  # diffusers' numpy_to_pil rounding


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def infer_args(model: Path, out: Path, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--prompt", PROMPT, "--seed", str(SEED),
            "--num_inference_steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE),
            "--output_dir", str(out), *map(str, extra)]


# ----------------------------------------------------------------------------------------------- authors' snippet
def test_authors_snippet_loads_our_stage2_output(snippet):
    assert snippet["peft"].shape == (SIZE, SIZE, 3)
    assert np.abs(snippet["peft"] - snippet["base"]).max() > 1e-3, "the LoRA did not change the image"


def test_load_lora_weights_gives_the_same_image_as_peft(snippet):
    assert np.abs(snippet["diffusers"] - snippet["base"]).max() > 1e-3
    assert np.allclose(snippet["diffusers"], snippet["peft"], atol=1e-5)


# ----------------------------------------------------------------------------------------------- infer.py
def test_infer_reproduces_the_snippet_and_writes_sidecars(concept_run, snippet, tmp_path):
    out = tmp_path / "samples"
    infer.main(infer_args(concept_run["model"], out, "--lora", concept_run["stage2"], "--num_images_per_prompt", 2))
    first = out / f"p000_img00_seed{SEED}.png"
    assert np.abs(png(first) - as_uint8(snippet["diffusers"])).max() <= 1  # same seed, same image
    for j in range(2):
        meta = json.loads((out / f"p000_img{j:02d}_seed{SEED + j}.json").read_text())
        assert meta["prompt"] == PROMPT and meta["seed"] == SEED + j
        assert meta["steps"] == STEPS and meta["guidance"] == 7.0 and meta["size"] == [SIZE, SIZE]
        assert meta["lora"] == str(concept_run["stage2"]) and meta["lora_scale"] == 1.0
    grid = Image.open(out / "grid.png")
    assert grid.width == 2 * SIZE and grid.height > SIZE  # two cells plus the label strip


def test_peft_folder_compare_base_and_instance_word(concept_run, snippet, tmp_path):
    """A PEFT-only copy of the stage-2 folder (format detection), --compare_base, a [v] prompt."""
    peft_only = tmp_path / "peft_only"
    peft_only.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(concept_run["stage2"] / name, peft_only / name)
    out = tmp_path / "samples"
    args = infer_args(concept_run["model"], out, "--lora", peft_only, "--compare_base",
                      "--instance_word", "sks robot toy")
    args[args.index(PROMPT)] = "a photo of [v] on a wooden table"
    infer.main(args)
    stem = f"p000_img00_seed{SEED}"
    assert np.abs(png(out / f"{stem}.png") - as_uint8(snippet["peft"])).max() <= 1
    assert np.abs(png(out / f"base_{stem}.png") - as_uint8(snippet["base"])).max() <= 1  # adapter really off
    pair = Image.open(out / f"compare_{stem}.png")
    assert pair.width == 2 * SIZE and pair.height > SIZE
    meta = json.loads((out / f"{stem}.json").read_text())
    assert meta["prompt"] == PROMPT and meta["prompt_template"] == "a photo of [v] on a wooden table"
    assert meta["seed"] == SEED and meta["lora"] == str(peft_only)
    base_meta = json.loads((out / f"base_{stem}.json").read_text())
    assert base_meta["lora"] is None and base_meta["seed"] == SEED


def test_lora_scale_zero_gives_the_base_image(concept_run, snippet, tmp_path):
    out = tmp_path / "samples"
    infer.main(infer_args(concept_run["model"], out, "--lora", concept_run["stage2"], "--lora_scale", 0))
    assert np.abs(png(out / f"p000_img00_seed{SEED}.png") - as_uint8(snippet["base"])).max() <= 1
    assert json.loads((out / f"p000_img00_seed{SEED}.json").read_text())["lora_scale"] == 0.0


def test_prompts_file_skips_blanks_and_comments(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# header\n\na photo of [v]\n   \n  # indented comment\na dog\n")
    args = infer.parse_args(["--pretrained_model_name_or_path", "m", "--prompt", "first",
                             "--prompts_file", str(prompts), "--instance_word", "sks toy"])
    assert infer.read_prompts(args) == [("first", "first"), ("a photo of [v]", "a photo of sks toy"),
                                        ("a dog", "a dog")]


# ----------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*_):
        raise AssertionError("infer.py loaded the model before checking its inputs")
    monkeypatch.setattr(infer, "load_pipeline", refuse)


BAD_INPUTS = {
    "missing lora dir": (["--lora", "{tmp}/nowhere", "--prompt", "x"], ["--lora", "nowhere", "no such folder"]),
    "lora dir without LoRA": (["--lora", "{tmp}", "--prompt", "x"], ["--lora", "holds no LoRA"]),
    "no prompts": ([], ["--prompt", "--prompts_file"]),
    "prompts file missing": (["--prompts_file", "{tmp}/prompts.txt"], ["--prompts_file", "prompts.txt"]),
    "[v] without instance word": (["--prompt", "a photo of [v]"], ["[v]", "--instance_word"]),
    "height not a multiple of 16": (["--prompt", "x", "--height", "100"], ["--height 100", "multiple of 16"]),
    "width not a multiple of 16": (["--prompt", "x", "--width", "72"], ["--width 72", "multiple of 16"]),
    "compare_base without lora": (["--prompt", "x", "--compare_base"], ["--compare_base", "--lora"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named_before_loading(case, tiny_sd35_path, tmp_path, no_loading):
    flags, expected = BAD_INPUTS[case]
    argv = ["--pretrained_model_name_or_path", str(tiny_sd35_path), "--output_dir", str(tmp_path / "out"),
            *[flag.format(tmp=tmp_path) for flag in flags]]
    with pytest.raises(BadInput) as err:
        infer.main(argv)
    for text in expected:
        assert text in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_input_exits_2_with_one_error_line(tiny_sd35_path, tmp_path, monkeypatch, capsys, no_loading):
    """What ``python infer.py ...`` does with a bad flag (its __main__ is exactly this call), without paying for
    another interpreter start-up."""
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["infer.py", "--pretrained_model_name_or_path", str(tiny_sd35_path),
                                      "--prompt", "x", "--height", "100", "--output_dir", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(infer.main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --height 100 must be a positive multiple of 16 (VAE x patch size); try 96."]
    assert not out.exists()
