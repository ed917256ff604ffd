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
from utils.checkpoint import register_lora_state_hooks, resolve_resume, write_trainable_lora
from utils.data import folder_to_items, list_instance_images, read_concept_csv, rows_to_items
from utils.flow_matching import flow_matching_loss, loss_weights, noisy_latents, sample_timesteps
from utils.lora import CLIP_TARGETS, add_lora, add_trainable_lora, make_lora_config, transformer_target_modules
from utils.prompts import PromptCache, free_text_encoders, load_text_pipeline, text_encoders
from utils.inputs import check_model_geometry, ensure_class_images, exit_on_bad_input, make_run_dataset
from utils.training import (LatentCache, batch_latents, load_diffusion_parts, log_validation, make_accelerator,
                            make_dataloader, make_lr_scheduler, make_optimizer, pipeline_without_text_encoders,
                            resolve_schedule, resume_if_asked, train_loop, transformer_velocity, weight_dtype_of,
                            write_model_card)

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

    # Text: encode every prompt once, then free the encoders (CLIP stays only if it trains).
    text_pipe = load_text_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, weight_dtype)
    text_pipe.to(device)
    for encoder in text_encoders(text_pipe):
        encoder.requires_grad_(False)
    prompts = [item["prompt"] for item in items] + [args.class_prompt or "", args.validation_prompt or ""]
    prompt_cache = PromptCache(text_pipe, prompts, device, args.max_sequence_length,
                               keep_clip_trainable=args.train_text_encoder)
    if args.train_text_encoder:
        text_pipe.text_encoder_3 = None
    else:
        free_text_encoders(text_pipe)

    # Model: frozen base + one trainable LoRA.
    noise_scheduler, vae, transformer = load_diffusion_parts(args, device, weight_dtype)
    lora_config = make_lora_config(args.rank, transformer_target_modules(args.lora_layers, args.lora_blocks),
                                   args.lora_dropout)
    add_trainable_lora(transformer, lora_config, ADAPTER, seed=args.seed)
    lora_parts = {"transformer": (transformer, ADAPTER)}
    if args.train_text_encoder:
        text_pipe.text_encoder.to(torch.float32)
        text_pipe.text_encoder_2.to(torch.float32)
        lora_parts.update(add_text_encoder_loras(text_pipe, args))
    config_of = {name: model.peft_config[adapter] for name, (model, adapter) in lora_parts.items()}
    for model, _ in lora_parts.values():  # LoRA weights train in fp32 whatever --mixed_precision says
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()

    dataset, collate_fn = make_run_dataset(args, items, class_items)
    latent_cache = LatentCache(vae, dataset, device) if args.cache_latents else None
    dataloader = make_dataloader(args, dataset, collate_fn)
    args.max_train_steps, args.num_train_epochs = resolve_schedule(args, len(dataloader))

    lr = args.learning_rate * (args.gradient_accumulation_steps * args.train_batch_size *
                               accelerator.num_processes if args.scale_lr else 1)
    param_groups = [{"params": [p for p in transformer.parameters() if p.requires_grad], "lr": lr}]
    if args.train_text_encoder:
        param_groups.append({"params": [p for name in ("text_encoder", "text_encoder_2")
                                        for p in lora_parts[name][0].parameters() if p.requires_grad],
                             "lr": args.text_encoder_lr})
    optimizer = make_optimizer(args, param_groups)
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes)

    prepared = [transformer] + [lora_parts[n][0] for n in lora_parts if n != "transformer"]
    *prepared, optimizer, dataloader, lr_scheduler = accelerator.prepare(*prepared, optimizer, dataloader, lr_scheduler)
    transformer_ddp = prepared[0]
    register_lora_state_hooks(accelerator, lora_parts, config_of, args.pretrained_model_name_or_path)
    start_step = resume_if_asked(accelerator, resume_dir)
    if accelerator.is_main_process:
        accelerator.init_trackers("purecc-stage1", config={k: v for k, v in vars(args).items()
                                                             if isinstance(v, (int, float, str, bool))})

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

    def validate(epoch, step):
        if args.validation_prompt and accelerator.is_main_process and (epoch + 1) % args.validation_epochs == 0:
            log_validation(accelerator, pipeline_without_text_encoders(transformer, vae, noise_scheduler),
                           prompt_cache, args, step)

    params_to_clip = [p for group in optimizer.param_groups for p in group["params"]]
    step, history = train_loop(args, accelerator, transformer_ddp, optimizer, lr_scheduler, dataloader, dataset,
                      compute_loss, params_to_clip, start_step, on_epoch_end=validate)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_trainable_lora(args.output_dir, lora_parts, config_of, args.pretrained_model_name_or_path)
        write_model_card(args.output_dir, "PureCC stage 1: representation extractor (DreamBooth LoRA)",
                         args.pretrained_model_name_or_path,
                         {"stage": 1, "steps": step, "rank": args.rank, "learning_rate": args.learning_rate,
                          "instance prompt(s)": "; ".join(sorted({i["prompt"] for i in items})),
                          "resolution": args.resolution, "precondition_outputs": args.precondition_outputs,
                          "train_text_encoder": args.train_text_encoder, "seed": args.seed},
                         usage=f'pipe.load_lora_weights("{args.output_dir}")')
        if args.validation_prompt:
            log_validation(accelerator, pipeline_without_text_encoders(transformer, vae, noise_scheduler),
                           prompt_cache, args, step, tag="final")
        accelerator.print(f"Stage 1 LoRA saved to {args.output_dir}")
    accelerator.end_training()
    return SimpleNamespace(transformer=transformer, step=step, history=history, output_dir=args.output_dir)


if __name__ == "__main__":
    exit_on_bad_input(main)
