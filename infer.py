r"""Render images with PureCC LoRAs (either stage) on Stable Diffusion 3 / 3.5, optionally beside the base model.

    python infer.py --pretrained_model_name_or_path SD3.5 --lora output/robot_toy \
        --prompt "a photo of [v] on the moon" --base_prompt "a photo of a robot toy on the moon" \
        --instance_word "sks robot toy" --compare_base

Each LoRA folder may hold either of our formats (docs/method.md section 6) and a learned concept token
(``learned_embeds.safetensors``: stage 1 writes it with --new_concept_token, stage 2 copies it), which is registered
in the CLIP tokenizers first; ``[v]`` in a prompt becomes that token, else --instance_word. Several LoRAs compose as
named adapters (``--lora A --lora B --lora_scale 1 --lora_scale 0.8``, paper Figs. 6-7), ``[v1]`` ... ``[vN]``
standing for each one's concept. The LoRAs are fused into the weights (base speed); --no_fuse keeps them separate.

Image j of every prompt uses the generator seed ``--seed + j``, for the LoRAs and the base model alike. With
--compare_base the base model renders each prompt's *base* version (--base_prompt, ``prompt | base prompt`` lines
in --prompts_file, or the CSV's base_prompt with --csv), as the paper's Delta-metrics compare, and ``compare_*.png``
shows base | LoRA labelled with both prompts. Outputs in --output_dir: one PNG + sidecar JSON per image,
``grid.png`` (one row per prompt), and with --compare_base ``base_*.png`` and ``compare_*.png``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import utils  # noqa: F401  before diffusers: utils/quiet.py silences known-harmless library messages
from diffusers import StableDiffusion3Pipeline  # after utils: see the line above
from utils.checks import check_model_folder, exit_on_error, require
from utils.data import read_prompt_rows
from utils.generation import (DTYPES, adapter_name, adapters_off, add_loras, check_lora_folders, fill_placeholders,
                              lora_components_of, render)

SIZE_MULTIPLE = 16  # SD3 VAE downsampling (8) x transformer patch size (2)
LABEL_HEIGHT = 14


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="Local SD3/SD3.5 diffusers folder or hub id.")
    p.add_argument("--lora", action="append", default=[],
                   help="LoRA folder (diffusers or PEFT format); repeatable to compose. Omit for the base model.")
    p.add_argument("--lora_scale", type=float, action="append", default=[],
                   help="Strength per --lora (one value for all, or one each): 0 is the base model, 1 as trained.")
    p.add_argument("--prompt", action="append", default=[], help='Prompt (repeatable); "[v]" / "[v1]".. is a concept.')
    p.add_argument("--base_prompt", action="append", default=[],
                   help="The base version of each --prompt (same order), for --compare_base.")
    p.add_argument("--prompts_file", default=None,
                   help='Text file, one prompt per line, optionally "prompt | base prompt"; blank lines and # skipped.')
    p.add_argument("--csv", default=None, help="A concept CSV: its prompt and base_prompt columns (and instance_word).")
    p.add_argument("--instance_word", action="append", default=[],
                   help='What "[v]" (or "[vi]" for LoRA i) becomes when the LoRA has no learned token.')
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--num_images_per_prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="Image j of each prompt uses seed + j.")
    p.add_argument("--num_inference_steps", type=int, default=28)
    p.add_argument("--guidance_scale", type=float, default=7.0)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens.")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="Default: bf16 on cuda, fp32 on cpu.")
    p.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    p.add_argument("--no_fuse", action="store_true",
                   help="Keep the LoRAs as separate adapters instead of fusing them into the weights (slower).")
    p.add_argument("--output_dir", default="samples")
    p.add_argument("--compare_base", action="store_true",
                   help="Also render the base model (same seeds) on each prompt's base version; write base | LoRA pairs.")
    p.add_argument("--label_chars", type=int, default=60, help="Grid labels are truncated to this many characters.")
    return p.parse_args(argv)


@dataclass(frozen=True)
class PromptPair:
    template: str    # as given, with its placeholders
    prompt: str      # what the LoRA model renders
    base_prompt: str  # what the base model renders with --compare_base (the prompt itself when no base was given)


@dataclass(frozen=True)
class InferConfig:
    """Everything derived from the flags before any model loads."""

    prompts: list
    loras: list        # folders
    scales: list       # one per LoRA
    tokens: list       # the learned token (utils.concept_token.LearnedToken) of each LoRA, or None
    device: str
    dtype: str


# ----------------------------------------------------------------------------------------------- inputs
def read_templates(args) -> list[tuple[str, str | None]]:
    """(prompt template, base prompt or None): --prompt (with --base_prompt), then --prompts_file, then --csv."""
    require(len(args.base_prompt) <= len(args.prompt),
            f"{len(args.base_prompt)} --base_prompt for {len(args.prompt)} --prompt: give one per prompt, in order.")
    pairs = [(p, args.base_prompt[i] if i < len(args.base_prompt) else None) for i, p in enumerate(args.prompt)]
    if args.prompts_file:
        path = Path(args.prompts_file)
        require(path.is_file(), f"--prompts_file {path}: no such file. Give a text file with one prompt per line.")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                prompt, _, base = line.partition("|")
                pairs.append((prompt.strip(), base.strip() or None))
    if args.csv:
        pairs += [(row["prompt"], row["base_prompt"]) for row in read_prompt_rows(args.csv)]
    require(pairs, "No prompts: give --prompt TEXT (repeatable), --prompts_file FILE or --csv CONCEPT.csv.")
    return pairs


def concept_words(args, tokens: list) -> list[str | None]:
    """What [v1] .. [vN] become: each LoRA's learned token, else its --instance_word (else the CSV's)."""
    words = list(args.instance_word)
    if not words and args.csv:
        words = [read_prompt_rows(args.csv)[0]["instance_word"]]
    count = max(len(tokens), len(words), 1)
    return [(tokens[i].token if i < len(tokens) and tokens[i] is not None else None) or
            (words[i] if i < len(words) else None) for i in range(count)]


def check_loras(args) -> tuple[list[float], list]:
    """Every --lora checked (exists, fits the base model, its token unique); returns (one scale per LoRA, their
    learned tokens)."""
    tokens = check_lora_folders(args.lora, args.pretrained_model_name_or_path)
    scales = args.lora_scale or [1.0]
    require(len(scales) in (1, len(args.lora)) or not args.lora,
            f"{len(scales)} --lora_scale for {len(args.lora)} --lora: give one value for all, or one per LoRA.")
    return (scales * len(args.lora) if len(scales) == 1 else scales), tokens


def resolve_device(requested: str | None) -> str:
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    require(not requested.startswith("cuda") or torch.cuda.is_available(),
            f"--device {requested}: CUDA is not available here; use --device cpu.")
    return requested


def check_args(args) -> InferConfig:
    """Every input check, before any model is loaded."""
    check_model_folder(args.pretrained_model_name_or_path)
    scales, tokens = check_loras(args)
    templates = read_templates(args)
    words = concept_words(args, tokens)
    prompts = [PromptPair(t, fill_placeholders(t, words), fill_placeholders(base or t, words)) for t, base in templates]
    for pair in prompts:
        require(not any(w and w in pair.base_prompt for w in words if w) or pair.base_prompt == pair.prompt,
                f'Base prompt "{pair.base_prompt}" names the concept: the base version is the sentence without it.')
    for flag in ("height", "width"):
        value = getattr(args, flag)
        require(value > 0 and value % SIZE_MULTIPLE == 0, f"--{flag} {value} must be a positive multiple of "
                f"{SIZE_MULTIPLE} (VAE x patch size); try {max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)}.")
    for flag in ("num_images_per_prompt", "num_inference_steps", "max_sequence_length", "label_chars"):
        require(getattr(args, flag) > 0, f"--{flag} must be positive, got {getattr(args, flag)}.")
    require(not args.compare_base or args.lora, "--compare_base compares a LoRA with the base model: give --lora DIR.")
    out = Path(args.output_dir)
    require(not out.exists() or out.is_dir(), f"--output_dir {out} exists and is not a folder.")
    device = resolve_device(args.device)
    return InferConfig(prompts, list(args.lora), scales, tokens, device,
                       args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))


# ----------------------------------------------------------------------------------------------- model
def load_pipeline(args, config: InferConfig) -> StableDiffusion3Pipeline:
    """The base pipeline with every learned token registered and every LoRA added as a named adapter at its scale
    (not yet fused)."""
    pipe = StableDiffusion3Pipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=DTYPES[config.dtype])
    names = add_loras(pipe, config.loras, config.tokens)
    if names:
        pipe.set_adapters(names, adapter_weights=config.scales)
    pipe.to(config.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fuse(pipe, config: InferConfig) -> None:
    """Merge the LoRAs into the weights at their scales, so generation runs at base speed."""
    pipe.fuse_lora(components=lora_components_of(pipe), adapter_names=[adapter_name(i) for i in range(len(config.loras))])


def render_prompt(pipe, args, prompt: str) -> list:
    """num_images_per_prompt images of one prompt; image j from a CPU generator seeded seed + j."""
    return render(pipe, prompt, [args.seed + j for j in range(args.num_images_per_prompt)], args.num_inference_steps,
                  args.guidance_scale, args.height, args.width, args.max_sequence_length, args.negative_prompt)


# ----------------------------------------------------------------------------------------------- outputs
def image_stem(prompt_index: int, image_index: int, seed: int) -> str:
    return f"p{prompt_index:03d}_img{image_index:02d}_seed{seed}"


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(1, limit - 3)] + "..."


def fit_label(draw, text: str, width: int, limit: int) -> str:
    """Truncate text to --label_chars and to the pixel width available."""
    text = truncate(text, limit)
    while len(text) > 4 and draw.textlength(text) > width - 4:
        text = truncate(text, len(text) - 1)
    return text


def labelled(image, label: str, limit: int):
    """The image with a white strip above it holding the label."""
    out = Image.new("RGB", (image.width, image.height + LABEL_HEIGHT), "white")
    out.paste(image.convert("RGB"), (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(out)
    draw.text((2, 1), fit_label(draw, label, image.width, limit), fill="black")
    return out


def side_by_side(base, lora, base_label: str, lora_label: str, limit: int):
    left, right = labelled(base, base_label, limit), labelled(lora, lora_label, limit)
    out = Image.new("RGB", (left.width + right.width, left.height), "white")
    out.paste(left, (0, 0))
    out.paste(right, (left.width, 0))
    return out


def make_grid(rows: list[list], labels: list[str], limit: int):
    """One row per prompt, each cell labelled with its (truncated) prompt."""
    cells = [[labelled(image, label, limit) for image in row] for row, label in zip(rows, labels)]
    cell_w = max(c.width for row in cells for c in row)
    cell_h = max(c.height for row in cells for c in row)
    grid = Image.new("RGB", (cell_w * max(len(row) for row in cells), cell_h * len(cells)), "white")
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            grid.paste(cell, (c * cell_w, r * cell_h))
    return grid


def sidecar(args, config: InferConfig, pair: PromptPair, seed: int, lora_on: bool) -> dict:
    return {"prompt": pair.prompt if lora_on else pair.base_prompt, "prompt_template": pair.template,
            "negative_prompt": args.negative_prompt, "seed": seed, "steps": args.num_inference_steps,
            "guidance": args.guidance_scale, "model": args.pretrained_model_name_or_path,
            "lora": (config.loras[0] if len(config.loras) == 1 else config.loras) if lora_on and config.loras else None,
            "lora_scale": (config.scales[0] if len(config.scales) == 1 else config.scales) if lora_on and config.loras
            else None, "fused": not args.no_fuse if lora_on and config.loras else None,
            "size": [args.width, args.height], "dtype": config.dtype, "device": config.device}


def save_image(out: Path, stem: str, image, meta: dict) -> Path:
    path = out / f"{stem}.png"
    image.save(path)
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def main(argv=None):
    args = parse_args(argv)
    config = check_args(args)
    out = Path(args.output_dir)
    pipe = load_pipeline(args, config)
    out.mkdir(parents=True, exist_ok=True)

    bases = None
    if args.compare_base:  # first, from the untouched base weights
        with adapters_off(pipe):
            bases = [render_prompt(pipe, args, pair.base_prompt) for pair in config.prompts]
    if config.loras and not args.no_fuse:
        fuse(pipe, config)
    images = []
    for i, pair in enumerate(config.prompts):
        print(f"[infer] prompt {i}: {pair.prompt}", flush=True)
        images.append(render_prompt(pipe, args, pair.prompt))

    scale_label = "/".join(f"{s:g}" for s in config.scales)
    grid_rows = []
    for i, pair in enumerate(config.prompts):
        row = []
        for j, image in enumerate(images[i]):
            seed, stem = args.seed + j, image_stem(i, j, args.seed + j)
            save_image(out, stem, image, sidecar(args, config, pair, seed, lora_on=bool(config.loras)))
            if bases is None:
                row.append(image)
                continue
            save_image(out, f"base_{stem}", bases[i][j], sidecar(args, config, pair, seed, lora_on=False))
            pair_image = side_by_side(bases[i][j], image, f"base: {pair.base_prompt}",
                                      f"LoRA x{scale_label}: {pair.prompt}", args.label_chars)
            pair_image.save(out / f"compare_{stem}.png")
            row.append(pair_image)
        grid_rows.append(row)

    make_grid(grid_rows, [p.prompt for p in config.prompts], args.label_chars).save(out / "grid.png")
    print(f"[infer] {sum(len(r) for r in grid_rows)} image(s) written to {out} (grid: {out / 'grid.png'})")


if __name__ == "__main__":
    exit_on_error(main)
