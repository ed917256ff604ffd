r"""PureCC stage 1: a DreamBooth LoRA on the concept images, the *representation extractor* (docs/method.md section 2).

Follows the diffusers DreamBooth-LoRA-SD3 recipe and accepts its flags and the authors' release's (their stage-1
commands run verbatim). Input is either an instance folder + one --instance_prompt, or the concept CSV (--data_path
+ --csv_name), each row's image trained with its ``target_prompt`` (or ``prompt``: --stage1_prompt_column), so one
CSV drives both stages. With --new_concept_token it also learns the token's CLIP embeddings, as the release does.

    accelerate launch train_stage1_sd3.py --pretrained_model_name_or_path SD3.5 --instance_data_dir imgs \
        --instance_prompt "a photo of sks robot toy" --output_dir output/base_ckpt/robot_toy ...
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

from utils.args import (RunConfig, add_ignored_args, add_shared_args, check_shared_args, report_check,
                        warn_ignored_flags)
from utils.checkpoint import plan_run
from utils.checks import BadInput, exit_on_error, require, require_positive
from utils.concept_token import add_trainable_token
from utils.data import (PLACEHOLDER, fill_placeholder, folder_to_items, list_instance_images, read_concept_csv,
                        resolve_placeholders, rows_to_items)
from utils.dataset import batch_latents, class_group, ensure_class_images
from utils.flow_matching import add_noise, flow_matching_loss
from utils.lora import CLIP_TARGETS, add_lora, add_trainable_lora, make_lora_config, transformer_lora_config
from utils.outputs import TrainedWeights, finish_run, make_validator
from utils.prompts import PromptEncoder, load_text_pipeline, run_prompts
from utils.training import (compiled_if, load_diffusion_parts, predict, prepare_training, scaled_learning_rate,
                            start_run, train_loop, trainable_to_fp32, weight_dtype_of)

ADAPTER = "default"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(parser, learning_rate=1e-4, precondition_default=1, output_dir_default="output/base_ckpt")
    parser.add_argument("--instance_data_dir", default=None, help="Folder of concept images (3-6 photos).")
    parser.add_argument("--instance_prompt", default=None, help='e.g. "a photo of sks robot toy" ("[v]" becomes the '
                        "learned token with --new_concept_token).")
    parser.add_argument("--stage1_prompt_column", default="target_prompt", choices=["target_prompt", "prompt"],
                        help="The CSV column stage 1 trains on: target_prompt (the seed recipe; what the extractor "
                             "sees in stage 2) or prompt (the release's current recipe).")
    parser.add_argument("--train_text_encoder", action="store_true", help="Also train CLIP-L/G LoRAs (T5 never).")
    parser.add_argument("--text_encoder_lr", type=float, default=5e-6)
    parser.add_argument("--new_concept_token", default=None,
                        help='Learn a new token, e.g. "<new1>", in CLIP-L and CLIP-G (the release); "[v]" in prompts '
                             "becomes it.")
    parser.add_argument("--embedding_lr", type=float, default=5e-3, help="Learning rate of the concept token.")
    parser.add_argument("--initializer_token", default=None,
                        help="Word(s) the token's embedding starts from (default: the CSV's first instance_word).")
    add_ignored_args(parser)
    return parser.parse_args(argv)


def training_items(args) -> list[dict]:
    """The training items (image_path + prompt): the CSV's rows with their --stage1_prompt_column, or a folder's
    images with --instance_prompt; [v] becomes the concept token, else the row's instance word."""
    if args.csv_name:
        require(not args.instance_data_dir, "Give either --instance_data_dir or --data_path/--csv_name, not both.")
        csv_path = Path(args.data_path or ".") / args.csv_name
        rows = resolve_placeholders(read_concept_csv(args.data_path, args.csv_name), args.new_concept_token, csv_path)
        # by default, each image trains with the prompt the frozen extractor will see in stage 2
        return [dict(item, prompt=getattr(row, args.stage1_prompt_column))
                for item, row in zip(rows_to_items(rows), rows)]
    require(args.instance_data_dir, "No training images: give --instance_data_dir (with --instance_prompt) or "
            "--data_path + --csv_name.")
    require(args.instance_prompt, "--instance_data_dir needs --instance_prompt, e.g. \"a photo of sks robot toy\".")
    require(PLACEHOLDER not in args.instance_prompt or args.new_concept_token,
            f"--instance_prompt {args.instance_prompt!r} uses {PLACEHOLDER}, which stands for a learned token: give "
            f"--new_concept_token (e.g. <new1>) or write the identifier itself.")
    prompt = fill_placeholder(args.instance_prompt, args.new_concept_token or "")
    return folder_to_items(list_instance_images(args.instance_data_dir), {"prompt": prompt})


def token_initializer(args, items) -> str | None:
    """The word(s) the concept token starts from: --initializer_token, else the CSV's first instance_word."""
    if not args.new_concept_token:
        return None
    initializer = args.initializer_token or (items[0].get("instance_word") if args.csv_name else None)
    require(initializer, "--new_concept_token needs a word to start from: give --initializer_token (e.g. \"robot toy\") "
            "or train from a concept CSV, whose first instance_word is used.")
    return initializer


def check_inputs(args) -> tuple[RunConfig, list[dict]]:
    """Every check, before any model is loaded: the run's folders and its training items."""
    check_shared_args(args)
    warn_ignored_flags(args)
    require_positive(args, "text_encoder_lr", "embedding_lr")
    items = training_items(args)
    token_initializer(args, items)  # the token has a word to start from
    concept = args.new_concept_token or (items[0].get("instance_word") if args.csv_name else None)
    validation_prompt = args.validation_prompt
    if validation_prompt and PLACEHOLDER in validation_prompt:
        require(concept, f"--validation_prompt uses {PLACEHOLDER} but this run has no concept word to put there: give "
                "--new_concept_token or write the identifier itself.")
        validation_prompt = fill_placeholder(validation_prompt, concept)
    return plan_run(args, Path(args.output_dir), items, stage=1, validation_prompt=validation_prompt), items


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
    accelerator = start_run(args, run, trains_text=args.train_text_encoder or bool(args.new_concept_token))
    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)
    class_items = ensure_class_images(args, accelerator, weight_dtype) if args.with_prior_preservation else None

    # Text: every prompt encoded once, then the encoders freed, unless CLIP trains (its LoRAs or the concept token):
    # then only T5 is cached and CLIP runs every step.
    text_pipe = load_text_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, weight_dtype)
    initializer = token_initializer(args, items)
    token_modules = add_trainable_token(text_pipe, args.new_concept_token, initializer) if initializer else []
    encoder = PromptEncoder(text_pipe, run_prompts(args, run, [item["prompt"] for item in items]), device,
                            args.max_sequence_length, args.text_encoder_device)
    clip_trains = args.train_text_encoder or bool(token_modules)
    prompt_cache = encoder.trainable_cache() if clip_trains else encoder.cache()

    # Model: frozen base + one trainable LoRA (+ CLIP LoRAs with --train_text_encoder, + the token's rows).
    noise_scheduler, vae, transformer = load_diffusion_parts(args, device, weight_dtype)
    add_trainable_lora(transformer, transformer_lora_config(args), ADAPTER, seed=args.seed)
    lora_parts = {"transformer": (transformer, ADAPTER)}
    param_groups = [{"params": trainable_to_fp32(transformer), "lr": scaled_learning_rate(args, accelerator)}]
    if args.train_text_encoder:
        lora_parts.update(add_text_encoder_loras(text_pipe, args))
        param_groups.append({"params": trainable_to_fp32(text_pipe.text_encoder, text_pipe.text_encoder_2),
                             "lr": args.text_encoder_lr, "weight_decay": args.adam_weight_decay_text_encoder})
    if token_modules:
        param_groups.append({"params": [module.row for module in token_modules], "lr": args.embedding_lr,
                             "weight_decay": 0.0})
    if not clip_trains:
        encoder.close()
    weights = TrainedWeights(lora_parts, args.pretrained_model_name_or_path, token_modules,
                             (args.new_concept_token, initializer) if token_modules else None)
    trainer = prepare_training(args, run, accelerator, weights, param_groups, items, class_items, vae,
                               "purecc-stage1")
    precondition = bool(args.precondition_outputs)
    loss_of = compiled_if(args, flow_matching_loss)

    def step(batch, generator):
        """Flow matching (docs/method.md section 3) on the instance images, and on the class images (each with its
        own noise and timestep) under prior preservation, in one forward pass."""
        noised = add_noise(batch_latents(vae, batch, trainer.latent_cache, generator, device), noise_scheduler, args,
                           generator)
        klass = class_group(batch, vae, noise_scheduler, args, generator, device)
        pred, *class_pred = predict(trainer.model, prompt_cache, [(noised, batch["prompt"]), *klass], weight_dtype)
        loss = loss_of(pred, noised, precondition)
        logs = {"loss": loss.item()}
        if klass:  # DreamBooth prior preservation
            prior = loss_of(class_pred[0], klass[0][0], precondition)
            loss = loss + args.prior_loss_weight * prior
            logs.update(instance_loss=logs["loss"], prior_loss=prior.item(), loss=loss.item())
        return loss, logs

    validate = make_validator(args, run, accelerator, transformer, vae, noise_scheduler, prompt_cache)
    step_count, history = train_loop(trainer, step, on_epoch_end=validate)
    finish_run(run, accelerator, trainer.model, weights, "PureCC stage 1: representation extractor (DreamBooth LoRA)",
               {"stage": 1, "steps": step_count, "rank": args.rank, "learning_rate": args.learning_rate,
                "instance prompt(s)": "; ".join(sorted({item["prompt"] for item in items})),
                "concept token": args.new_concept_token or "-", "resolution": args.resolution,
                "precondition_outputs": args.precondition_outputs, "train_text_encoder": args.train_text_encoder,
                "seed": args.seed},
               f'pipe.load_lora_weights("{run.output_dir}")', validate, step_count,
               trainer.schedule.num_train_epochs - 1)
    return SimpleNamespace(transformer=transformer, step=step_count, history=history, output_dir=run.output_dir,
                           text_pipe=text_pipe)


if __name__ == "__main__":
    exit_on_error(main)
