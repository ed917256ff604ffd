"""Training scaffolding shared by both stages: accelerator, model loading, optimizer, sampler, latent cache, the
optimisation loop with checkpoint/resume, validation images and the model card.

The per-step maths (what each stage actually optimises) stays in the stage scripts as a ``compute_loss`` function;
this module only runs it."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from .data import load_image
from .checkpoint import checkpoint_step, save_checkpoint
from .flow_matching import encode_latents, latents_from_distribution

logger = logging.getLogger("purecc")


# ----------------------------------------------------------------------------------------------- setup
def make_accelerator(args) -> Accelerator:
    logging_dir = Path(args.output_dir) / args.logging_dir
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    """Frozen weights follow --mixed_precision; trainable LoRA parameters stay fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def load_diffusion_parts(args, device, weight_dtype):
    """(noise scheduler with training sigmas, frozen VAE in fp32, frozen transformer in weight_dtype)."""
    common = dict(revision=args.revision, variant=args.variant)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(args.pretrained_model_name_or_path,
                                                                subfolder="scheduler", revision=args.revision)
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", **common)
    transformer = SD3Transformer2DModel.from_pretrained(args.pretrained_model_name_or_path,
                                                        subfolder="transformer", **common)
    for model in (vae, transformer):
        model.requires_grad_(False)
    vae.to(device, dtype=torch.float32)  # the SD3 VAE is unstable in fp16
    transformer.to(device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return scheduler, vae, transformer


def make_optimizer(args, param_groups):
    kwargs = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, min_8bit_size=args.adam_8bit_min_size, **kwargs)
    return torch.optim.AdamW(param_groups, **kwargs)


def resolve_schedule(args, batches_per_epoch: int) -> tuple[int, int]:
    """(max_train_steps, num_train_epochs) in optimizer steps, the diffusers convention."""
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    return max_steps, math.ceil(max_steps / updates_per_epoch)


def make_lr_scheduler(args, optimizer, num_processes: int):
    return get_scheduler(args.lr_scheduler, optimizer=optimizer,
                         num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes,
                         num_cycles=args.lr_num_cycles, power=args.lr_power)


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): a resumed run replays exactly the same order."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def make_dataloader(args, dataset, collate_fn):
    return torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, collate_fn=collate_fn,
                                       sampler=EpochShuffleSampler(len(dataset), args.seed),
                                       num_workers=args.dataloader_num_workers)


def transformer_velocity(transformer, x_t, timesteps, prompt_embeds, pooled) -> torch.Tensor:
    """One MM-DiT forward pass: the predicted velocity for a batch of noisy latents."""
    return transformer(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                       pooled_projections=pooled, return_dict=False)[0]


def step_generator(seed: int, micro_step: int, process_index: int) -> torch.Generator:
    """Noise and timesteps of batch ``micro_step`` depend on nothing else: resuming reproduces them exactly."""
    digest = hashlib.sha256(f"{seed}:{micro_step}:{process_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# ------------------------------------------------------------------------------------------ latents
class LatentCache:
    """VAE posterior parameters per *image* (``image_index``), never per step: a shuffled loader must pair each
    caption with its own image's latent. Sampled afresh each step from the cached distribution.

    Each image is encoded once in its canonical view (centre crop, no flip): augmentation cannot apply to a
    latent computed once, so we say so instead of silently freezing one random view."""

    def __init__(self, vae, dataset, device):
        if dataset.random_flip or not dataset.center_crop:
            logger.warning("--cache_latents: each image is encoded once, centre-cropped and unflipped; "
                           "--random_flip and random crops do not apply to cached latents.")
        self.vae_config = vae.config
        self.params = {}
        with torch.no_grad():
            for index, item in enumerate(dataset.items):
                pixels = load_image(item["image_path"], dataset.resolution, center_crop=True, flip=False, rng=None)
                self.params[index] = vae.encode(pixels.unsqueeze(0).to(device, vae.dtype)).latent_dist.parameters.cpu()

    def sample(self, image_indices, generator: torch.Generator, device) -> torch.Tensor:
        params = torch.cat([self.params[int(i)] for i in image_indices])
        return latents_from_distribution(params, self.vae_config, generator=generator).to(device)


def batch_latents(vae, batch, latent_cache, generator, device) -> torch.Tensor:
    if latent_cache is not None:
        return latent_cache.sample(batch["image_index"], generator, device)
    with torch.no_grad():
        return encode_latents(vae, batch["pixel_values"].to(device, vae.dtype), generator=generator)


# ---------------------------------------------------------------------------------------------- loop
def resume_if_asked(accelerator, resume_dir: Path | None) -> int:
    """Load a checkpoint's state; returns the optimizer step it was saved at (0 when starting fresh)."""
    if resume_dir is None:
        return 0
    accelerator.print(f"Resuming from {resume_dir}")
    accelerator.load_state(str(resume_dir))
    return checkpoint_step(resume_dir)


def train_loop(args, accelerator, model, optimizer, lr_scheduler, dataloader, dataset, compute_loss,
               params_to_clip, start_step: int = 0, on_epoch_end=None) -> tuple[int, list[dict]]:
    """Run optimizer steps ``start_step .. args.max_train_steps``.

    ``compute_loss(batch, generator) -> (loss, logs)`` is the stage's algorithm. Checkpoints every
    --checkpointing_steps through accelerate state (LoRA only). Returns (final global step, logs of each step)."""
    accum = args.gradient_accumulation_steps
    updates_per_epoch = math.ceil(len(dataloader) / accum)
    first_epoch = start_step // updates_per_epoch
    skip_batches = (start_step % updates_per_epoch) * accum
    global_step, micro_step = start_step, start_step * accum
    history = []
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    for epoch in range(first_epoch, args.num_train_epochs):
        model.train()
        dataset.set_epoch(epoch)
        dataloader.set_epoch(epoch)
        loader = dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch in loader:
            with accelerator.accumulate(model):
                generator = step_generator(args.seed, micro_step, accelerator.process_index)
                loss, logs = compute_loss(batch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params_to_clip, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            if accelerator.sync_gradients:
                global_step += 1
                logs = {**logs, "lr": lr_scheduler.get_last_lr()[0]}
                history.append({"step": global_step, **logs})
                progress.update(1)
                progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
                accelerator.log(logs, step=global_step)
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if global_step >= args.max_train_steps:
                break
        if on_epoch_end is not None:
            on_epoch_end(epoch, global_step)
        if global_step >= args.max_train_steps:
            break
    progress.close()
    return global_step, history


# ------------------------------------------------------------------------------------ images, card
def pipeline_without_text_encoders(transformer, vae, scheduler) -> StableDiffusion3Pipeline:
    """Inference pipeline over the training models; prompts come in as cached embeddings."""
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)


def render_images(pipe, prompt_cache, prompt: str, num_images: int, seed: int, resolution: int, steps: int,
                  guidance_scale: float = 7.0):
    device = pipe.transformer.device
    dtype = pipe.transformer.dtype
    embeds, pooled = prompt_cache.lookup([prompt], device, dtype)
    negative, negative_pooled = prompt_cache.lookup([""], device, dtype)
    images = []
    with torch.no_grad():
        for index in range(num_images):
            generator = torch.Generator(device="cpu").manual_seed(seed + index)
            images += pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                           negative_pooled_prompt_embeds=negative_pooled, height=resolution, width=resolution,
                           num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator).images
    return images


def log_validation(accelerator, pipe, prompt_cache, args, epoch_or_step: int, tag: str = "validation"):
    """Render --num_validation_images for --validation_prompt, save PNGs and send them to tensorboard."""
    import numpy as np

    images = render_images(pipe, prompt_cache, args.validation_prompt, args.num_validation_images, args.seed,
                           args.resolution, args.validation_steps)
    out_dir = Path(args.output_dir) / "validation"
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(out_dir / f"{tag}-{epoch_or_step:06d}-{index}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), epoch_or_step,
                                      dataformats="NHWC")
    return images


def write_model_card(out_dir, title: str, base_model: str, fields: dict, usage: str) -> None:
    lines = [f"# {title}", "", f"LoRA for `{base_model}` (SD3 transformer).", "", "| setting | value |",
             "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in fields.items()]
    lines += ["", "## Use", "", "```python", usage.strip(), "```", ""]
    (Path(out_dir) / "README.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- steps both stage scripts share
def encode_prompts_once(args, device, weight_dtype, prompts, keep_clip_trainable: bool = False):
    """Encode ``prompts`` + class/validation prompts + "" once, then free the text encoders (T5 always; CLIP unless
    it trains). Returns (PromptCache, text pipeline still holding any trainable CLIP encoders)."""
    from .prompts import PromptCache, free_text_encoders, load_text_pipeline, text_encoders

    text_pipe = load_text_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, weight_dtype)
    text_pipe.to(device)
    for encoder in text_encoders(text_pipe):
        encoder.requires_grad_(False)
    extra = [args.class_prompt or "", args.validation_prompt or ""]
    cache = PromptCache(text_pipe, list(prompts) + extra, device, args.max_sequence_length,
                        keep_clip_trainable=keep_clip_trainable)
    if keep_clip_trainable:
        text_pipe.text_encoder_3 = None
    else:
        free_text_encoders(text_pipe)
    return cache, text_pipe


def trainable_to_fp32(*models) -> list[torch.nn.Parameter]:
    """LoRA weights train in fp32 whatever --mixed_precision says; returns them."""
    params = [p for model in models for p in model.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    return params


def make_training_data(args, accelerator, items, class_items, vae):
    """(dataset, dataloader, latent cache or None); fixes --max_train_steps / --num_train_epochs from its length."""
    from .inputs import make_run_dataset

    dataset, collate_fn = make_run_dataset(args, items, class_items)
    latent_cache = LatentCache(vae, dataset, accelerator.device) if args.cache_latents else None
    dataloader = make_dataloader(args, dataset, collate_fn)
    args.max_train_steps, args.num_train_epochs = resolve_schedule(args, len(dataloader))
    return dataset, dataloader, latent_cache


def scaled_learning_rate(args, accelerator) -> float:
    scale = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    return args.learning_rate * (scale if args.scale_lr else 1)


def start_tracking(accelerator, args, project: str) -> None:
    if accelerator.is_main_process:
        accelerator.init_trackers(project, config={k: v for k, v in vars(args).items()
                                                   if isinstance(v, (int, float, str, bool))})


def make_validator(args, accelerator, transformer, vae, scheduler, prompt_cache):
    """``validate(epoch, step, final=False)``: images of --validation_prompt every --validation_epochs, and at the end."""

    def validate(epoch, step, final=False):
        due = final or (epoch + 1) % args.validation_epochs == 0
        if args.validation_prompt and accelerator.is_main_process and due:
            log_validation(accelerator, pipeline_without_text_encoders(transformer, vae, scheduler), prompt_cache,
                           args, step, tag="final" if final else "validation")

    return validate


def finish_run(args, accelerator, lora_parts, config_of, card_title: str, card_fields: dict, usage: str,
               validate, step: int) -> None:
    """Write the final LoRA (both formats) and model card, render final validation images, close trackers."""
    from .checkpoint import write_trainable_lora

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_trainable_lora(args.output_dir, lora_parts, config_of, args.pretrained_model_name_or_path)
        write_model_card(args.output_dir, card_title, args.pretrained_model_name_or_path, card_fields, usage)
        validate(args.num_train_epochs - 1, step, final=True)
        accelerator.print(f"LoRA saved to {args.output_dir}")
    accelerator.end_training()
