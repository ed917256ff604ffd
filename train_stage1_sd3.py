"""PureCC stage 1: a DreamBooth LoRA on the concept images, the *representation extractor* (method.md section 2).

Follows the diffusers DreamBooth-LoRA-SD3 recipe and accepts its flags (the authors' stage-1 command runs
verbatim). Input is either an instance folder + one --instance_prompt, or the concept CSV (--data_path +
--csv_name), each row's image trained with its ``target_prompt`` so one CSV drives both stages.

    accelerate launch train_stage1_sd3.py --pretrained_model_name_or_path SD3.5 --instance_data_dir imgs \
        --instance_prompt "a photo of sks robot toy" --output_dir output/base_ckpt/robot_toy ...
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace
import torch

from utils.args import BadInput, add_shared_args, check_shared_args
from utils.checkpoint import register_lora_state_hooks, resolve_resume
from utils.data import folder_to_items, list_instance_images, read_concept_csv, rows_to_items
from utils.flow_matching import flow_matching_loss, loss_weights, noisy_latents, sample_timesteps
from utils.inputs import check_model_geometry, ensure_class_images, exit_on_bad_input
from utils.lora import CLIP_TARGETS, add_lora, add_trainable_lora, make_lora_config, transformer_target_modules
from utils.training import (batch_latents, encode_prompts_once, finish_run, load_diffusion_parts, make_accelerator,
                            make_lr_scheduler, make_optimizer, make_training_data, make_validator, resume_if_asked,
                            scaled_learning_rate, start_tracking, train_loop, trainable_to_fp32,
                            transformer_velocity, weight_dtype_of)

ADAPTER = "default"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(parser, learning_rate=1e-4, precondition_default=1, output_dir_default="output/base_ckpt")
    parser.add_argument("--instance_data_dir", default=None, help="Folder of concept images (3-6 photos).")
    parser.add_argument("--instance_prompt", default=None, help='e.g. "a photo of sks robot toy".')
    parser.add_argument("--train_text_encoder", action="store_true", help="Also train CLIP-L/G LoRAs (T5 never).")
    parser.add_argument("--text_encoder_lr", type=float, default=5e-6)
    return parser.parse_args(argv)


def read_inputs(args) -> list[dict]:
    """Every data check, before any model is loaded: returns the training items (image_path + prompt)."""
    check_shared_args(args)
    if args.csv_name:
        if args.instance_data_dir:
            raise BadInput("Give either --instance_data_dir or --data_path/--csv_name, not both.")
        rows = read_concept_csv(args.data_path, args.csv_name)
        # stage 1 trains each image with the prompt the frozen extractor will see in stage 2
        return [dict(item, prompt=row.target_prompt) for item, row in zip(rows_to_items(rows), rows)]
    if not args.instance_data_dir:
        raise BadInput("No training images: give --instance_data_dir (with --instance_prompt) or "
                       "--data_path + --csv_name.")
    if not args.instance_prompt:
        raise BadInput("--instance_data_dir needs --instance_prompt, e.g. \"a photo of sks robot toy\".")
    return folder_to_items(list_instance_images(args.instance_data_dir), {"prompt": args.instance_prompt})


def add_text_encoder_loras(text_pipe, args) -> dict:
    """CLIP-L and CLIP-G LoRAs (T5 is never trained); returns {component: (model, adapter)}."""
    parts = {}
    for component in ("text_encoder", "text_encoder_2"):
        encoder = getattr(text_pipe, component)
        add_lora(encoder, make_lora_config(args.rank, CLIP_TARGETS, args.lora_dropout), ADAPTER)
        parts[component] = (encoder, ADAPTER)
    return parts


def main(argv=None):
    args = parse_args(argv)
    items = read_inputs(args)
    check_model_geometry(args)
    resume_dir = resolve_resume(args.output_dir, args.resume_from_checkpoint)  # a bad name fails before loading
    accelerator = make_accelerator(args)
    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)
    class_items = ensure_class_images(args, accelerator, weight_dtype) if args.with_prior_preservation else None

    # Text: every prompt encoded once, then the encoders freed (CLIP stays only if it trains).
    prompt_cache, text_pipe = encode_prompts_once(args, device, weight_dtype, [item["prompt"] for item in items],
                                                  keep_clip_trainable=args.train_text_encoder)

    # Model: frozen base + one trainable LoRA (+ CLIP LoRAs with --train_text_encoder).
    noise_scheduler, vae, transformer = load_diffusion_parts(args, device, weight_dtype)
    lora_config = make_lora_config(args.rank, transformer_target_modules(args.lora_layers, args.lora_blocks),
                                   args.lora_dropout)
    add_trainable_lora(transformer, lora_config, ADAPTER, seed=args.seed)
    lora_parts = {"transformer": (transformer, ADAPTER)}
    if args.train_text_encoder:
        lora_parts.update(add_text_encoder_loras(text_pipe, args))
    config_of = {name: model.peft_config[adapter] for name, (model, adapter) in lora_parts.items()}
    param_groups = [{"params": trainable_to_fp32(transformer), "lr": scaled_learning_rate(args, accelerator)}]
    if args.train_text_encoder:
        clip_params = trainable_to_fp32(text_pipe.text_encoder, text_pipe.text_encoder_2)
        param_groups.append({"params": clip_params, "lr": args.text_encoder_lr})

    dataset, dataloader, latent_cache = make_training_data(args, accelerator, items, class_items, vae)
    optimizer = make_optimizer(args, param_groups)
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes)
    models = [model for model, _ in lora_parts.values()]
    *models, optimizer, dataloader, lr_scheduler = accelerator.prepare(*models, optimizer, dataloader, lr_scheduler)
    transformer_ddp = models[0]
    register_lora_state_hooks(accelerator, lora_parts, config_of, args.pretrained_model_name_or_path)
    start_step = resume_if_asked(accelerator, resume_dir)
    start_tracking(accelerator, args, "purecc-stage1")

    def compute_loss(batch, generator):
        """Flow matching (method.md section 3) on instance (+ class) images."""
        prompts_in_batch = batch["prompt"] + batch.get("class_prompt", [])
        x0 = batch_latents(vae, batch, latent_cache, generator, device)
        if "class_pixel_values" in batch:
            class_batch = {"pixel_values": batch["class_pixel_values"], "image_index": batch["class_image_index"]}
            x0 = torch.cat([x0, batch_latents(vae, class_batch, None, generator, device)])
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(device)
        timesteps, sigmas = sample_timesteps(noise_scheduler, x0.shape[0], args.weighting_scheme, args.logit_mean,
                                             args.logit_std, args.mode_scale, device, generator=generator)
        x_t = noisy_latents(x0, noise, sigmas)
        embeds, pooled = prompt_cache.lookup(prompts_in_batch, device, weight_dtype)
        pred = transformer_velocity(transformer_ddp, x_t, timesteps, embeds, pooled)
        weights = loss_weights(args.weighting_scheme, sigmas, x0.ndim)
        n = len(batch["prompt"])
        loss = flow_matching_loss(pred[:n], x0[:n], noise[:n], x_t[:n], sigmas[:n], weights[:n],
                                  bool(args.precondition_outputs))
        logs = {"loss": loss.item()}
        if n < x0.shape[0]:  # DreamBooth prior preservation on the class images
            prior = flow_matching_loss(pred[n:], x0[n:], noise[n:], x_t[n:], sigmas[n:], weights[n:],
                                       bool(args.precondition_outputs))
            loss = loss + args.prior_loss_weight * prior
            logs.update(instance_loss=logs["loss"], prior_loss=prior.item(), loss=loss.item())
        return loss, logs

    validate = make_validator(args, accelerator, transformer, vae, noise_scheduler, prompt_cache)
    params_to_clip = [p for group in optimizer.param_groups for p in group["params"]]
    step, history = train_loop(args, accelerator, transformer_ddp, optimizer, lr_scheduler, dataloader, dataset,
                               compute_loss, params_to_clip, start_step, on_epoch_end=validate)
    finish_run(args, accelerator, lora_parts, config_of, "PureCC stage 1: representation extractor (DreamBooth LoRA)",
               {"stage": 1, "steps": step, "rank": args.rank, "learning_rate": args.learning_rate,
                "instance prompt(s)": "; ".join(sorted({item["prompt"] for item in items})),
                "resolution": args.resolution, "precondition_outputs": args.precondition_outputs,
                "train_text_encoder": args.train_text_encoder, "seed": args.seed},
               f'pipe.load_lora_weights("{args.output_dir}")', validate, step)
    return SimpleNamespace(transformer=transformer, step=step, history=history, output_dir=args.output_dir)


if __name__ == "__main__":
    exit_on_bad_input(main)
