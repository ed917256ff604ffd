r"""The paper's evaluation (Table 1): concept fidelity and capability / behaviour preservation of trained LoRAs,
measured on images each model generates, against the same base model with the same seeds.

    python eval.py --pretrained_model_name_or_path SD3.5 --data_path data --csv_name robot_toy.csv \
        --lora output/base_ckpt/robot_toy --lora output/robot_toy --clip_model openai/clip-vit-large-patch14 \
        --dino_model facebook/dino-vits16 --pickscore_model yuvalkirstain/PickScore_v1 \
        --pickscore_processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K --sam_model facebook/sam-vit-base \
        --resolution 512 --num_inference_steps 28 --num_images_per_prompt 4 --output_dir output/robot_toy/eval

Each prompt pair ("complete prompt | base prompt", data/prompts/*.txt or --prompts_file) gives, for every model, its
image for the complete prompt ([v] = its learned token or --instance_word), and, once, the *original* image: the
base model on the base prompt ([c] = --class_word). Image j of every prompt uses seed --seed + j for every model.
The metrics (docs/evaluation.md), each skipped (null) when its backbone flag is not given:

    clip_i, dino                      mean cosine to the concept's reference images (the CSV's images)
    clip_t_base, delta_clip_t_base    CLIP text-image similarity with the base prompt x100; delta = custom - original
    pickscore, delta_pickscore        PickScore (a CLIP fine-tune) with the base prompt; delta likewise
    hps, delta_hps                    HPSv2.1 (--hps_model, a transformers CLIP conversion) likewise, x100
    seg_cons                          Segment-Anything layout consistency of custom vs original image, x100
    velocity_drift                    ||v_lora - v_base||^2 / ||v_base||^2 on noised latents of the original images
    concept_loss                      flow-matching loss on the CSV images with each LoRA's own training prompt
                                      (the base model: target_prompt, stage 1's)
    toy_*                             with --toy_world: the exact evaluators of utils/toy_world.py

Writes OUTPUT_DIR/images/<model>/*.png (--skip_generation recomputes the metrics from them), results.json,
results.md (one row per model, the paper's column order) and grids/p<i>.png (original | each model, seed --seed).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import utils  # noqa: F401  before diffusers: utils/quiet.py silences known-harmless library messages
from diffusers import StableDiffusion3Pipeline  # after utils: see the line above
from utils import toy_world
from utils.checks import check_model_folder, check_resolution, exit_on_error, require
from utils.data import read_concept_csv
from utils.dataset import load_image
from utils.flow_matching import noisy_latents, scale_latents, velocity_target, weighted_mse
from utils.generation import (DTYPES, adapter_name, adapters_off, add_loras, check_lora_folders, fill_placeholders,
                              has_placeholder, render)
from utils.metrics import (ClipScorer, DinoScorer, SamMasker, check_backbone, mean_cosine, paired_cosine,
                           seg_consistency)
from utils.training import transformer_velocity

PROMPT_SETS = Path(__file__).resolve().parent / "data" / "prompts"
CLASS = "[c]"
METRICS = ("clip_i", "dino", "clip_t_base", "delta_clip_t_base", "hps", "delta_hps", "pickscore", "delta_pickscore",
           "seg_cons", "velocity_drift", "concept_loss")  # the paper's order, then the model-intrinsic ones
TOY_METRICS = ("toy_concept_fidelity", "toy_context_kept", "toy_layout_iou")
COLUMNS = {"clip_i": "CLIP-I", "dino": "DINO", "clip_t_base": "CLIP-T(base)", "delta_clip_t_base": "ΔCLIP-T(base)",
           "hps": "HPSv2.1", "delta_hps": "ΔHPSv2.1", "pickscore": "PickScore", "delta_pickscore": "ΔPickScore",
           "seg_cons": "Seg-Cons", "velocity_drift": "velocity drift", "concept_loss": "concept loss",
           "toy_concept_fidelity": "toy fidelity", "toy_context_kept": "toy context kept",
           "toy_layout_iou": "toy layout IoU"}
ORIGINAL = "original"  # the image folder of the base model on the base prompts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--lora", action="append", default=[], help="LoRA folder (either format); repeatable.")
    p.add_argument("--data_path", required=True, help="Folder of the concept CSV (its images are the references).")
    p.add_argument("--csv_name", required=True)
    p.add_argument("--prompt_set", default="objects", choices=["objects", "live_subjects", "styles"],
                   help="DreamBench-style prompt pairs from data/prompts/.")
    p.add_argument("--prompts_file", default=None, help='Your own "complete prompt | base prompt" lines ([v], [c]).')
    p.add_argument("--instance_word", default=None,
                   help="What [v] becomes for a LoRA without a learned token, and for the base model (default: the "
                        "CSV's instance_word).")
    p.add_argument("--class_word", default=None,
                   help="What [c] becomes (default: the end of the instance word that every base_prompt contains, "
                        'e.g. "robot toy" for "sks robot toy").')
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--num_inference_steps", type=int, default=28)
    p.add_argument("--guidance_scale", type=float, default=7.0)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_sequence_length", type=int, default=77, help="T5 tokens.")
    p.add_argument("--clip_model", default=None, help="CLIP for CLIP-I and CLIP-T (e.g. openai/clip-vit-large-patch14).")
    p.add_argument("--dino_model", default=None, help="DINO ViT for DINO (e.g. facebook/dino-vits16).")
    p.add_argument("--pickscore_model", default=None, help="PickScore (yuvalkirstain/PickScore_v1).")
    p.add_argument("--pickscore_processor", default=None,
                   help="Its processor, when the model folder has none (laion/CLIP-ViT-H-14-laion2B-s32B-b79K).")
    p.add_argument("--hps_model", default=None, help="HPSv2.1 converted to a transformers CLIP folder (docs/evaluation.md).")
    p.add_argument("--sam_model", default=None, help="Segment Anything for Seg-Cons (e.g. facebook/sam-vit-base).")
    p.add_argument("--sam_points_per_side", type=int, default=16)
    p.add_argument("--sam_pred_iou_thresh", type=float, default=0.88)
    p.add_argument("--sam_stability_thresh", type=float, default=0.92)
    p.add_argument("--toy_world", action="store_true", help="Also the toy world's exact metrics (utils/toy_world.py).")
    p.add_argument("--sigmas", default="0.25,0.5,0.75", help="Noise levels of velocity_drift and concept_loss.")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip_generation", action="store_true", help="Score the images already in --output_dir/images.")
    p.add_argument("--output_dir", required=True)
    return p.parse_args(argv)


@dataclass(frozen=True)
class Model:
    name: str            # its image folder and row: "base" or the LoRA folder's name
    lora: str | None     # folder, None for the base model
    concept: str         # what [v] becomes in its prompts
    train_prompt: str    # the CSV column it trained on (concept_loss)


@dataclass(frozen=True)
class EvalConfig:
    models: list         # base first, then every --lora
    tokens: list         # learned token of every --lora (or None)
    pairs: list          # (complete template, base prompt) with [c] filled
    rows: list           # the concept CSV's rows
    sigmas: list


# ----------------------------------------------------------------------------------------------- inputs
def read_pairs(args) -> list[tuple[str, str]]:
    path = Path(args.prompts_file) if args.prompts_file else PROMPT_SETS / f"{args.prompt_set}.txt"
    require(path.is_file(), f"--prompts_file {path}: no such file. Give a text file of \"complete prompt | base "
            f"prompt\" lines.")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        complete, _, base = (part.strip() for part in line.partition("|"))
        require(has_placeholder(complete), f"{path}, line {number}: the concept prompt \"{complete}\" has no [v]: "
                "without it no model shows its concept there.")
        require(base and not has_placeholder(base), f"{path}, line {number}: give the base prompt after a \"|\", "
                "without [v] (it is what the original model draws).")
        pairs.append((complete, base))
    require(pairs, f"{path} holds no prompt pairs: add \"complete prompt | base prompt\" lines.")
    return pairs


def default_class_word(instance_word: str, rows) -> str | None:
    """The longest end of the instance word that every base prompt contains ("sks robot toy" -> "robot toy")."""
    words = instance_word.split()
    for start in range(len(words)):
        candidate = " ".join(words[start:])
        if all(candidate in row.base_prompt for row in rows):
            return candidate
    return None


def trained_prompt_column(lora_dir: str) -> str:
    """The CSV column a LoRA trained on, from the run_settings.json training wrote (stage 1's default otherwise)."""
    settings = Path(lora_dir) / "run_settings.json"
    column = json.loads(settings.read_text()).get("prompt_column") if settings.is_file() else None
    # a stage-1 run on an image folder trained on its --instance_prompt: the CSV's target_prompt is its equivalent
    return column if column in ("prompt", "target_prompt") else "target_prompt"


def model_names(loras: list) -> list[str]:
    """Each LoRA's folder name; on a clash, its parent's name too (output/base_ckpt/robot_toy vs output/robot_toy)."""
    names = [Path(path).name for path in loras]
    return [f"{Path(path).parent.name}_{name}" if names.count(name) > 1 else name for path, name in zip(loras, names)]


def check_inputs(args) -> EvalConfig:
    """Every check, before any model is loaded or image generated."""
    check_model_folder(args.pretrained_model_name_or_path)
    check_resolution(args.pretrained_model_name_or_path, args.resolution)
    for flag in ("clip_model", "dino_model", "pickscore_model", "pickscore_processor", "hps_model", "sam_model"):
        check_backbone(getattr(args, flag), f"--{flag}" if flag != "pickscore_processor" else "--pickscore_model")
    tokens = check_lora_folders(args.lora, args.pretrained_model_name_or_path)
    rows = read_concept_csv(args.data_path, args.csv_name)
    instance_word = args.instance_word or rows[0].instance_word
    class_word = args.class_word or default_class_word(instance_word, rows)
    pairs = read_pairs(args)
    require(class_word or not any(CLASS in base for _, base in pairs), f"the prompts use {CLASS} but no class word was "
            f"found in the instance word {instance_word!r} and every base_prompt: give --class_word.")
    pairs = [(complete, base.replace(CLASS, class_word or "")) for complete, base in pairs]
    for flag in ("num_images_per_prompt", "num_inference_steps"):
        require(getattr(args, flag) > 0, f"--{flag} must be positive, got {getattr(args, flag)}.")
    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
    except ValueError:
        sigmas = []
    require(sigmas and all(0.0 < s <= 1.0 for s in sigmas), f"--sigmas {args.sigmas!r}: expected comma-separated "
            "numbers in (0, 1].")
    models = [Model("base", None, instance_word, "target_prompt")]
    models += [Model(name, path, token.token if token else instance_word, trained_prompt_column(path))
               for name, path, token in zip(model_names(args.lora), args.lora, tokens)]
    out = Path(args.output_dir)
    require(not out.exists() or out.is_dir(), f"--output_dir {out} exists and is not a folder.")
    if args.skip_generation:
        for folder in [ORIGINAL] + [m.name for m in models]:
            require((out / "images" / folder).is_dir(), f"--skip_generation: {out / 'images' / folder} is missing: "
                    "run once without --skip_generation.")
    return EvalConfig(models, tokens, pairs, rows, sigmas)


# ----------------------------------------------------------------------------------------------- generation
def image_path(out: Path, folder: str, prompt_index: int, image_index: int) -> Path:
    return out / "images" / folder / f"p{prompt_index:03d}_s{image_index}.png"


def load_pipeline(args, config: EvalConfig) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=DTYPES[args.dtype])
    add_loras(pipe, [m.lora for m in config.models[1:]], config.tokens)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_model(pipe, index: int) -> None:
    """Model ``index`` of config.models: 0 the base model (every adapter off), i the i-th LoRA alone at scale 1."""
    if not getattr(pipe.transformer, "peft_config", None):
        return  # no LoRA at all: the base model is all there is
    if index == 0:
        pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters([adapter_name(index - 1)], adapter_weights=[1.0])


def generate(args, config: EvalConfig, pipe) -> None:
    """Every model's image of every complete prompt, and the original images (base model, base prompts)."""
    out = Path(args.output_dir)
    seeds = [args.seed + j for j in range(args.num_images_per_prompt)]
    jobs = [(ORIGINAL, 0, base) for _, base in config.pairs]
    jobs += [(model.name, index, fill_placeholders(complete, [model.concept]))
             for index, model in enumerate(config.models) for complete, _ in config.pairs]
    for folder in {folder for folder, _, _ in jobs}:
        (out / "images" / folder).mkdir(parents=True, exist_ok=True)
    done = {}
    for folder, index, prompt in tqdm(jobs, desc="generating"):
        use_model(pipe, index)
        number = done.get(folder, 0)
        done[folder] = number + 1
        images = render(pipe, prompt, seeds, args.num_inference_steps, args.guidance_scale, args.resolution,
                        args.resolution, args.max_sequence_length)
        for j, image in enumerate(images):
            image.save(image_path(out, folder, number, j))
    use_model(pipe, 0)


def load_images(out: Path, folder: str, count: int, per_prompt: int) -> list[list]:
    return [[Image.open(image_path(out, folder, i, j)).convert("RGB") for j in range(per_prompt)] for i in range(count)]


# ----------------------------------------------------------------------------------------------- metrics
def clip_metrics(scorer: ClipScorer, images: list, originals: list, base_prompts: list, scale: float) -> dict:
    """Text-image similarity with the base prompt (x scale) of a model's images and the original images, paired by
    prompt and seed: (score, custom - original)."""
    texts = scorer.texts(base_prompts)
    flat = [im for row in images for im in row]
    per_prompt = len(images[0])
    text_rows = texts.repeat_interleave(per_prompt, dim=0)
    custom = scale * paired_cosine(scorer.images(flat), text_rows)
    original = scale * paired_cosine(scorer.images([im for row in originals for im in row]), text_rows)
    return {"score": custom.mean().item(), "delta": (custom - original).mean().item()}


def velocity_metrics(args, config: EvalConfig, pipe, originals: list) -> dict:
    """velocity_drift and concept_loss of every model, from fixed (latent, noise, sigma) triples."""
    device, dtype = args.device, DTYPES[args.dtype]
    vae, transformer, scheduler = pipe.vae, pipe.transformer, pipe.scheduler

    def encode(images) -> torch.Tensor:
        pixels = torch.stack([torch.from_numpy(np.asarray(im.resize((args.resolution, args.resolution)),
                                                          dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                              for im in images])
        with torch.no_grad():
            return scale_latents(vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean, vae.config).float()

    def triples(latents: torch.Tensor):
        generator = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        for sigma in config.sigmas:
            sigmas = torch.full((latents.shape[0],), sigma, device=device)
            yield noisy_latents(latents, noise, sigmas), sigmas * scheduler.config.num_train_timesteps, noise

    def velocity(prompts, x_t, timesteps) -> torch.Tensor:
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                      device=device, max_sequence_length=args.max_sequence_length)
            return transformer_velocity(transformer, x_t.to(dtype), timesteps, embeds, pooled).float()

    base_prompts = [base for _, base in config.pairs for _ in range(len(originals[0]))]
    original_latents = encode([im for row in originals for im in row])
    concept_latents = encode([Image.open(row.image_path).convert("RGB") for row in config.rows])
    results = {}
    reference = None
    for index, model in enumerate(config.models):
        use_model(pipe, index)
        drift = [velocity(base_prompts, x_t, t) for x_t, t, _ in triples(original_latents)]
        if index == 0:
            reference = drift
        prompts = [getattr(row, model.train_prompt) for row in config.rows]
        losses = [weighted_mse(velocity(prompts, x_t, t), velocity_target(concept_latents, noise), None).item()
                  for x_t, t, noise in triples(concept_latents)]
        results[model.name] = {
            "velocity_drift": float(np.mean([((v - r) ** 2).sum().item() / ((r ** 2).sum().item() + 1e-12)
                                             for v, r in zip(drift, reference)])),
            "concept_loss": float(np.mean(losses))}
    use_model(pipe, 0)
    return results


def toy_metrics(images: list, originals: list, base_prompts: list) -> dict:
    """The toy world's exact evaluators on a model's concept-prompt images (utils/toy_world.concept_scores)."""
    pairs = [(image, original, toy_world.parse_caption(base))
             for row, original_row, base in zip(images, originals, base_prompts)
             for image, original in zip(row, original_row)]
    scores = toy_world.concept_scores(*zip(*pairs))
    return {"toy_concept_fidelity": scores["fidelity"], "toy_context_kept": scores["context_kept"],
            "toy_layout_iou": scores["layout_iou"]}


def score(args, config: EvalConfig, pipe) -> tuple[dict, dict]:
    """(metrics per model, what each backbone was or why its metrics were skipped)."""
    out = Path(args.output_dir)
    count, per_prompt = len(config.pairs), args.num_images_per_prompt
    originals = load_images(out, ORIGINAL, count, per_prompt)
    images = {m.name: load_images(out, m.name, count, per_prompt) for m in config.models}
    base_prompts = [base for _, base in config.pairs]
    references = [Image.open(row.image_path).convert("RGB") for row in config.rows]
    results = {m.name: {key: None for key in METRICS + (TOY_METRICS if args.toy_world else ())}
               for m in config.models}
    backbones = {}
    if args.clip_model:
        clip = ClipScorer(args.clip_model, args.device)
        reference_embeds = clip.images(references)
        for name, rows in images.items():
            results[name]["clip_i"] = mean_cosine(clip.images([im for row in rows for im in row]), reference_embeds)
            texts = clip_metrics(clip, rows, originals, base_prompts, 100.0)
            results[name].update(clip_t_base=texts["score"], delta_clip_t_base=texts["delta"])
    if args.dino_model:
        dino = DinoScorer(args.dino_model, args.device)
        reference_embeds = dino.images(references)
        for name, rows in images.items():
            results[name]["dino"] = mean_cosine(dino.images([im for row in rows for im in row]), reference_embeds)
    for flag, key, scale in (("pickscore_model", "pickscore", None), ("hps_model", "hps", 100.0)):
        if getattr(args, flag):
            scorer = ClipScorer(getattr(args, flag), args.device,
                                args.pickscore_processor if key == "pickscore" else None)
            for name, rows in images.items():
                # PickScore is the model's logit: its logit scale times the cosine
                scores = clip_metrics(scorer, rows, originals, base_prompts, scale or scorer.logit_scale)
                results[name].update({key: scores["score"], f"delta_{key}": scores["delta"]})
    if args.sam_model:
        masker = SamMasker(args.sam_model, args.device, args.sam_points_per_side, args.sam_pred_iou_thresh,
                           args.sam_stability_thresh)
        original_masks = [[masker.masks(im) for im in row] for row in originals]
        for name, rows in images.items():
            results[name]["seg_cons"] = float(np.mean([seg_consistency(masker.masks(im), original_masks[i][j])
                                                       for i, row in enumerate(rows) for j, im in enumerate(row)]))
    for name, values in velocity_metrics(args, config, pipe, originals).items():
        results[name].update(values)
    if args.toy_world:
        for name, rows in images.items():
            results[name].update(toy_metrics(rows, originals, base_prompts))
    for flag in ("clip_model", "dino_model", "pickscore_model", "hps_model", "sam_model"):
        backbones[flag] = getattr(args, flag) or f"not given: its metrics are null (pass --{flag})"
    return results, backbones


# ----------------------------------------------------------------------------------------------- report
def markdown_table(results: dict, keys: tuple) -> str:
    lines = ["| model | " + " | ".join(COLUMNS[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, values in results.items():
        cells = ["—" if values.get(k) is None else f"{values[k]:.4g}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_grids(out: Path, config: EvalConfig) -> None:
    """grids/p<i>.png: the original image (base prompt) then every model's complete-prompt image, seed --seed."""
    (out / "grids").mkdir(exist_ok=True)
    for i in range(len(config.pairs)):
        cells = [Image.open(image_path(out, folder, i, 0)).convert("RGB")
                 for folder in [ORIGINAL] + [m.name for m in config.models]]
        grid = Image.new("RGB", (sum(c.width for c in cells), max(c.height for c in cells)), "white")
        x = 0
        for cell in cells:
            grid.paste(cell, (x, 0))
            x += cell.width
        grid.save(out / "grids" / f"p{i:03d}.png")


def main(argv=None):
    args = parse_args(argv)
    config = check_inputs(args)
    out = Path(args.output_dir)
    pipe = load_pipeline(args, config)
    if not args.skip_generation:
        generate(args, config, pipe)
    results, backbones = score(args, config, pipe)
    keys = METRICS + (TOY_METRICS if args.toy_world else ())
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({
        "models": results, "backbones": backbones,
        "prompts": [{"complete": c, "base": b} for c, b in config.pairs],
        "settings": {"num_images_per_prompt": args.num_images_per_prompt, "num_inference_steps":
                     args.num_inference_steps, "guidance_scale": args.guidance_scale, "resolution": args.resolution,
                     "seed": args.seed, "sigmas": config.sigmas},
        "loras": {m.name: m.lora for m in config.models}}, indent=2) + "\n")
    table = markdown_table(results, keys)
    (out / "results.md").write_text(table + "\n")
    write_grids(out, config)
    print(table)
    return results


if __name__ == "__main__":
    exit_on_error(main)
