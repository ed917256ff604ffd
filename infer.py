"""Render images with a PureCC LoRA (either stage) on Stable Diffusion 3 / 3.5, optionally beside the base model.

    python infer.py --pretrained_model_name_or_path SD3.5 --lora output/robot_toy \
        --prompt "a photo of [v] on the moon" --instance_word "sks robot toy" --compare_base

The LoRA folder may hold either of our formats (docs/method.md section 6): the diffusers file is loaded with
``pipe.load_lora_weights`` (text-encoder LoRAs included), a PEFT-only folder as a named adapter on the transformer.
Image j of every prompt uses the generator seed ``--seed + j``, for the LoRA and for the base model alike, so the two
see identical noise. Outputs in --output_dir: one PNG + sidecar JSON per image, ``grid.png`` (one row per prompt), and
with --compare_base a ``base_*.png`` per image and ``compare_*.png`` (base | LoRA) side-by-side files.
"""

from __future__ import annotations

import argparse
import json
import logging
from contextlib import contextmanager
from pathlib import Path

from utils.checks import BadInput, check_model_folder, exit_on_error
from utils.lora import DIFFUSERS_WEIGHT_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME, lora_format

ADAPTER = "purecc"
PLACEHOLDER = "[v]"
SIZE_MULTIPLE = 16  # SD3 VAE downsampling (8) x transformer patch size (2)
LABEL_HEIGHT = 14


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained_model_name_or_path", required=True, help="Local SD3/SD3.5 diffusers folder or hub id.")
    p.add_argument("--lora", default=None, help="LoRA folder (diffusers or PEFT format). Omit to render the base model.")
    p.add_argument("--lora_scale", type=float, default=1.0, help="LoRA strength: 0 is the base model, 1 as trained.")
    p.add_argument("--prompt", action="append", default=[], help='Prompt (repeatable); "[v]" becomes --instance_word.')
    p.add_argument("--prompts_file", default=None, help="Text file, one prompt per line; blank lines and #comments skipped.")
    p.add_argument("--instance_word", default=None, help='Replaces "[v]" in prompts, e.g. "sks robot toy".')
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
    p.add_argument("--output_dir", default="samples")
    p.add_argument("--compare_base", action="store_true",
                   help="Also render the base model (LoRA disabled, same seeds) and write base | LoRA pairs.")
    p.add_argument("--label_chars", type=int, default=60, help="Grid labels are truncated to this many characters.")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- inputs
def read_prompts(args) -> list[tuple[str, str]]:
    """[(template as given, prompt with [v] replaced)], --prompt first, then --prompts_file."""
    templates = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise BadInput(f"--prompts_file {path}: no such file. Give a text file with one prompt per line.")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                templates.append(line)
    if not templates:
        raise BadInput("No prompts: give --prompt TEXT (repeatable) or --prompts_file FILE.")
    if any(PLACEHOLDER in t for t in templates) and not args.instance_word:
        example = next(t for t in templates if PLACEHOLDER in t)
        raise BadInput(f'Prompt "{example}" uses {PLACEHOLDER} but no --instance_word was given: pass e.g. '
                       f'--instance_word "sks robot toy" (the CSV\'s instance_word column).')
    return [(t, t.replace(PLACEHOLDER, args.instance_word or PLACEHOLDER)) for t in templates]


def check_lora(path: str | None) -> None:
    if path is None:
        return
    folder = Path(path)
    if not folder.is_dir():
        raise BadInput(f"--lora {folder}: no such folder. Point it at a stage-1 or stage-2 output folder, e.g. "
                       "output/robot_toy, or leave --lora out to render the base model.")
    if lora_format(folder) is None:
        raise BadInput(f"--lora {folder} holds no LoRA: expected {DIFFUSERS_WEIGHT_NAME} (diffusers format) or "
                       f"{PEFT_CONFIG_NAME} + {PEFT_WEIGHT_NAME} (PEFT format). Has training finished?")


def resolve_device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {requested}: CUDA is not available here; use --device cpu.")
    return requested


def check_args(args) -> list[tuple[str, str]]:
    """Every input check, before any model is loaded. Returns the prompts; fills in --device and --dtype."""
    check_model_folder(args.pretrained_model_name_or_path)
    check_lora(args.lora)
    prompts = read_prompts(args)
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value <= 0 or value % SIZE_MULTIPLE:
            raise BadInput(f"--{flag} {value} must be a positive multiple of {SIZE_MULTIPLE} (VAE x patch size); "
                           f"try {max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)}.")
    for flag in ("num_images_per_prompt", "num_inference_steps", "max_sequence_length", "label_chars"):
        if getattr(args, flag) <= 0:
            raise BadInput(f"--{flag} must be positive, got {getattr(args, flag)}.")
    if args.compare_base and not args.lora:
        raise BadInput("--compare_base compares a LoRA with the base model: give --lora DIR as well.")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--output_dir {out} exists and is not a folder.")
    args.device = resolve_device(args.device)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return prompts


# ----------------------------------------------------------------------------------------------- model
def load_pipeline(args):
    import torch
    from diffusers import StableDiffusion3Pipeline

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = StableDiffusion3Pipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=dtype)
    if args.lora:
        load_lora(pipe, args.lora, args.lora_scale)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_lora(pipe, lora_dir: str, scale: float) -> None:
    """Add the LoRA as adapter ADAPTER and set its strength. The scale goes through peft's ``set_scale`` (via
    ``set_adapters``): scaling = scale * alpha / r, so 0 is exactly the base model and 1 the trained strength."""
    from utils.lora import load_lora_as_adapter

    if lora_format(lora_dir) == "diffusers":
        # weight_name explicit: offline diffusers does not guess it; alpha comes from the metadata.
        # Text-encoder LoRAs (stage 1 --train_text_encoder) load too; their absence is normal, not worth a warning.
        with dropped_log_messages("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel"):
            pipe.load_lora_weights(lora_dir, weight_name=DIFFUSERS_WEIGHT_NAME, adapter_name=ADAPTER)
    else:  # PEFT folder: transformer only, as PeftModel.from_pretrained would load it
        load_lora_as_adapter(pipe.transformer, lora_dir, ADAPTER, trainable=False)
    pipe.set_adapters([ADAPTER], adapter_weights=[scale])


@contextmanager
def dropped_log_messages(logger_name: str, prefix: str):
    """Drop one logger's records that start with ``prefix`` (everything else still shows)."""
    logger = logging.getLogger(logger_name)
    drop = lambda record: not record.getMessage().startswith(prefix)  # noqa: E731
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def render(pipe, args, prompt: str, lora_enabled: bool = True):
    """num_images_per_prompt images of one prompt; image j from a CPU generator seeded seed + j."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(args.seed + j) for j in range(args.num_images_per_prompt)]
    if args.lora and not lora_enabled:
        pipe.disable_lora()
    try:
        return pipe(prompt=prompt, negative_prompt=args.negative_prompt, num_images_per_prompt=len(generators),
                    generator=generators, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                    max_sequence_length=args.max_sequence_length).images
    finally:
        if args.lora and not lora_enabled:
            pipe.enable_lora()


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
    from PIL import Image, ImageDraw

    out = Image.new("RGB", (image.width, image.height + LABEL_HEIGHT), "white")
    out.paste(image.convert("RGB"), (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(out)
    draw.text((2, 1), fit_label(draw, label, image.width, limit), fill="black")
    return out


def side_by_side(base, lora, scale: float, limit: int):
    from PIL import Image

    left, right = labelled(base, "base", limit), labelled(lora, f"LoRA x{scale:g}", limit)
    out = Image.new("RGB", (left.width + right.width, left.height), "white")
    out.paste(left, (0, 0))
    out.paste(right, (left.width, 0))
    return out


def make_grid(rows: list[list], labels: list[str], limit: int):
    """One row per prompt, each cell labelled with its (truncated) prompt."""
    from PIL import Image

    cells = [[labelled(image, label, limit) for image in row] for row, label in zip(rows, labels)]
    cell_w = max(c.width for row in cells for c in row)
    cell_h = max(c.height for row in cells for c in row)
    grid = Image.new("RGB", (cell_w * max(len(row) for row in cells), cell_h * len(cells)), "white")
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            grid.paste(cell, (c * cell_w, r * cell_h))
    return grid


def sidecar(args, template: str, prompt: str, seed: int, lora_on: bool) -> dict:
    return {"prompt": prompt, "prompt_template": template, "negative_prompt": args.negative_prompt, "seed": seed,
            "steps": args.num_inference_steps, "guidance": args.guidance_scale,
            "model": args.pretrained_model_name_or_path, "lora": args.lora if lora_on else None,
            "lora_scale": args.lora_scale if lora_on else None, "size": [args.width, args.height],
            "dtype": args.dtype, "device": args.device}


def save_image(out: Path, stem: str, image, meta: dict) -> Path:
    path = out / f"{stem}.png"
    image.save(path)
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def main(argv=None):
    args = parse_args(argv)
    prompts = check_args(args)
    out = Path(args.output_dir)
    pipe = load_pipeline(args)
    out.mkdir(parents=True, exist_ok=True)

    grid_rows = []
    for i, (template, prompt) in enumerate(prompts):
        print(f"[infer] prompt {i}: {prompt}", flush=True)
        images = render(pipe, args, prompt)
        bases = render(pipe, args, prompt, lora_enabled=False) if args.compare_base else None
        row = []
        for j, image in enumerate(images):
            seed, stem = args.seed + j, image_stem(i, j, args.seed + j)
            save_image(out, stem, image, sidecar(args, template, prompt, seed, lora_on=bool(args.lora)))
            if bases is None:
                row.append(image)
                continue
            save_image(out, f"base_{stem}", bases[j], sidecar(args, template, prompt, seed, lora_on=False))
            pair = side_by_side(bases[j], image, args.lora_scale, args.label_chars)
            pair.save(out / f"compare_{stem}.png")
            row.append(pair)
        grid_rows.append(row)

    make_grid(grid_rows, [p for _, p in prompts], args.label_chars).save(out / "grid.png")
    print(f"[infer] {sum(len(r) for r in grid_rows)} image(s) written to {out} (grid: {out / 'grid.png'})")


if __name__ == "__main__":
    exit_on_error(main)
