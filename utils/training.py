"""Training scaffolding shared by both stages: accelerator, model loading, optimizer and schedule, and the
optimisation loop with checkpoints and exact resume.

What each stage optimises stays in its script as a ``step(batch, generator) -> (loss, logs)`` function (stage 2's
reads like the paper's Algorithm 1); this module only runs it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, BitsAndBytesConfig, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from .args import RunConfig, Schedule, resolve_schedule
from .checkpoint import checkpoint_step, clear_output_folder, register_state_hooks, save_checkpoint
from .checks import BadInput, RunFailed
from .dataset import make_training_data
from .lean_backward import inputs_left_to_autocast, int8_layers_keep_no_input, rms_norms_keep_only_input
from .lora import tuner_layers

logger = logging.getLogger("purecc")


# ----------------------------------------------------------------------------------------------- setup
def start_run(args, run: RunConfig, trains_text: bool = False) -> Accelerator:
    """The accelerator of a run whose inputs all checked out; under --overwrite_output_dir the main process first
    clears the run's folder. ``trains_text``: the run trains CLIP LoRAs or a concept token, which live outside the
    prepared transformer (DeepSpeed and FSDP cannot train them)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        check_fsdp_launch(args, trains_text)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(run.output_dir),
                                            logging_dir=str(run.output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise RunFailed(f"accelerate started {launched} processes but they are not connected (each sees "
                        f"{accelerator.num_processes}): on a machine without GPUs, launch with ACCELERATE_USE_CPU=1 "
                        f"accelerate launch --multi_gpu --num_processes {launched} ... (--cpu alone starts one "
                        f"process). Nothing was written.")
    if trains_text and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise BadInput(text_training_refused("DeepSpeed"))
    if args.overwrite_output_dir and accelerator.is_main_process:
        clear_output_folder(run.output_dir)
    accelerator.wait_for_everyone()
    return accelerator


def check_fsdp_launch(args, trains_text: bool) -> None:
    """FSDP as configs/fsdp.yaml sets it up: FSDP2 (per-parameter sharding, which keeps the frozen base and the
    trainable LoRA of one block in one unit), a base that can be sharded, no --compile, and every trainable
    parameter inside the transformer (accelerate's FSDP2 must find each optimizer parameter in the model it
    shards)."""
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise BadInput(f"FSDP version {version} is not supported: use FSDP2 (fsdp_version: 2, as in "
                       f"configs/fsdp.yaml), which shards frozen and trainable parameters of one block together. "
                       f"Nothing was written.")
    if args.base_quantization != "none":
        raise BadInput("--base_quantization cannot be combined with FSDP (quantised weights cannot be sharded): "
                       "drop one of them. Nothing was written.")
    if trains_text:
        raise BadInput(text_training_refused("FSDP"))
    if args.compile:
        raise BadInput("--compile is not supported under FSDP here: drop --compile, or launch with "
                       "configs/single_gpu.yaml or configs/multi_gpu.yaml. Nothing was written.")


def text_training_refused(engine: str) -> str:
    return (f"--train_text_encoder and --new_concept_token train parts of the text encoders, which {engine} does not "
            f"manage here (it wraps the transformer alone): use the DDP config (configs/multi_gpu.yaml), or train "
            f"stage 1 without them. Nothing was written.")


def weight_dtype_of(accelerator) -> torch.dtype:
    """Frozen weights follow --mixed_precision; trainable LoRA parameters stay fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def load_diffusion_parts(args, device, weight_dtype):
    """(noise scheduler with training sigmas, frozen VAE in fp32, frozen transformer in weight_dtype, or quantised
    with --base_quantization)."""
    common = dict(revision=args.revision, variant=args.variant)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(args.pretrained_model_name_or_path,
                                                                subfolder="scheduler", revision=args.revision)
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", **common)
    if args.base_quantization == "none":
        transformer = SD3Transformer2DModel.from_pretrained(args.pretrained_model_name_or_path,
                                                            subfolder="transformer", **common)
        transformer.to(device, dtype=weight_dtype)
    else:  # QLoRA: the frozen weights in 4 or 8 bits on the GPU, computing in weight_dtype
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=weight_dtype) \
            if args.base_quantization == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
        transformer = SD3Transformer2DModel.from_pretrained(args.pretrained_model_name_or_path,
                                                            subfolder="transformer", quantization_config=quantization,
                                                            dtype=weight_dtype, device_map={"": device}, **common)
    for model in (vae, transformer):
        model.requires_grad_(False)
    if args.base_quantization == "int8":
        int8_layers_keep_no_input(transformer)
    rms_norms_keep_only_input(transformer)
    vae.to(device, dtype=torch.float32)  # the SD3 VAE is unstable in fp16
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return scheduler, vae, transformer


def trainable_to_fp32(*models) -> list[torch.nn.Parameter]:
    """LoRA weights train in fp32 whatever --mixed_precision says; returns them."""
    params = [p for model in models for p in model.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    return params


def scaled_learning_rate(args, accelerator) -> float:
    scale = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    return args.learning_rate * (scale if args.scale_lr else 1)


def make_optimizer(args, param_groups):
    """AdamW (bitsandbytes' 8-bit AdamW with --use_8bit_adam) or Prodigy (--optimizer prodigy), the diffusers
    script's choices and flags."""
    kwargs = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.optimizer == "prodigy":
        import prodigyopt  # optional: only when asked for

        return prodigyopt.Prodigy(param_groups, beta3=args.prodigy_beta3, decouple=args.prodigy_decouple,
                                  use_bias_correction=args.prodigy_use_bias_correction,
                                  safeguard_warmup=args.prodigy_safeguard_warmup, **kwargs)
    if args.use_8bit_adam:
        import bitsandbytes as bnb  # optional and slow to import: only when asked for

        return bnb.optim.AdamW8bit(param_groups, min_8bit_size=args.adam_8bit_min_size, **kwargs)
    # fused: one kernel for the whole update instead of a dozen per parameter tensor (same maths)
    return torch.optim.AdamW(param_groups, fused=True, **kwargs)


def make_lr_scheduler(args, optimizer, schedule: Schedule, num_processes: int):
    # accelerate steps a prepared scheduler once per process per optimizer step: scale the horizon to match
    return get_scheduler(args.lr_scheduler, optimizer=optimizer,
                         num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=schedule.max_train_steps * num_processes,
                         num_cycles=args.lr_num_cycles, power=args.lr_power)


def transformer_velocity(transformer, x_t, timesteps, prompt_embeds, pooled) -> torch.Tensor:
    """One MM-DiT forward pass: the predicted velocity for a batch of noisy latents."""
    return transformer(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                       pooled_projections=pooled, return_dict=False)[0]


def compile_regions(transformer, backend: str) -> None:
    """Regional compilation (what diffusers recommends): each transformer block compiled in place. The blocks share
    their code, so a handful of graphs serve all of them: one per block kind (dual attention or not, the last) and
    per adapter setting a step uses (stage 2: extractor, trainable, frozen base), compiled once and reused. The
    small modules around the blocks (timestep + pooled-text embedding, patch embedding, text projection, output norm
    and projection) are many ops each, so they are compiled too, each on its own."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in transformer.transformer_blocks:
        block.compile(backend=backend)
    for name in ("time_text_embed", "pos_embed", "context_embedder", "norm_out", "proj_out"):
        getattr(transformer, name).compile(backend=backend)


def compiled_if(args, fn):
    """``fn`` torch.compile'd with --compile_backend under --compile, else ``fn`` itself: for a stage's loss maths,
    dozens of small elementwise ops and reductions over the latents, forward and backward, become one graph each."""
    return torch.compile(fn, backend=args.compile_backend) if args.compile else fn


def compile_vae_encoder(vae, backend: str) -> None:
    """The frozen VAE encodes every step's images (without --cache_latents): its down blocks, the resnets of its
    middle block and its output norm are compiled, each on its own, like the transformer's regions. The middle
    block's attention stays eager: compiled with the aot_eager backend it fails on a batch of one ("Expected
    X.is_contiguous(memory_format)", torch 2.13 on the CPU)."""
    encoder = vae.encoder
    for module in (*encoder.down_blocks, *encoder.mid_block.resnets, encoder.conv_norm_out):
        module.compile(backend=backend)


def predict(model, prompt_cache, groups, dtype) -> list[torch.Tensor]:
    """One forward pass over several groups of (Noised, prompts): the predicted velocities, split back per group.
    Branches that share x_t and t (a prompt and its base prompt) or ride along (class images) cost one pass."""
    x_t = torch.cat([noised.x_t for noised, _ in groups])
    embeds, pooled = prompt_cache.lookup([p for _, prompts in groups for p in prompts], x_t.device, dtype)
    pred = transformer_velocity(model, x_t, torch.cat([noised.timesteps for noised, _ in groups]), embeds, pooled)
    return list(pred.split([len(prompts) for _, prompts in groups]))


@dataclass
class Trainer:
    """Everything the loop needs once models are built: prepared objects, the schedule and the resume point."""

    args: object
    run: RunConfig
    accelerator: Accelerator
    model: torch.nn.Module  # the prepared (possibly DDP-wrapped) transformer: every forward pass goes through it
    optimizer: object
    lr_scheduler: object
    dataset: object
    dataloader: object
    latent_cache: object
    schedule: Schedule
    params: list          # every trainable parameter (for clipping)
    outside_params: list  # those outside the prepared transformer (CLIP LoRAs, the concept token), synced by hand
    start_step: int


def prepare_training(args, run: RunConfig, accelerator, trained, param_groups: list, items, class_items, vae,
                     tracker_name: str) -> Trainer:
    """Data, optimizer, schedule and LR schedule, the LoRA layers' inputs left to autocast, ``--compile``,
    ``accelerator.prepare``, the checkpoint hooks (only what the run trains, ``trained``:
    utils.outputs.TrainedWeights), the resume and the trackers: the setup both stages share between building their
    models and their first step.

    Only the transformer is prepared (wrapped for DDP): the text side (CLIP LoRAs, the concept token) runs inside
    the pipeline's own encoders, so its few gradients are averaged over processes by hand (``sync_outside_grads``)."""
    dataset, dataloader, latent_cache = make_training_data(args, accelerator, items, class_items, vae)
    schedule = resolve_schedule(args, len(dataset), accelerator.num_processes)
    optimizer = make_optimizer(args, param_groups)
    lr_scheduler = make_lr_scheduler(args, optimizer, schedule, accelerator.num_processes)
    transformer = trained.lora_parts["transformer"][0]
    inputs_left_to_autocast(tuner_layers(transformer))  # every adapter of the run is on the transformer by now
    if args.compile:
        compile_regions(transformer, args.compile_backend)
        compile_vae_encoder(vae, args.compile_backend)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(transformer, optimizer, dataloader, lr_scheduler)
    if len(dataloader) != schedule.batches_per_epoch:
        raise RuntimeError(f"accelerate gave each process {len(dataloader)} batches per epoch, the schedule expected "
                           f"{schedule.batches_per_epoch}: please report this with your accelerate config.")
    register_state_hooks(accelerator, trained)
    start_step = 0
    if run.resume_dir is not None:
        accelerator.print(f"Resuming from {run.resume_dir}")
        accelerator.load_state(str(run.resume_dir))
        start_step = checkpoint_step(run.resume_dir)
    if accelerator.is_main_process:
        accelerator.init_trackers(tracker_name, config={k: v for k, v in vars(args).items()
                                                        if isinstance(v, (int, float, str, bool))})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    inside = {id(p) for p in transformer.parameters()}
    outside = [p for p in params if id(p) not in inside]
    return Trainer(args, run, accelerator, model, optimizer, lr_scheduler, dataset, dataloader, latent_cache,
                   schedule, params, outside, start_step)


# ---------------------------------------------------------------------------------------------- loop
def step_generator(seed: int, epoch: int, global_batch: int) -> torch.Generator:
    """Noise and timesteps of one batch depend on (seed, epoch, the batch's index in the epoch's global order)
    alone: a resumed run reproduces them exactly whatever the accumulation, batch size or dataset length, and N
    processes draw for a batch what one process accumulating N batches draws for it."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{global_batch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def all_finite(accelerator, values) -> bool:
    """True when every value is finite on every process (one tiny all-reduce under DDP, so all ranks stop together)."""
    finite = torch.tensor(float(all(math.isfinite(v) for v in values)), device=accelerator.device)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes
    return finite.item() == 1.0


def params_finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def sync_outside_grads(trainer: Trainer) -> None:
    """Average the gradients of the parameters DDP does not see (CLIP LoRAs, the concept token) over processes,
    as DDP does for the transformer's."""
    if trainer.accelerator.num_processes == 1:
        return
    for param in trainer.outside_params:
        if param.grad is None:  # every process must join every all-reduce
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad)
        param.grad /= trainer.accelerator.num_processes


def accumulate_batch(trainer: Trainer, step_fn, batch: dict, generator, step: int) -> dict:
    """One batch: the stage's loss, the non-finite check, backward, and (when accelerate says the accumulated
    gradient is complete) clipping and the optimizer and LR steps. Returns the step's logs."""
    accelerator = trainer.accelerator
    with accelerator.accumulate(trainer.model):
        loss, logs = step_fn(batch, generator)
        if not all_finite(accelerator, logs.values()):
            raise RunFailed(non_finite_message(step, logs, batch, trainer.run.output_dir))
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            sync_outside_grads(trainer)
        if accelerator.sync_gradients and trainer.args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainer.params, trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return logs


def train_loop(trainer: Trainer, step_fn, on_epoch_end=None) -> tuple[int, list[dict]]:
    """Optimizer steps ``trainer.start_step .. schedule.max_train_steps``; returns (final step, logs of each step).

    ``step_fn(batch, generator) -> (loss, logs)`` is the stage's algorithm. A non-finite loss (or LoRA weights that
    became non-finite) stops the run with ``RunFailed`` before anything more is written. Checkpoints every
    --checkpointing_steps through accelerate state (LoRA only)."""
    args, accelerator, schedule = trainer.args, trainer.accelerator, trainer.schedule
    accum = args.gradient_accumulation_steps
    first_epoch, step_in_epoch = divmod(trainer.start_step, schedule.updates_per_epoch)
    skip_batches = step_in_epoch * accum
    global_step, history = trainer.start_step, []
    progress = tqdm(range(schedule.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    try:  # the bar is closed (its line ended) however the loop ends, so an error line starts on a line of its own
        for epoch in range(first_epoch, schedule.num_train_epochs):
            if global_step >= schedule.max_train_steps:
                break
            trainer.model.train()
            trainer.dataset.set_epoch(epoch)
            trainer.dataloader.set_epoch(epoch)
            skip = skip_batches if epoch == first_epoch else 0
            loader = accelerator.skip_first_batches(trainer.dataloader, skip) if skip else trainer.dataloader
            for batch_index, batch in enumerate(loader, start=skip):
                # accelerate deals the epoch's batches round-robin: local batch b of process p is global b * N + p
                global_batch = batch_index * accelerator.num_processes + accelerator.process_index
                generator = step_generator(args.seed, epoch, global_batch)
                logs = accumulate_batch(trainer, step_fn, batch, generator, global_step + 1)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                logs = {**logs, "lr": trainer.lr_scheduler.get_last_lr()[0]}
                history.append({"step": global_step, **logs})
                progress.update(1)
                progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
                accelerator.log(logs, step=global_step)
                if global_step % args.checkpointing_steps == 0:
                    require_finite_weights(trainer, global_step)
                    save_checkpoint(accelerator, trainer.run, global_step, args.checkpoints_total_limit)
                if global_step >= schedule.max_train_steps:
                    break
            if on_epoch_end is not None:
                on_epoch_end(epoch, global_step)
    finally:
        progress.close()
    require_finite_weights(trainer, global_step)
    return global_step, history


def require_finite_weights(trainer: Trainer, step: int) -> None:
    if not params_finite(trainer.params):
        raise RunFailed(f"the trainable LoRA weights are not finite after step {step} (the optimizer diverged); "
                        f"nothing was written for this step. Lower --learning_rate or resume from an earlier "
                        f"checkpoint in {trainer.run.output_dir}.")


def non_finite_message(step: int, logs: dict, batch: dict, output_dir: Path) -> str:
    terms = ", ".join(f"{key}={value:.6g}" for key, value in logs.items())
    images = ", ".join(batch.get("image_path", [])) or "?"
    return (f"non-finite loss at step {step} ({terms}); batch images: {images}. Training stopped before this step "
            f"updated the LoRA: the last complete checkpoint and any earlier final LoRA in {output_dir} are "
            f"untouched. Lower --learning_rate, check --eta and the lambda flags, or resume from a checkpoint.")
