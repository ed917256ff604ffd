"""Command-line flags shared by both stages (the diffusers DreamBooth-LoRA-SD3 interface), their checks, and the
values derived from them once, right after parsing.

``args`` is read, never written, after ``parse_args``: whatever a run derives (its output folder, the extractor
folder, the checkpoint to resume, the step schedule) lives in a frozen ``RunConfig`` or ``Schedule`` instead.
"""

from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import (BadInput, check_model_folder, check_resolution, check_writable_folder, require,
                     require_non_negative, require_positive)


def add_model_args(p):
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Local SD3 / SD3.5 diffusers folder (or hub id, if your machine can reach the hub).")
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None, help="Weight variant, e.g. fp16.")


def add_data_args(p):
    p.add_argument("--data_path", default=None, help="Folder holding the concept CSV(s); relative image paths "
                   "resolve against it first, then against the working directory.")
    p.add_argument("--csv_name", default=None, help="Concept CSV under --data_path (docs/method.md section 1).")
    p.add_argument("--class_data_dir", default=None)
    p.add_argument("--class_prompt", default=None)
    p.add_argument("--with_prior_preservation", action="store_true")
    p.add_argument("--prior_loss_weight", type=float, default=1.0)
    p.add_argument("--num_class_images", type=int, default=100,
                   help="Class images wanted in --class_data_dir; missing ones are generated with the base model.")
    p.add_argument("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--center_crop", action="store_true")
    p.add_argument("--random_flip", action="store_true")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max_sequence_length", type=int, default=77, help="T5 tokens.")
    p.add_argument("--cache_latents", action="store_true")
    p.add_argument("--dataloader_num_workers", type=int, default=0)


def add_lora_args(p):
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--lora_layers", default=None,
                   help='Comma-separated module names, e.g. "attn.to_k,attn.to_q" (default: all attention projections).')
    p.add_argument("--lora_blocks", default=None, help='Comma-separated transformer block indices, e.g. "0,12".')


def add_optim_args(p, learning_rate: float):
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--num_train_epochs", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--learning_rate", type=float, default=learning_rate)
    p.add_argument("--scale_lr", action="store_true")
    p.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--lr_num_cycles", type=int, default=1)
    p.add_argument("--lr_power", type=float, default=1.0)
    p.add_argument("--optimizer", default="AdamW", type=str.lower, choices=["adamw", "prodigy"],
                   help='AdamW (default) or "prodigy" (prodigyopt; give --learning_rate 1.0 as its authors advise).')
    p.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit.")
    p.add_argument("--adam_8bit_min_size", type=int, default=1,
                   help="Tensors smaller than this keep fp32 Adam state. bitsandbytes defaults to 4096, which would "
                        "keep every tensor of a small LoRA in fp32 and make --use_8bit_adam a no-op.")
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-4)
    p.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-3,
                   help="Weight decay of the CLIP LoRAs (stage 1 --train_text_encoder).")
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--prodigy_beta3", type=float, default=None,
                   help="Prodigy's step-size running-average coefficient (default: sqrt(beta2)).")
    p.add_argument("--prodigy_decouple", type=str_to_bool, default=True, help="AdamW-style decoupled weight decay.")
    p.add_argument("--prodigy_use_bias_correction", type=str_to_bool, default=True)
    p.add_argument("--prodigy_safeguard_warmup", type=str_to_bool, default=True)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--allow_tf32", action="store_true")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])


def add_speed_args(p):
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block and the small modules around them (regional "
                        "compilation), the VAE encoder's blocks and the stage's loss maths: fewer kernel launches per "
                        "step; the first steps pay the compilation.")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend (inductor; aot_eager in tests).")
    p.add_argument("--text_encoder_device", default=None,
                   help="Device the frozen text encoders encode the prompts on (default: the training device, "
                        'which T5-XXL visits one block at a time). "cpu" keeps them off the GPU entirely.')
    p.add_argument("--base_quantization", default="none", choices=["none", "nf4", "int8"],
                   help="Load the frozen transformer quantised with bitsandbytes (QLoRA); the LoRA trains in fp32 on "
                        "top. Needs a CUDA GPU.")


def add_flow_matching_args(p, precondition_default: int):
    p.add_argument("--weighting_scheme", default="logit_normal",
                   choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"])
    p.add_argument("--logit_mean", type=float, default=0.0)
    p.add_argument("--logit_std", type=float, default=1.0)
    p.add_argument("--mode_scale", type=float, default=1.29)
    p.add_argument("--precondition_outputs", type=int, default=precondition_default, choices=[0, 1],
                   help="1: EDM-style x0 prediction and target (docs/method.md section 3).")


def add_run_args(p, output_dir_default: str):
    p.add_argument("--output_dir", default=output_dir_default)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint-N folder name or "latest".')
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="Clear an output folder that holds an earlier run (final LoRA or checkpoints) and train anew.")
    p.add_argument("--check_only", action="store_true",
                   help="Run every input check, load no model, print what would run, and exit (0 when all is well).")
    p.add_argument("--validation_prompt", default=None)
    p.add_argument("--num_validation_images", type=int, default=2)
    p.add_argument("--validation_epochs", type=int, default=50)
    p.add_argument("--validation_steps", type=int, default=20, help="Inference steps of validation images.")
    p.add_argument("--report_to", default="tensorboard", help='"tensorboard" or "none".')
    p.add_argument("--logging_dir", default="logs")


# Flags of the diffusers DreamBooth-LoRA-SD3 script and the authors' release that mean nothing here: accepted, so
# their commands run verbatim, each with one warning saying why it is ignored.
IGNORED_FLAGS = {
    "--dataset_name": "images come from --data_path/--csv_name or --instance_data_dir, not a hub dataset",
    "--dataset_config_name": "images come from --data_path/--csv_name or --instance_data_dir, not a hub dataset",
    "--image_column": "images come from the concept CSV's image_path column",
    "--caption_column": "captions come from the concept CSV's prompt columns",
    "--cache_dir": "models load from --pretrained_model_name_or_path (hub downloads go to HF_HOME)",
    "--push_to_hub": "nothing is uploaded; the output folder is the result",
    "--hub_token": "nothing is uploaded; the output folder is the result",
    "--hub_model_id": "nothing is uploaded; the output folder is the result",
    "--local_rank": "accelerate gives every process its rank",
    "--upcast_before_saving": "LoRA weights are always saved in float32",
    "--prior_generation_precision": "class images are generated in --mixed_precision's dtype",
}


def add_ignored_args(p, extra: dict | None = None):
    for flag in {**IGNORED_FLAGS, **(extra or {})}:
        p.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)


def warn_ignored_flags(args, extra: dict | None = None) -> None:
    """One warning per release/diffusers flag that was given but means nothing here."""
    for flag, why in {**IGNORED_FLAGS, **(extra or {})}.items():
        if getattr(args, flag[2:]) is not None:
            warnings.warn(f"{flag} is ignored: {why}.", stacklevel=2)


def str_to_bool(text: str) -> bool:
    """argparse type for the release's boolean flags (its type=bool made "False" true)."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_shared_args(p, *, learning_rate: float, precondition_default: int, output_dir_default: str):
    add_model_args(p)
    add_data_args(p)
    add_lora_args(p)
    add_optim_args(p, learning_rate)
    add_speed_args(p)
    add_flow_matching_args(p, precondition_default)
    add_run_args(p, output_dir_default)


def check_shared_args(args) -> None:
    """Flag values and combinations that are wrong whatever the data."""
    check_model_folder(args.pretrained_model_name_or_path)
    require_positive(args, "resolution", "train_batch_size", "gradient_accumulation_steps", "rank", "repeats",
                     "checkpointing_steps", "num_train_epochs", "max_sequence_length", "learning_rate")
    if args.max_train_steps is not None:
        require_positive(args, "max_train_steps")
    require_non_negative(args, "max_grad_norm", "adam_weight_decay", "prior_loss_weight", "lr_warmup_steps")
    require(0.0 <= args.lora_dropout < 1.0, f"--lora_dropout must be in [0, 1), got {args.lora_dropout}.")
    require(args.checkpoints_total_limit is None or args.checkpoints_total_limit > 0,
            f"--checkpoints_total_limit must be positive, got {args.checkpoints_total_limit}.")
    if args.lora_blocks:
        try:
            [int(b) for b in args.lora_blocks.split(",") if b.strip()]
        except ValueError:
            raise BadInput(f'--lora_blocks {args.lora_blocks!r}: expected comma-separated integers such as "0,1".')
    require(args.max_sequence_length <= 512, f"--max_sequence_length must be <= 512 (T5), got {args.max_sequence_length}.")
    if args.with_prior_preservation:
        require(args.class_data_dir is not None, "--with_prior_preservation needs --class_data_dir.")
        require(args.class_prompt is not None, "--with_prior_preservation needs --class_prompt.")
    require(args.report_to in ("tensorboard", "none"), f'--report_to must be "tensorboard" or "none", got {args.report_to}.')
    if (args.data_path is None) != (args.csv_name is None):
        raise BadInput("--data_path and --csv_name go together: give both (the CSV is <data_path>/<csv_name>).")
    if args.optimizer == "prodigy":
        if args.learning_rate < 0.1:
            warnings.warn(f"--optimizer prodigy with --learning_rate {args.learning_rate}: Prodigy finds its own step "
                          f"size and its authors advise --learning_rate 1.0.", stacklevel=2)
        if args.use_8bit_adam:
            warnings.warn("--use_8bit_adam is ignored with --optimizer prodigy.", stacklevel=2)
    if args.base_quantization != "none":
        require(torch.cuda.is_available(), f"--base_quantization {args.base_quantization} needs a CUDA GPU "
                "(bitsandbytes' quantised layers); drop it on this machine.")
    check_resolution(args.pretrained_model_name_or_path, args.resolution)
    check_writable_folder(args.output_dir, "--output_dir")


# ----------------------------------------------------------------------------------------------- derived values
@dataclass(frozen=True)
class RunConfig:
    """What a run derives from its flags before loading any model."""

    output_dir: Path                    # where this run writes (stage 2: <--output_dir>/<csv stem>)
    resume_dir: Path | None             # the checkpoint to resume from, None to start fresh
    extractor_dir: Path | None = None   # stage 2: the stage-1 LoRA (None for --extractor_mode base)
    settings: dict | None = None        # what a checkpoint of this run records (utils/checkpoint.run_settings)
    validation_prompt: str | None = None  # --validation_prompt with [v] filled in
    learned_token: object | None = None   # stage 2: stage 1's concept token (utils.concept_token.LearnedToken)


def report_check(run: RunConfig, items: list[dict]) -> RunConfig:
    """--check_only: one line saying that every check passed and what the run would do."""
    resume = f", resuming from {run.resume_dir.name}" if run.resume_dir else ""
    extractor = f", extractor {run.extractor_dir}" if run.extractor_dir else ""
    print(f"ok: inputs checked, no model loaded: {len(items)} training images -> {run.output_dir}{resume}{extractor}")
    return run


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps and epochs of a run, counted on the dataloader each process really iterates."""

    max_train_steps: int
    num_train_epochs: int
    batches_per_epoch: int  # per process, after accelerate shards the data
    updates_per_epoch: int  # optimizer steps per epoch: ceil(batches_per_epoch / gradient_accumulation_steps)


def batches_per_process(num_examples: int, batch_size: int, num_processes: int) -> int:
    """Batches each process iterates per epoch: accelerate splits ceil(N / batch) batches over the processes and
    pads the last round (even_batches), so every process sees ceil(batches / processes)."""
    return math.ceil(math.ceil(num_examples / batch_size) / num_processes)


def resolve_schedule(args, num_examples: int, num_processes: int) -> Schedule:
    """--max_train_steps (or --num_train_epochs) in optimizer steps, the diffusers convention, computed on the sharded
    dataloader: a 2-process run asked for N steps does N steps."""
    batches = batches_per_process(num_examples, args.train_batch_size, num_processes)
    updates = math.ceil(batches / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates
    return Schedule(max_train_steps=max_steps, num_train_epochs=math.ceil(max_steps / updates),
                    batches_per_epoch=batches, updates_per_epoch=updates)
