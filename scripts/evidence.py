"""Evidence on the toy world: does stage 2 (PureCC) learn the concept while changing the model less than stage 1?

    bash scripts/evidence.sh                      # or: python scripts/evidence.py [--seeds 0,1,2] [--steps N]

On the pretrained toy world (data/toy_world: scripts/build_toy_world.py, docs/evidence.md) it trains, for each
seed, stage 1 (the DreamBooth LoRA, also the extractor; trained on the CSV's full captions, --stage1_prompt_column
prompt, as a DreamBooth user captions images) and stage 2 with the paper's setting (eta 1, adaptive lambda*) and
its ablations, all with the same step budget and learning rate, through the project's own scripts; then renders
every model with the same sampling seeds and scores it with the world's exact evaluators (utils/toy_world.py):

    fidelity          concept fidelity of "a sks toy on <background>, <position>" images (0..1), and the share of
                      images >= 0.5 (the concept learned)
    context kept      on those images, background and position are the prompt's (ΔCLIP-T(base)'s analogue)
    layout IoU        IoU of the background mask of that image and of the base model's "a toy on ..." image, same
                      seed (Seg-Cons' analogue)
    attribute acc.    on prompts WITHOUT the concept, the share of attributes drawn as the prompt says
    agrees with base  on those prompts, the share of attributes read the same as in the base model's image
    pixel change      on those prompts, mean |image - base model's image| (0..1)

plus, from training, the PureCC term's share of the loss and lambda* (mean, and the share clamped at the lower
bound). Writes OUTPUT_DIR/results.md (mean ± standard error over seeds), results.json and grid.png (rows = models,
same seeds), and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "scripts")]

import utils  # noqa: E402,F401  before diffusers: utils/quiet.py silences known-harmless library messages
from diffusers import StableDiffusion3Pipeline  # noqa: E402
import build_toy_world  # noqa: E402
import train_stage1_sd3 as stage1  # noqa: E402
import train_stage2_v2_sd3 as stage2  # noqa: E402
from utils import toy_world as world  # noqa: E402
from utils.checkpoint import list_checkpoints  # noqa: E402
from utils.generation import add_loras  # noqa: E402

WORLD = REPO_ROOT / "data" / "toy_world"
TEXT_LENGTH = build_toy_world.TEXT_LENGTH  # the world's prompts are padded to this many tokens
# key -> (row label, stage, flags): stage 2 rows use stage 1 of the same seed as their extractor
VARIANTS = {
    "stage1": ("stage 1 (DreamBooth LoRA)", 1, ["--stage1_prompt_column", "prompt"]),
    "purecc": ("stage 2: PureCC, eta 1, λ* clamped at 0", 2, ["--eta", "1.0", "--lambda_min", "0"]),
    "unclamped": ("stage 2: λ* unclamped (Eq. 12 as written)", 2,
                  ["--eta", "1.0", "--lambda_min=-inf", "--lambda_max=inf"]),
    "eta0": ("stage 2: eta 0 (L_CC only)", 2, ["--eta", "0"]),
    "fixed": ("stage 2: fixed λ 1", 2, ["--eta", "1.0", "--lambda_mode", "fixed", "--fix_lambda", "1.0"]),
    "extractor_base": ("stage 2: extractor = base model", 2,
                       ["--eta", "1.0", "--lambda_min", "0", "--extractor_mode", "base"]),
    "frozen_branch": ("stage 2: frozen original branch", 2,
                      ["--eta", "1.0", "--lambda_min", "0", "--original_branch", "frozen"]),
    "detached_branch": ("stage 2: trainable branch, v_base detached", 2,
                        ["--eta", "1.0", "--lambda_min", "0", "--original_branch", "detached"]),
}
COLUMNS = ("fidelity", "learned", "context_kept", "layout_iou", "attribute_accuracy", "agrees_with_base",
           "pixel_change", "pure_share", "lambda_mean", "lambda_at_min")
# the preservation scores compared with stage 1's at equal concept fidelity (at_fidelity)
EQUAL_FIDELITY = ("pixel_change", "agrees_with_base", "attribute_accuracy", "context_kept", "layout_iou")
HEADERS = ("fidelity", "learned (≥0.5)", "context kept", "layout IoU", "attribute acc.", "agrees with base",
           "pixel change", "PureCC share of loss", "λ* mean", "λ* at lower bound")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=str(WORLD), help="The toy world: model/ and sks_toy.csv.")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=600, help="Optimizer steps of every run (stage 1 and stage 2 alike): "
                   "the budget at which stage 1 learns the concept (docs/evidence.md).")
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, of {', '.join(VARIANTS)}.")
    p.add_argument("--concept_prompts", type=int, default=10, help="Concept prompts rendered per model.")
    p.add_argument("--plain_prompts", type=int, default=20, help="Prompts without the concept rendered per model.")
    p.add_argument("--sample_steps", type=int, default=12)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--output_dir", default=str(REPO_ROOT / "output" / "evidence"))
    p.add_argument("--stage1_every", type=int, default=200,
                   help="Also score stage 1 after every N steps (its checkpoints; 0: only the final model), so each "
                        "stage-2 model can be compared with stage 1 at the same concept fidelity (results.md, "
                        "second table).")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="Training processes (one torch thread each); the table does not depend on it.")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- training
def train_one(args, key: str, seed: int, out: Path) -> tuple:
    """One model of one seed through the project's own script: (LoRA folder, training history). Stage-2 rows use
    the stage-1 model of the same seed as their extractor."""
    world_dir = Path(args.world)
    common = ["--pretrained_model_name_or_path", str(world_dir / "model"), "--data_path", str(world_dir),
              "--csv_name", "sks_toy.csv", "--resolution", "32", "--max_sequence_length", str(TEXT_LENGTH),
              "--max_train_steps", str(args.steps), "--learning_rate", str(args.learning_rate), "--rank",
              str(args.rank), "--seed", str(seed), "--report_to", "none", "--overwrite_output_dir",
              "--cache_latents"]  # each image encoded once (32 px: no crop); no --random_flip: it would swap left/right
    label, stage, flags = VARIANTS[key]
    started = time.time()
    stage1_dir = out / "base_ckpt" / "sks_toy"
    if stage == 1:  # its checkpoints (LoRA included) are the stage-1 trajectory
        every = str(args.stage1_every or args.steps + 1)
        result = stage1.main(common + ["--output_dir", str(stage1_dir), "--checkpointing_steps", every, *flags])
        folder = stage1_dir
    else:
        result = stage2.main(common + ["--output_dir", str(out / key), "--stage1_output_dir", str(stage1_dir),
                                       "--checkpointing_steps", str(args.steps + 1), *flags])
        folder = out / key / "sks_toy"
    print(f"[evidence] seed {seed}: {label}: {time.time() - started:.0f} s", flush=True)
    return folder, result.history


def train_and_render(args, key: str, seed: int, out: Path, concept: list, plain: list) -> tuple:
    """Train one model (``train_one``) and render its evaluation images in the same process: (images, history).
    For stage 1 the images also hold ``trajectory``: {step: images} of its checkpoints."""
    folder, history = train_one(args, key, seed, out)
    images = render_lora(args, folder, concept, plain)
    if VARIANTS[key][1] == 1:
        images["trajectory"] = {step: render_lora(args, path, concept, plain)
                                for step, path in list_checkpoints(folder) if step < args.steps}
    return images, history


def train_all(args, variants: list, seeds: list, out: Path, concept: list, plain: list) -> tuple[dict, dict]:
    """(the base model's images, {seed: {key: (images, history)}}) for every seed and variant, in ``args.jobs``
    processes (one torch thread each), each model rendered where it was trained. Every run depends only on its
    seed and flags and every image only on its model and seed, so the result is the same for any number of jobs;
    a seed's stage-2 runs start once its stage 1 is done."""
    runs = {seed: {} for seed in seeds}
    first = ["stage1"] if "stage1" in variants else []
    later = [key for key in variants if key not in first]
    if args.jobs == 1:
        base = render_base(args, concept, plain)
        for seed in seeds:
            for key in first + later:
                runs[seed][key] = train_and_render(args, key, seed, out / f"seed{seed}", concept, plain)
    else:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            pending = {pool.submit(train_and_render, args, key, seed, out / f"seed{seed}", concept, plain):
                       (seed, key) for seed in seeds for key in (first or later)}
            base_job = pool.submit(render_base, args, concept, plain)  # after the first runs: no core waits for it
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    seed, key = pending.pop(future)
                    runs[seed][key] = future.result()
                    if first and key == first[0]:
                        pending.update({pool.submit(train_and_render, args, later_key, seed, out / f"seed{seed}",
                                                    concept, plain): (seed, later_key) for later_key in later})
            base = base_job.result()
    return base, {seed: {key: runs[seed][key] for key in variants} for seed in seeds}


def training_stats(history: list[dict], stage: int, eta: float) -> dict:
    """The PureCC term's share of the loss and lambda*, averaged over the run (stage 1: none)."""
    if stage == 1:
        return {"pure_share": None, "lambda_mean": None, "lambda_at_min": None}
    share = [eta * h["pri_loss"] / h["loss"] for h in history if h["loss"] > 0]
    return {"pure_share": float(np.mean(share)), "lambda_mean": float(np.mean([h["lambda"] for h in history])),
            "lambda_at_min": float(np.mean([h["lambda_at_min"] for h in history]))}


# ----------------------------------------------------------------------------------------------- evaluation
def eval_prompts(args) -> tuple[list, list]:
    """(concept scenes, plain scenes), fixed: the concept in varied contexts (not only its training ones), and
    full-caption scenes without it."""
    rng = random.Random(2026)
    contexts = [(bg, pos) for bg in world.COLORS for pos in world.POSITIONS]
    rng.shuffle(contexts)
    concept = [world.concept_scene(bg, pos) for bg, pos in contexts[: args.concept_prompts]]
    scenes = world.all_scenes()
    plain = [scenes[rng.randrange(len(scenes))] for _ in range(args.plain_prompts)]
    return concept, plain


def render(pipe, prompts: list[str], args, first_seed: int) -> np.ndarray:
    """uint8 [N, 32, 32, 3]: prompt i with generator seed first_seed + i (the same for every model)."""
    seeds = [first_seed + i for i in range(len(prompts))]
    return build_toy_world.generate(pipe, prompts, seeds, args.sample_steps, args.guidance_scale)


def model_images(pipe, args, concept: list, plain: list) -> dict:
    return {"concept": render(pipe, [world.caption(s) for s in concept], args, 1000),
            "plain": render(pipe, [world.caption(s) for s in plain], args, 2000)}


def score(images: dict, base: dict, concept: list, plain: list) -> dict:
    wanted = [{"background": scene.background, "position": scene.position} for scene in concept]
    concept_side = world.concept_scores(images["concept"], base["concept_base_prompt"], wanted)
    accuracy, agreement = [], []
    for scene, image, base_image in zip(plain, images["plain"], base["plain"]):
        read, base_read = world.read_attributes(image), world.read_attributes(base_image)
        for key in ("background", "color", "shape", "position"):
            accuracy.append(read[key] == getattr(scene, key))
            agreement.append(read[key] == base_read[key])
    change = np.abs(images["plain"].astype(np.float64) - base["plain"].astype(np.float64)).mean() / 255.0
    return concept_side | {"attribute_accuracy": float(np.mean(accuracy)),
                           "agrees_with_base": float(np.mean(agreement)), "pixel_change": float(change)}


@functools.cache  # per process: the world's pipeline, loaded once, LoRAs added and removed
def world_pipeline(world_dir: str) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(str(Path(world_dir) / "model"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_base(args, concept: list, plain: list) -> dict:
    """The base model's images, plus its images of the concept prompts with the plain noun (Seg-Cons' reference)."""
    pipe = world_pipeline(args.world)
    base = model_images(pipe, args, concept, plain)
    base["concept_base_prompt"] = render(pipe, [world.base_caption(s) for s in concept], args, 1000)
    return base


def render_lora(args, folder: Path, concept: list, plain: list) -> dict:
    """The images of the world with one trained LoRA at strength 1."""
    pipe = world_pipeline(args.world)
    names = add_loras(pipe, [folder], [None])
    pipe.set_adapters(names, adapter_weights=[1.0])
    images = model_images(pipe, args, concept, plain)
    pipe.delete_adapters(names)
    return images


# ----------------------------------------------------------------------------------------------- report
def mean_se(values: list) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return mean, se


def markdown(rows: dict) -> str:
    lines = ["| model | " + " | ".join(HEADERS) + " |", "|---" * (len(HEADERS) + 1) + "|"]
    for name, stats in rows.items():
        cells = []
        for key in COLUMNS:
            mean, se = stats[key]
            cells.append("—" if mean is None else f"{mean:.3f} ± {se:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def at_fidelity(trajectory: list[tuple[int, dict]], fidelity: float) -> dict | None:
    """Stage 1's scores where its fidelity first reaches ``fidelity`` along its training (``trajectory``: (step,
    scores) in step order, step 0 = the base model), linearly interpolated between the two checkpoints around it,
    with the (fractional) step; None if stage 1 never gets there."""
    for (step_a, a), (step_b, b) in zip(trajectory, trajectory[1:]):
        if a["fidelity"] <= fidelity <= b["fidelity"] and b["fidelity"] > a["fidelity"]:
            w = (fidelity - a["fidelity"]) / (b["fidelity"] - a["fidelity"])
            scores = {key: (1 - w) * a[key] + w * b[key] for key in EQUAL_FIDELITY}
            return scores | {"step": step_a + w * (step_b - step_a)}
    return None


def equal_fidelity_rows(per_seed_runs: dict, trajectories: dict) -> dict:
    """Per model and seed: its preservation scores minus stage 1's at the same concept fidelity (same seed), and
    the stage-1 step that reaches that fidelity; mean ± s.e. over the seeds where stage 1 reaches it."""
    rows = {}
    for label, by_seed in per_seed_runs.items():
        diffs = {key: [] for key in EQUAL_FIDELITY}
        steps, reached = [], 0
        for seed, scores in by_seed.items():
            match = at_fidelity(trajectories[seed], scores["fidelity"])
            if match is None:
                continue
            reached += 1
            steps.append(match["step"])
            for key in EQUAL_FIDELITY:
                diffs[key].append(scores[key] - match[key])
        rows[label] = {"seeds_reached": (reached, len(by_seed)), "stage1_step": mean_se(steps)} | {
            key: mean_se(values) for key, values in diffs.items()}
    return rows


def equal_fidelity_markdown(rows: dict) -> str:
    deltas = " | ".join(f"Δ {key.replace('_', ' ')}" for key in EQUAL_FIDELITY)
    lines = [f"| model | stage-1 step at its fidelity | {deltas} | seeds |", "|---" * (len(EQUAL_FIDELITY) + 3) + "|"]
    for label, row in rows.items():
        cells = ["—" if row[key][0] is None else f"{row[key][0]:+.3f} ± {row[key][1]:.3f}" for key in EQUAL_FIDELITY]
        step = "—" if row["stage1_step"][0] is None else f"{row['stage1_step'][0]:.0f} ± {row['stage1_step'][1]:.0f}"
        lines.append(f"| {label} | {step} | " + " | ".join(cells) + f" | {row['seeds_reached'][0]}/"
                     f"{row['seeds_reached'][1]} |")
    return "\n".join(lines)


def save_grid(path: Path, rows: dict, columns: int = 6) -> None:
    """Rows = models; columns = up to columns//2 concept prompts then as many plain prompts, same seeds."""
    half = columns // 2
    strips = [np.concatenate(list(images["concept"][:half]) + list(images["plain"][:half]), axis=1)
              for images in rows.values()]
    grid = np.concatenate(strips, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: --variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if not (Path(args.world) / "model" / "model_index.json").is_file():
        raise SystemExit(f"error: no toy world in {args.world}: build it with python scripts/build_toy_world.py")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be 1 or more, got {args.jobs}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.output_dir)
    started = time.time()
    concept, plain = eval_prompts(args)
    base, trained = train_all(args, variants, seeds, out, concept, plain)
    base_scores = score(base, base, concept, plain)
    per_seed = {"base model": [base_scores | training_stats([], 1, 0)]}
    by_seed, trajectories = {}, {}  # {label: {seed: scores}}; {seed: [(step, stage-1 scores)]}
    grid_rows = {"base model": base}
    for seed in seeds:
        for key, (images, history) in trained[seed].items():
            label, stage, flags = VARIANTS[key]
            eta = float(flags[flags.index("--eta") + 1]) if "--eta" in flags else 0.0
            scores = score(images, base, concept, plain)
            per_seed.setdefault(label, []).append(scores | training_stats(history, stage, eta))
            by_seed.setdefault(label, {})[seed] = scores
            if stage == 1:  # step 0 is the base model: a new LoRA starts at zero
                trajectories[seed] = [(0, base_scores)] + [(step, score(checkpoint, base, concept, plain))
                                                           for step, checkpoint in images["trajectory"].items()] + \
                    [(args.steps, scores)]
            if seed == seeds[0]:
                grid_rows[label] = images
    rows = {name: {key: mean_se([s[key] for s in scores]) for key in COLUMNS} for name, scores in per_seed.items()}
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    report = {"settings": dict(vars(args)), "per_seed": per_seed, "summary": {
        name: {key: {"mean": m, "se": se} for key, (m, se) in stats.items()} for name, stats in rows.items()}}
    if trajectories:
        compared = {label: runs for label, runs in by_seed.items() if label != VARIANTS["stage1"][0]}
        equal = equal_fidelity_rows(compared, trajectories)
        table += ("\n\nAt equal concept fidelity: each model's score minus stage 1's where stage 1 (same seed) first "
                  "reaches that model's fidelity, interpolated between its checkpoints (negative Δ pixel change, "
                  "positive Δ agreement: the model changes the base model less than stage 1 does).\n\n"
                  + equal_fidelity_markdown(equal))
        report["stage1_trajectory"] = {str(seed): [{"step": step} | scores for step, scores in points]
                                       for seed, points in trajectories.items()}
        report["equal_fidelity"] = {label: {key: value for key, value in row.items()} for label, row in equal.items()}
    report["minutes"] = round((time.time() - started) / 60, 1)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    save_grid(out / "grid.png", grid_rows)
    for seed in seeds:  # the LoRAs are not needed afterwards; the numbers are
        shutil.rmtree(out / f"seed{seed}", ignore_errors=True)
    print(table)
    print(f"[evidence] {len(seeds)} seed(s) in {(time.time() - started) / 60:.1f} min: {out / 'results.md'}, "
          f"{out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
