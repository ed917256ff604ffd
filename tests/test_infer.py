"""infer.py and the authors' inference snippet on a stage-2 output of our own trainers (tiny SD3.5 model).

The stage-2 LoRA comes from the session's run_concept.sh run (the ``concept_run`` fixture). Pipelines run in this
process: no extra interpreter start-ups."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
from helpers import REPO_ROOT, logged_messages
from utils.checks import BadInput, exit_on_error

PROMPT = "a photo of sks robot toy on a wooden table"
SEED = 42
SIZE = 64
STEPS = 2

# the session's run_concept.sh run is shared with the other concept_run module: same xdist worker
pytestmark = pytest.mark.xdist_group("concept_run")


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


def test_prompts_file_skips_blanks_and_comments_and_reads_base_prompts(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# header\n\na photo of [v] | a photo of a toy\n   \n  # indented comment\na dog\n")
    args = infer.parse_args(["--pretrained_model_name_or_path", "m", "--prompt", "first", "--base_prompt", "base",
                             "--prompts_file", str(prompts), "--instance_word", "sks toy",
                             "--csv", str(REPO_ROOT / "data" / "robot_toy.csv")])
    pairs = [(p.template, p.prompt, p.base_prompt) for p in infer.check_args(args).prompts]
    assert pairs[:3] == [("first", "first", "base"), ("a photo of [v]", "a photo of sks toy", "a photo of a toy"),
                         ("a dog", "a dog", "a dog")]
    assert pairs[3] == ("a photo of sks robot toy on a wooden table", "a photo of sks robot toy on a wooden table",
                        "a photo of a robot toy on a wooden table")  # the CSV's prompt and base_prompt
    assert len(pairs) == 3 + 5


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
    "base prompt naming the concept": (["--prompt", "a [v]", "--base_prompt", "a sks dog on grass", "--instance_word",
                                       "sks dog"], ["a sks dog on grass", "names the concept"]),
    "more base prompts than prompts": (["--prompt", "x", "--base_prompt", "y", "--base_prompt", "z"],
                                       ["2 --base_prompt for 1 --prompt"]),
    "[v2] without a second concept": (["--prompt", "[v1] and [v2]", "--instance_word", "sks dog"],
                                      ["[v2]", "--instance_word"]),
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


# ----------------------------------------------------------------------------------------------- base prompts, fusing
def test_compare_base_renders_the_base_prompt_with_the_base_model(concept_run, tmp_path):
    """The paper's Delta-metrics compare the custom model on the complete prompt with the original model on the
    base prompt: the base side renders --base_prompt, bit-identical to the stock pipeline on it."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "samples"
    base_prompt = "a photo of a robot toy on a wooden table"
    infer.main(infer_args(concept_run["model"], out, "--lora", concept_run["stage2"], "--base_prompt", base_prompt,
                          "--compare_base"))
    stem = f"p000_img00_seed{SEED}"
    pipe = DiffusionPipeline.from_pretrained(str(concept_run["model"]))
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompt=base_prompt, generator=torch.manual_seed(SEED), height=SIZE, width=SIZE,
                 num_inference_steps=STEPS, output_type="np").images[0]
    assert np.abs(png(out / f"base_{stem}.png") - as_uint8(stock)).max() <= 1
    meta = json.loads((out / f"base_{stem}.json").read_text())
    assert meta["prompt"] == base_prompt and meta["lora"] is None
    assert json.loads((out / f"{stem}.json").read_text())["prompt"] == PROMPT


def test_fused_and_unfused_loras_give_the_same_images(concept_run, tmp_path):
    fused, separate = tmp_path / "fused", tmp_path / "separate"
    infer.main(infer_args(concept_run["model"], fused, "--lora", concept_run["stage2"]))
    infer.main(infer_args(concept_run["model"], separate, "--lora", concept_run["stage2"], "--no_fuse"))
    stem = f"p000_img00_seed{SEED}"
    assert np.abs(png(fused / f"{stem}.png") - png(separate / f"{stem}.png")).max() <= 1
    assert json.loads((fused / f"{stem}.json").read_text())["fused"] is True


# ----------------------------------------------------------------------------------------------- composition
def hand_composed(model_path, loras, scales):
    """The base transformer with every targeted weight W replaced by W + sum_i scale_i * (alpha_i / r_i) B_i A_i,
    computed here from the LoRA files alone."""
    from diffusers import SD3Transformer2DModel

    from utils.lora import read_transformer_lora

    transformer = SD3Transformer2DModel.from_pretrained(model_path, subfolder="transformer")
    weights = dict(transformer.named_parameters())
    with torch.no_grad():
        for folder, scale in zip(loras, scales):
            state, config = read_transformer_lora(folder)
            for key, a in state.items():
                if ".lora_A." not in key:
                    continue
                module = key.split(".lora_A.")[0]
                b = state[key.replace(".lora_A.", ".lora_B.")]
                weights[f"{module}.weight"] += scale * config.lora_alpha / config.r * (b @ a)
    return transformer


def transformer_inputs(config):
    generator = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, config.in_channels, 8, 8, generator=generator),
                encoder_hidden_states=torch.randn(1, 7, config.joint_attention_dim, generator=generator),
                pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
                timestep=torch.tensor([500.0]), return_dict=False)


@pytest.mark.parametrize("fused", [False, True])
def test_two_loras_compose_to_their_weighted_sum(tiny_sd35_path, extractors, tmp_path, fused):
    args = infer.parse_args(["--pretrained_model_name_or_path", str(tiny_sd35_path), "--prompt", "[v1] next to [v2]",
                             "--instance_word", "sks robot", "--instance_word", "zwx toy", "--lora", str(extractors[0]),
                             "--lora", str(extractors[1]), "--lora_scale", "0.7", "--lora_scale", "1.3",
                             "--output_dir", str(tmp_path)])
    config = infer.check_args(args)
    assert config.prompts[0].prompt == "sks robot next to zwx toy"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = infer.load_pipeline(args, config)
    assert not [w for w in caught if "peft_config" in str(w.message)]  # two LoRAs on purpose: PEFT's warning dropped
    if fused:
        infer.fuse(pipe, config)
    inputs = transformer_inputs(pipe.transformer.config)
    with torch.no_grad():
        composed = pipe.transformer(**inputs)[0]
        expected = hand_composed(tiny_sd35_path, list(extractors), [0.7, 1.3])(**inputs)[0]
        alone = hand_composed(tiny_sd35_path, [extractors[0]], [0.7])(**inputs)[0]
    assert (composed - expected).abs().max().item() < 1e-5
    assert (composed - alone).abs().max().item() > 1e-3  # the second LoRA is really there


# ----------------------------------------------------------------------------------------------- tokens, misfits
def test_learned_token_is_registered_and_fills_the_placeholder(tiny_sd35_path, tmp_path):
    """A LoRA folder with learned_embeds.safetensors: [v] becomes its token, whose rows are the saved ones."""
    from helpers import stage1

    stage1(tiny_sd35_path, tmp_path / "stage1", "--new_concept_token", "<new1>", "--learning_rate", "1e-2", steps=2)
    args = infer.parse_args(["--pretrained_model_name_or_path", str(tiny_sd35_path), "--prompt", "a photo of [v]",
                             "--lora", str(tmp_path / "stage1"), "--output_dir", str(tmp_path / "out")])
    config = infer.check_args(args)
    assert config.prompts[0].prompt == "a photo of <new1>"
    pipe = infer.load_pipeline(args, config)
    from utils.concept_token import read_learned_token

    saved = read_learned_token(tmp_path / "stage1")
    for tokenizer, encoder, name in (("tokenizer", "text_encoder", "embedding_one"),
                                     ("tokenizer_2", "text_encoder_2", "embedding_two")):
        token_id = getattr(pipe, tokenizer).convert_tokens_to_ids("<new1>")
        assert torch.equal(getattr(pipe, encoder).get_input_embeddings().weight[token_id].float(), saved.embeddings[name])


def test_two_loras_with_the_same_token_and_a_misfit_lora_are_refused(tiny_sd35_path, tiny_sd3_path, extractors,
                                                                     tmp_path, no_loading):
    from utils.concept_token import LearnedToken, save_learned_token

    copies = []
    for i in range(2):
        folder = tmp_path / f"lora{i}"
        shutil.copytree(extractors[i], folder)
        save_learned_token(folder, LearnedToken("<new1>", "toy", {"embedding_one": torch.zeros(32),
                                                                  "embedding_two": torch.zeros(48)}))
        copies.append(folder)
    with pytest.raises(BadInput, match="both learned the token <new1>"):
        infer.main(["--pretrained_model_name_or_path", str(tiny_sd35_path), "--prompt", "x", "--lora", str(copies[0]),
                    "--lora", str(copies[1]), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(BadInput) as err:  # an SD3.5-shaped LoRA on the SD3-shaped tiny model
        infer.main(["--pretrained_model_name_or_path", str(tiny_sd3_path), "--prompt", "x", "--lora",
                    str(extractors[0]), "--output_dir", str(tmp_path / "out")])
    assert "does not fit" in str(err.value) and "transformer key" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_transformer_only_lora_loads_without_the_clip_notice(concept_run):
    """diffusers says "No LoRA keys associated to CLIPTextModel" for every LoRA without CLIP parts (most of them);
    it is dropped while such a LoRA loads, and only then."""
    import logging

    from diffusers import StableDiffusion3Pipeline

    from utils.generation import load_lora

    with logged_messages("diffusers.loaders.lora_base") as seen:
        pipe = StableDiffusion3Pipeline.from_pretrained(str(concept_run["model"]))
        load_lora(pipe, concept_run["stage2"], "lora1")
        assert "lora1" in pipe.transformer.peft_config
        assert not [m for m in seen if "No LoRA keys associated to CLIPTextModel" in m], seen
        logging.getLogger("diffusers.loaders.lora_base").warning(
            "No LoRA keys associated to CLIPTextModel found (a later, real one)")
        assert len(seen) == 1  # the filter went away with the load
