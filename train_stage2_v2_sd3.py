"""PureCC stage 2: pure learning. A new LoRA trained with flow matching plus the eta-weighted PureCC loss, guided by
the frozen representation extractor E = base model + stage-1 LoRA (method.md section 4, paper Eqs. 9-12).

One copy of the base transformer serves every branch: the trainable LoRA ("purecc") and the frozen extractor LoRA
("extractor") are two named adapters on it (method.md section 5). Accepts the authors' stage-2 command verbatim:

    accelerate launch train_stage2_v2_sd3.py --pretrained_model_name_or_path SD3.5 --data_path data \
        --csv_name robot_toy.csv --output_dir ./output --max_train_steps 800 --learning_rate 1e-4 --rank 4 \
        --eta 2.0 --mixed_precision bf16
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from contextlib import contextmanager
from pathlib import Path

import torch

from utils.args import BadInput, add_shared_args, check_shared_args
from utils.checkpoint import list_checkpoints, register_lora_state_hooks, resolve_resume
from utils.data import read_concept_csv, rows_to_items
from utils.flow_matching import (flow_matching_loss, loss_weights, noisy_latents, precondition_to_x0,
                                 sample_timesteps, velocity_target)
from utils.inputs import check_model_geometry, ensure_class_images, exit_on_bad_input
from utils.lora import (activate_adapter, adapters_disabled, add_trainable_lora, load_lora_as_adapter, lora_format,
                        make_lora_config, transformer_target_modules)
from utils.purecc_loss import purecc_loss
from utils.training import (batch_latents, encode_prompts_once, finish_run, load_diffusion_parts, make_accelerator,
                            make_lr_scheduler, make_optimizer, make_training_data, make_validator, resume_if_asked,
                            scaled_learning_rate, start_tracking, train_loop, trainable_to_fp32,
                            transformer_velocity, weight_dtype_of)

TRAINABLE, EXTRACTOR = "purecc", "extractor"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(parser, learning_rate=1e-4, precondition_default=0, output_dir_default="./output")
    parser.set_defaults(max_train_steps=800)
    parser.add_argument("--eta", type=float, default=2.0, help="Weight of the PureCC loss (paper best: 1.0).")
    parser.add_argument("--lambda_mode", default="adaptive", choices=["adaptive", "fixed"],
                        help="adaptive: the paper's lambda* (Eqs. 10-12); fixed: --fix_lambda (the release).")
    parser.add_argument("--fix_lambda", type=float, default=1.0)
    parser.add_argument("--lambda_min", type=float, default=0.0)
    parser.add_argument("--lambda_max", type=float, default=5.0)
    parser.add_argument("--original_branch", default="trainable", choices=["trainable", "frozen"],
                        help="trainable: v_base from the trainable LoRA (Eq. 9); frozen: from the base model.")
    parser.add_argument("--extractor_lora", default=None,
                        help="Stage-1 LoRA folder (either format). Default: <output_dir>/base_ckpt/<csv stem>.")
    parser.add_argument("--extractor_mode", default="lora", choices=["lora", "base"],
                        help="lora: E = base + stage-1 LoRA; base: E = base model (the release's behaviour).")
    return parser.parse_args(argv)


def find_extractor(args, concept: str) -> Path:
    """The stage-1 LoRA: --extractor_lora, else <output_dir>/base_ckpt/<concept>: final weights, else the newest
    checkpoint."""
    root = Path(args.extractor_lora) if args.extractor_lora else Path(args.output_dir) / "base_ckpt" / concept
    if lora_format(root):
        return root
    checkpoints = [path for _, path in list_checkpoints(root) if lora_format(path)]
    if checkpoints:
        return checkpoints[-1]
    raise BadInput(
        f"No stage-1 LoRA (the extractor) found in {root} (looked for final weights and checkpoint-N folders). "
        f"Train it first:\n  accelerate launch train_stage1_sd3.py --pretrained_model_name_or_path "
        f"{args.pretrained_model_name_or_path} --data_path {args.data_path} --csv_name {args.csv_name} "
        f"--output_dir {root} --rank {args.rank}\nor pass --extractor_lora PATH (or --extractor_mode base).")


def read_inputs(args):
    """Every check before any model is loaded. Returns (items, extractor folder or None)."""
    check_shared_args(args)
    if not args.csv_name:
        raise BadInput("Stage 2 needs the concept CSV: give --data_path and --csv_name (method.md section 1).")
    if args.eta < 0:
        raise BadInput(f"--eta must be >= 0, got {args.eta}.")
    if args.lambda_min > args.lambda_max:
        raise BadInput(f"--lambda_min {args.lambda_min} is above --lambda_max {args.lambda_max}.")
    items = rows_to_items(read_concept_csv(args.data_path, args.csv_name))
    concept = Path(args.csv_name).stem
    extractor = find_extractor(args, concept) if args.extractor_mode == "lora" else None
    return items, extractor


@contextmanager
def extractor_weights(transformer, extractor_mode: str):
    """E for one no-grad pass: the stage-1 adapter alone (or every adapter off for --extractor_mode base); the
    trainable adapter is re-activated, and so re-marked trainable, before any backward."""
    if extractor_mode == "base":
        with adapters_disabled(transformer):
            yield
        return
    activate_adapter(transformer, EXTRACTOR, trainable=False)
    try:
        yield
    finally:
        activate_adapter(transformer, TRAINABLE, trainable=True)


def main(argv=None):
    args = parse_args(argv)
    items, extractor_dir = read_inputs(args)
    check_model_geometry(args)
    args.output_root, concept = args.output_dir, Path(args.csv_name).stem
    args.output_dir = str(Path(args.output_root) / concept)  # as the authors' script: <output_dir>/<csv stem>/
    resume_dir = resolve_resume(args.output_dir, args.resume_from_checkpoint)  # a bad name fails before loading
    accelerator = make_accelerator(args)
    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)
    class_items = ensure_class_images(args, accelerator, weight_dtype) if args.with_prior_preservation else None

    # Text: every distinct prompt of the CSV (prompt, base_prompt, target_prompt) plus "" encoded once.
    prompts = [item[key] for item in items for key in ("prompt", "base_prompt", "target_prompt")]
    prompt_cache, _ = encode_prompts_once(args, device, weight_dtype, prompts)

    # Model: ONE frozen base transformer, a new trainable LoRA and the frozen stage-1 LoRA as named adapters.
    noise_scheduler, vae, transformer = load_diffusion_parts(args, device, weight_dtype)
    lora_config = make_lora_config(args.rank, transformer_target_modules(args.lora_layers, args.lora_blocks),
                                   args.lora_dropout)
    add_trainable_lora(transformer, lora_config, TRAINABLE, seed=args.seed)
    if extractor_dir is not None:
        load_lora_as_adapter(transformer, extractor_dir, EXTRACTOR, trainable=False)
        transformer.to(device, dtype=weight_dtype)
    activate_adapter(transformer, TRAINABLE, trainable=True)
    trainable = trainable_to_fp32(transformer)
    lora_parts = {"transformer": (transformer, TRAINABLE)}
    config_of = {"transformer": transformer.peft_config[TRAINABLE]}

    dataset, dataloader, latent_cache = make_training_data(args, accelerator, items, class_items, vae)
    optimizer = make_optimizer(args, [{"params": trainable, "lr": scaled_learning_rate(args, accelerator)}])
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes)
    transformer_ddp, optimizer, dataloader, lr_scheduler = accelerator.prepare(transformer, optimizer, dataloader,
                                                                               lr_scheduler)
    register_lora_state_hooks(accelerator, lora_parts, config_of, args.pretrained_model_name_or_path)
    start_step = resume_if_asked(accelerator, resume_dir)
    start_tracking(accelerator, args, "purecc-stage2")
    precondition = bool(args.precondition_outputs)

    def compute_loss(batch, generator):
        """One PureCC step (method.md section 4): the same x_t and t for every branch."""
        x0 = batch_latents(vae, batch, latent_cache, generator, device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(device)
        timesteps, sigmas = sample_timesteps(noise_scheduler, x0.shape[0], args.weighting_scheme, args.logit_mean,
                                             args.logit_std, args.mode_scale, device, generator=generator)
        x_t = noisy_latents(x0, noise, sigmas)
        weights = loss_weights(args.weighting_scheme, sigmas, x0.ndim)
        n = x0.shape[0]

        # Frozen extractor, one no-grad pass over [target_prompt; ""]: delta = e_cond - e_uncond (implicit guidance).
        with torch.no_grad():
            with extractor_weights(transformer, args.extractor_mode):
                embeds, pooled = prompt_cache.lookup(batch["target_prompt"] + [""] * n, device, weight_dtype)
                e_cond, e_uncond = transformer_velocity(transformer_ddp, x_t.repeat(2, 1, 1, 1), timesteps.repeat(2),
                                                        embeds, pooled).chunk(2)
            if args.original_branch == "frozen":  # supplement section 14: v_base from the base model, no grad
                with adapters_disabled(transformer):
                    embeds, pooled = prompt_cache.lookup(batch["base_prompt"], device, weight_dtype)
                    v_base_frozen = transformer_velocity(transformer_ddp, x_t, timesteps, embeds, pooled)

        # Trainable LoRA, one pass over [prompt; base_prompt] (+ class images under prior preservation).
        copies = 2 if args.original_branch == "trainable" else 1
        branch_prompts = batch["prompt"] + (batch["base_prompt"] if copies == 2 else [])
        latents_in, times_in = x_t.repeat(copies, 1, 1, 1), timesteps.repeat(copies)
        if "class_pixel_values" in batch:
            class_batch = {"pixel_values": batch["class_pixel_values"], "image_index": batch["class_image_index"]}
            class_x0 = batch_latents(vae, class_batch, None, generator, device)
            class_noise = torch.randn(class_x0.shape, generator=generator, dtype=class_x0.dtype).to(device)
            class_x_t = noisy_latents(class_x0, class_noise, sigmas)
            branch_prompts = branch_prompts + batch["class_prompt"]
            latents_in, times_in = torch.cat([latents_in, class_x_t]), torch.cat([times_in, timesteps])
        embeds, pooled = prompt_cache.lookup(branch_prompts, device, weight_dtype)
        pred = transformer_velocity(transformer_ddp, latents_in, times_in, embeds, pooled)
        v = pred[:n]
        v_base = pred[n:2 * n] if args.original_branch == "trainable" else v_base_frozen

        prior = None
        if "class_pixel_values" in batch:
            prior = flow_matching_loss(pred[-n:], class_x0, class_noise, class_x_t, sigmas, weights, precondition)
        if precondition:  # compare like with like: every prediction in x0 space (method.md section 3)
            v, v_base, e_cond, e_uncond = (precondition_to_x0(p, x_t, sigmas) for p in (v, v_base, e_cond, e_uncond))
            target = x0
        else:
            target = velocity_target(x0, noise)
        out = purecc_loss(v, v_base, e_cond, e_uncond, target, weights, args.eta, lambda_mode=args.lambda_mode,
                          fix_lambda=args.fix_lambda, lambda_min=args.lambda_min, lambda_max=args.lambda_max,
                          prior_loss=prior, prior_loss_weight=args.prior_loss_weight)
        logs = {"loss": out.total.item(), "diff_loss": out.diff_loss.item(), "pri_loss": out.pure_loss.item(),
                "lambda": out.lambda_.mean().item()}
        if prior is not None:
            logs["prior_loss"] = prior.item()
        return out.total, logs

    validate = make_validator(args, accelerator, transformer, vae, noise_scheduler, prompt_cache)
    step, history = train_loop(args, accelerator, transformer_ddp, optimizer, lr_scheduler, dataloader, dataset,
                               compute_loss, trainable, start_step, on_epoch_end=validate)
    finish_run(args, accelerator, lora_parts, config_of, f"PureCC stage 2: {concept}",
               {"stage": 2, "steps": step, "eta": args.eta, "lambda_mode": args.lambda_mode,
                "fix_lambda": args.fix_lambda if args.lambda_mode == "fixed" else "-",
                "lambda range": f"[{args.lambda_min}, {args.lambda_max}]", "original_branch": args.original_branch,
                "extractor_mode": args.extractor_mode, "extractor": str(extractor_dir) if extractor_dir else "base model",
                "rank": args.rank, "learning_rate": args.learning_rate,
                "precondition_outputs": args.precondition_outputs, "seed": args.seed},
               f'pipe.transformer = PeftModel.from_pretrained(pipe.transformer, "{args.output_dir}")', validate, step)
    return SimpleNamespace(transformer=transformer, step=step, history=history, output_dir=args.output_dir)


if __name__ == "__main__":
    exit_on_bad_input(main)
