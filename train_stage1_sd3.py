"""PureCC stage 1: a DreamBooth LoRA on the concept images, the *representation extractor* (docs/method.md section 2).

Follows the diffusers DreamBooth-LoRA-SD3 recipe and accepts its flags (the authors' stage-1 command runs
verbatim). Input is either an instance folder + one --instance_prompt, or the concept CSV (--data_path +
--csv_name), each row's image trained with its ``target_prompt`` so one CSV drives both stages.

    accelerate launch train_stage1_sd3.py --pretrained_model_name_or_path SD3.5 --instance_data_dir imgs \
        --instance_prompt "a photo of sks robot toy" --output_dir output/base_ckpt/robot_toy ...
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

from utils.args import RunConfig, add_shared_args, check_shared_args, report_check
from utils.checkpoint import plan_run
from utils.checks import BadInput, exit_on_error
from utils.data import folder_to_items, list_instance_images, read_concept_csv, rows_to_items
from utils.dataset import batch_latents, class_group, ensure_class_images
from utils.flow_matching import add_noise, flow_matching_loss
from utils.lora import CLIP_TARGETS, add_lora, add_trainable_lora, make_lora_config, transformer_lora_config
from utils.outputs import finish_run, make_validator
from utils.prompts import PromptEncoder, load_text_pipeline, run_prompts
from utils.training import (load_diffusion_parts, start_run, predict, prepare_training, scaled_learning_rate,
                            train_loop, trainable_to_fp32, weight_dtype_of)

ADAPTER = "default"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(parser, learning_rate=1e-4, precondition_default=1, output_dir_default="output/base_ckpt")
    parser.add_argument("--instance_data_dir", default=None, help="Folder of concept images (3-6 photos).")
    parser.add_argument("--instance_prompt", default=None, help='e.g. "a photo of sks robot toy".')
    parser.add_argument("--train_text_encoder", action="store_true", help="Also train CLIP-L/G LoRAs (T5 never).")
    parser.add_argument("--text_encoder_lr", type=float, default=5e-6)
    return parser.parse_args(argv)


def training_items(args) -> list[dict]:
    """The training items (image_path + prompt): the CSV's rows with their target_prompt, or a folder's images."""
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


def check_inputs(args) -> tuple[RunConfig, list[dict]]:
    """Every check, before any model is loaded: the run's folders and its training items."""
    check_shared_args(args)
    items = training_items(args)
    return plan_run(args, Path(args.output_dir), items, stage=1), items


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
    run, items = check_inputs(args)
    if args.check_only:
        return report_check(run, items)
    accelerator = start_run(args, run)
    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)
    class_items = ensure_class_images(args, accelerator, weight_dtype) if args.with_prior_preservation else None

    # Text: every prompt encoded once, then the encoders freed (CLIP stays only if it trains).
    encoder = PromptEncoder(load_text_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant,
                                               weight_dtype),
                            run_prompts(args, [item["prompt"] for item in items]), device, args.max_sequence_length)
    prompt_cache = encoder.trainable_cache() if args.train_text_encoder else encoder.cache()

    # Model: frozen base + one trainable LoRA (+ CLIP LoRAs with --train_text_encoder).
    noise_scheduler, vae, transformer = load_diffusion_parts(args, device, weight_dtype)
    add_trainable_lora(transformer, transformer_lora_config(args), ADAPTER, seed=args.seed)
    lora_parts = {"transformer": (transformer, ADAPTER)}
    param_groups = [{"params": trainable_to_fp32(transformer), "lr": scaled_learning_rate(args, accelerator)}]
    if args.train_text_encoder:
        lora_parts.update(add_text_encoder_loras(encoder.pipe, args))
        param_groups.append({"params": trainable_to_fp32(encoder.pipe.text_encoder, encoder.pipe.text_encoder_2),
                             "lr": args.text_encoder_lr})
    else:
        encoder.close()
    trainer = prepare_training(args, run, accelerator, lora_parts, param_groups, items, class_items, vae,
                               "purecc-stage1")
    precondition = bool(args.precondition_outputs)

    def step(batch, generator):
        """Flow matching (docs/method.md section 3) on the instance images, and on the class images (each with its
        own noise and timestep) under prior preservation, in one forward pass."""
        noised = add_noise(batch_latents(vae, batch, trainer.latent_cache, generator, device), noise_scheduler, args,
                           generator)
        klass = class_group(batch, vae, noise_scheduler, args, generator, device)
        pred, *class_pred = predict(trainer.model, prompt_cache, [(noised, batch["prompt"]), *klass], weight_dtype)
        loss = flow_matching_loss(pred, noised, precondition)
        logs = {"loss": loss.item()}
        if klass:  # DreamBooth prior preservation
            prior = flow_matching_loss(class_pred[0], klass[0][0], precondition)
            loss = loss + args.prior_loss_weight * prior
            logs.update(instance_loss=logs["loss"], prior_loss=prior.item(), loss=loss.item())
        return loss, logs

    validate = make_validator(args, run, accelerator, transformer, vae, noise_scheduler, prompt_cache)
    step_count, history = train_loop(trainer, step, on_epoch_end=validate)
    finish_run(args, run, accelerator, lora_parts, "PureCC stage 1: representation extractor (DreamBooth LoRA)",
               {"stage": 1, "steps": step_count, "rank": args.rank, "learning_rate": args.learning_rate,
                "instance prompt(s)": "; ".join(sorted({item["prompt"] for item in items})),
                "resolution": args.resolution, "precondition_outputs": args.precondition_outputs,
                "train_text_encoder": args.train_text_encoder, "seed": args.seed},
               f'pipe.load_lora_weights("{run.output_dir}")', validate, step_count,
               trainer.schedule.num_train_epochs - 1)
    return SimpleNamespace(transformer=transformer, step=step_count, history=history, output_dir=run.output_dir)


if __name__ == "__main__":
    exit_on_error(main)
