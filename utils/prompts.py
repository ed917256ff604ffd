"""Prompt encoding: the one place that runs SD3's three text encoders.

Prompts are few and fixed per concept (docs/method.md section 5): every distinct prompt (plus "") is encoded once,
the embeddings are kept on the CPU and the text encoders are freed before the first training step. The encoders
visit the device one at a time (T5-XXL first, then CLIP-L, CLIP-G), each freed before the next moves in, so prompt
encoding never holds more than the largest of them. With a trainable CLIP (stage 1 ``--train_text_encoder``) the
CLIP halves are recomputed every step with gradient and only the T5 half is cached: T5 is never trained.

The maths is the pipeline's own ``encode_prompt`` (SD3 paper / diffusers): CLIP-L and CLIP-G penultimate states
concatenated on the feature axis, zero-padded to the T5 width, then concatenated with T5 on the sequence axis;
pooled = CLIP-L pooled ++ CLIP-G pooled. It is split here only so the T5 half can be cached on its own.
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline


def load_text_pipeline(model_path: str, revision=None, variant=None, dtype=torch.float32) -> StableDiffusion3Pipeline:
    """SD3 pipeline holding only tokenizers and text encoders (no transformer, no VAE), on the CPU."""
    pipe = StableDiffusion3Pipeline.from_pretrained(model_path, transformer=None, vae=None, revision=revision,
                                                    variant=variant, dtype=dtype)
    for encoder in text_encoders(pipe):
        encoder.requires_grad_(False)
    return pipe


def text_encoders(pipe) -> list:
    return [enc for enc in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if enc is not None]


def encode_clip(pipe, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP-L ++ CLIP-G hidden states [B, 77, dl+dg], pooled [B, pl+pg]); differentiable if the encoders train.
    Both CLIP encoders must already be on ``device``."""
    clip_l, pooled_l = pipe._get_clip_prompt_embeds(prompt=prompts, device=device, clip_model_index=0)
    clip_g, pooled_g = pipe._get_clip_prompt_embeds(prompt=prompts, device=device, clip_model_index=1)
    return torch.cat([clip_l, clip_g], dim=-1), torch.cat([pooled_l, pooled_g], dim=-1)


def encode_t5(pipe, prompts: list[str], device, max_sequence_length: int) -> torch.Tensor:
    return pipe._get_t5_prompt_embeds(prompt=prompts, max_sequence_length=max_sequence_length, device=device)


def join_clip_t5(clip_embeds: torch.Tensor, t5_embeds: torch.Tensor) -> torch.Tensor:
    clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    return torch.cat([clip_embeds, t5_embeds], dim=-2)


def release(pipe, name: str) -> None:
    """Drop one text encoder and give its memory back (T5-XXL alone is ~9 GB in bf16)."""
    setattr(pipe, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PromptCache:
    """Embeddings of a fixed set of prompts, computed once with the encoders of ``pipe``.

    ``full[prompt] = (prompt_embeds [L, D], pooled [P])`` on the CPU; with ``keep_clip_trainable`` only
    ``t5[prompt]`` is cached and :meth:`lookup` recomputes the CLIP half with the (trainable) encoders, which stay
    on the device. Every other encoder is freed once used: the pipeline is spent afterwards."""

    def __init__(self, pipe, prompts, device, max_sequence_length: int, keep_clip_trainable: bool = False):
        self.pipe = pipe if keep_clip_trainable else None
        self.device = device
        self.full, self.t5 = {}, {}
        unique = sorted(set(prompts) | {""})
        with torch.no_grad():
            pipe.text_encoder_3.to(device)
            t5 = encode_t5(pipe, unique, device, max_sequence_length).cpu()
            release(pipe, "text_encoder_3")
            pipe.text_encoder.to(device)
            pipe.text_encoder_2.to(device)
            if keep_clip_trainable:
                self.t5 = {p: t5[i] for i, p in enumerate(unique)}
                return
            clip, pooled = encode_clip(pipe, unique, device)
        release(pipe, "text_encoder")
        release(pipe, "text_encoder_2")
        embeds = join_clip_t5(clip.cpu(), t5)
        self.full = {p: (embeds[i], pooled[i].cpu()) for i, p in enumerate(unique)}

    def __contains__(self, prompt: str) -> bool:
        return prompt in (self.full or self.t5)

    def lookup(self, prompts: list[str], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (prompt_embeds [B, L, D], pooled [B, P]) for a batch of prompts, in order."""
        missing = [p for p in prompts if p not in self]
        if missing:
            raise KeyError(f"prompt(s) not encoded before training: {missing[:3]}")
        if self.pipe is None:
            embeds = torch.stack([self.full[p][0] for p in prompts])
            pooled = torch.stack([self.full[p][1] for p in prompts])
            return embeds.to(device, dtype), pooled.to(device, dtype)
        clip, pooled = encode_clip(self.pipe, prompts, device)
        t5 = torch.stack([self.t5[p] for p in prompts]).to(device, clip.dtype)
        return join_clip_t5(clip, t5).to(dtype), pooled.to(dtype)


def encode_prompts_once(args, device, weight_dtype, prompts, keep_clip_trainable: bool = False):
    """Encode ``prompts`` + the class/validation prompts + "" once. Returns (PromptCache, text pipeline); the
    pipeline still holds the CLIP encoders when they train, and nothing else."""
    text_pipe = load_text_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, weight_dtype)
    extra = [args.class_prompt or "", args.validation_prompt or ""]
    cache = PromptCache(text_pipe, list(prompts) + extra, device, args.max_sequence_length,
                        keep_clip_trainable=keep_clip_trainable)
    return cache, text_pipe
