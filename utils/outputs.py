"""What a training run writes besides checkpoints: validation images, the final LoRA and its model card.

Validation renders through its own copy of the noise scheduler: an inference pipeline sets the scheduler's
timesteps, and the training scheduler must keep its training schedule (utils.flow_matching.sample_timesteps). It
also draws only from its own generators, so training with validation gives the same LoRA as training without.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from .args import RunConfig
from .checkpoint import write_settings
from .concept_token import (ConceptEmbedding, LearnedToken, learned_token, read_learned_token, restore_rows,
                            save_learned_token)
from .lora import load_trainable_lora, write_trainable_lora


@dataclass
class TrainedWeights:
    """What a run trains and writes into its output folder and every checkpoint: the LoRA adapters (both formats)
    and, when there is one, the concept token (stage 1 trains it; stage 2 copies stage 1's, so that its output
    folder alone is enough for inference)."""

    lora_parts: dict                             # component -> (model, adapter name)
    base_model: str
    token_modules: list[ConceptEmbedding] = field(default_factory=list)  # stage 1 --new_concept_token
    token: tuple[str, str] | None = None         # (token, initializer) of token_modules
    copied_token: LearnedToken | None = None     # stage 2: the extractor's learned token

    def write(self, folder, writer: bool = True) -> None:
        """Every process calls it (under FSDP the LoRA is gathered from its shards); only the ``writer`` writes."""
        write_trainable_lora(folder, self.lora_parts, self.base_model, writer=writer)
        if not writer:
            return
        if self.token_modules:
            save_learned_token(folder, learned_token(*self.token, self.token_modules))
        elif self.copied_token is not None:
            save_learned_token(folder, self.copied_token)

    def restore(self, folder, lora_too: bool = True) -> None:
        if lora_too:
            load_trainable_lora(folder, self.lora_parts)
        if self.token_modules:
            restore_rows(self.token_modules, read_learned_token(folder))


def pipeline_without_text_encoders(transformer, vae, noise_scheduler) -> StableDiffusion3Pipeline:
    """Inference pipeline over the training models, with a scheduler of its own; prompts come in as cached
    embeddings."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
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
            latents = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                           negative_pooled_prompt_embeds=negative_pooled, height=resolution, width=resolution,
                           num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                           output_type="latent").images
            images += decode_latents(pipe, latents)
    return images


@torch.no_grad()
def decode_latents(pipe, latents) -> list:
    """PIL images of the pipeline's latents, decoded in the VAE's own dtype: the latents come out in the dtype of
    the transformer's output, which is bf16 under FSDP's mixed precision (accelerate's other wrappers return fp32),
    and the VAE stays fp32."""
    vae = pipe.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return pipe.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")


def log_validation(accelerator, pipe, prompt_cache, args, run: RunConfig, step: int, tag: str = "validation"):
    """Render --num_validation_images for --validation_prompt, save PNGs and send them to tensorboard."""
    images = render_images(pipe, prompt_cache, run.validation_prompt, args.num_validation_images, args.seed,
                           args.resolution, args.validation_steps)
    if not accelerator.is_main_process:
        return images
    out_dir = run.output_dir / "validation"
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(out_dir / f"{tag}-{step:06d}-{index}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
    return images


def make_validator(args, run: RunConfig, accelerator, transformer, vae, noise_scheduler, prompt_cache):
    """``validate(epoch, step, final=False)``: images of --validation_prompt every --validation_epochs, and at the end."""

    # Under FSDP every process holds a shard of the transformer, so every process runs the sampling (each forward
    # gathers the weights); elsewhere the main process alone renders. The main process alone writes.
    renders = accelerator.is_main_process or accelerator.distributed_type == DistributedType.FSDP

    def validate(epoch, step, final=False):
        due = final or (epoch + 1) % args.validation_epochs == 0
        if run.validation_prompt and renders and due:
            pipe = pipeline_without_text_encoders(transformer, vae, noise_scheduler)
            log_validation(accelerator, pipe, prompt_cache, args, run, step, tag="final" if final else "validation")

    return validate


def write_model_card(out_dir, title: str, base_model: str, fields: dict, usage: str) -> None:
    lines = [f"# {title}", "", f"LoRA for `{base_model}` (SD3 transformer).", "", "| setting | value |",
             "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in fields.items()]
    lines += ["", "## Use", "", "```python", usage.strip(), "```", ""]
    (Path(out_dir) / "README.md").write_text("\n".join(lines))


def finish_run(run: RunConfig, accelerator, model, weights: TrainedWeights, card_title: str, card_fields: dict,
               usage: str, validate, step: int, last_epoch: int) -> None:
    """Write the final LoRA (both formats, + the concept token) and model card, render final validation images,
    close trackers."""
    accelerator.wait_for_everyone()
    weights.write(run.output_dir, writer=accelerator.is_main_process)
    if accelerator.is_main_process:
        write_settings(run.output_dir, run)
        write_model_card(run.output_dir, card_title, weights.base_model, card_fields, usage)
    validate(last_epoch, step, final=True)
    accelerator.print(f"LoRA saved to {run.output_dir}")
    accelerator.end_training()
