"""Prompt encoding: the one place that runs SD3's three text encoders.

Prompts are few and fixed per concept (docs/method.md section 5): every distinct prompt (plus "") is encoded once,
the embeddings are kept on the CPU and the text encoders are freed before the first training step. The encoders
visit the device one after the other: T5-XXL first, one block at a time, freed before CLIP-L and CLIP-G move in
together, so prompt encoding never holds more than the two CLIP encoders (~1.6 GB in bf16). With a trainable CLIP
(stage 1 ``--train_text_encoder``) the CLIP halves are recomputed every step with gradient and only the T5 half is
cached: T5 is never trained.

The maths is the pipeline's own ``encode_prompt`` (SD3 paper / diffusers): CLIP-L and CLIP-G penultimate states
concatenated on the feature axis, zero-padded to the T5 width, then concatenated with T5 on the sequence axis;
pooled = CLIP-L pooled ++ CLIP-G pooled. It is split here only so the T5 half can be cached on its own.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager

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


@contextmanager
def t5_blocks_visiting(t5, device):
    """T5-XXL on ``device`` one block at a time: its embedding and final norm (~0.3 GB) move there for the encoding,
    each of its 24 blocks (~0.4 GB each in bf16) just before it runs and back to the CPU after. The whole encoder,
    ~9 GB in bf16, would otherwise be the largest thing a run ever puts on the GPU (it set the process peak of a
    512 px run). Each block crosses to the device and back once (~9 GB each way in all, about a second over PCIe);
    the kernels and the numbers are the same."""
    def arrive(block, args):
        block.to(device)

    def leave(block, args, output):
        block.to("cpu")

    for part in (t5.shared, t5.encoder.embed_tokens, t5.encoder.final_layer_norm):
        part.to(device)
    handles = [hook for block in t5.encoder.block
               for hook in (block.register_forward_pre_hook(arrive), block.register_forward_hook(leave))]
    try:
        yield t5
    finally:
        for hook in handles:
            hook.remove()


def join_clip_t5(clip_embeds: torch.Tensor, t5_embeds: torch.Tensor) -> torch.Tensor:
    clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    return torch.cat([clip_embeds, t5_embeds], dim=-2)


def release(pipe, name: str) -> None:
    """Drop one text encoder and give its memory back (T5-XXL alone is ~9 GB in bf16). On the GPU the collector
    runs first so the cache can hand the blocks back; on the CPU dropping the reference frees the memory and a
    collection would only cost time (~0.4 s in a test process)."""
    setattr(pipe, name, None)
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


class PromptCache:
    """Embeddings of a fixed set of prompts: ``full[prompt] = (prompt_embeds [L, D], pooled [P])`` on the CPU, or,
    when CLIP trains (``clip_pipe`` given), only ``t5[prompt]``, with :meth:`lookup` recomputing the CLIP half
    through the trainable encoders every step."""

    def __init__(self, full: dict | None = None, t5: dict | None = None, clip_pipe=None):
        self.full, self.t5, self.clip_pipe = full or {}, t5 or {}, clip_pipe

    def __contains__(self, prompt: str) -> bool:
        return prompt in (self.full or self.t5)

    def lookup(self, prompts: list[str], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (prompt_embeds [B, L, D], pooled [B, P]) for a batch of prompts, in order."""
        missing = [p for p in prompts if p not in self]
        if missing:
            raise KeyError(f"prompt(s) not encoded before training: {missing[:3]}")
        if self.clip_pipe is None:
            embeds = torch.stack([self.full[p][0] for p in prompts])
            pooled = torch.stack([self.full[p][1] for p in prompts])
            return embeds.to(device, dtype), pooled.to(device, dtype)
        clip, pooled = encode_clip(self.clip_pipe, prompts, device)
        t5 = torch.stack([self.t5[p] for p in prompts]).to(device, clip.dtype)
        return join_clip_t5(clip, t5).to(dtype), pooled.to(dtype)


class PromptEncoder:
    """Encodes a run's fixed prompt set with the encoders visiting the device one at a time: T5 once for every
    prompt (then freed), then CLIP-L/G for whichever caches are asked for, optionally with CLIP LoRAs added (the
    stage-1 extractor's), then ``close()`` frees CLIP too unless it trains. ``encode_device`` (--text_encoder_device)
    is where the frozen encoders run; CLIP that trains runs on the training ``device``."""

    def __init__(self, pipe, prompts, device, max_sequence_length: int, encode_device=None):
        self.pipe, self.device = pipe, device
        self.encode_device = torch.device(encode_device) if encode_device else device
        self.prompts = sorted(set(prompts) | {""})
        with torch.no_grad(), t5_blocks_visiting(pipe.text_encoder_3, self.encode_device):
            t5 = encode_t5(pipe, self.prompts, self.encode_device, max_sequence_length).cpu()
        release(pipe, "text_encoder_3")
        self.t5 = {p: t5[i] for i, p in enumerate(self.prompts)}

    def cache(self, prompts=None) -> PromptCache:
        """Fixed embeddings of ``prompts`` (default: every prompt) with the CLIP encoders as they are now."""
        prompts = sorted(set(prompts or self.prompts) | {""})
        self.pipe.text_encoder.to(self.encode_device)
        self.pipe.text_encoder_2.to(self.encode_device)
        with torch.no_grad():
            clip, pooled = encode_clip(self.pipe, prompts, self.encode_device)
        embeds = join_clip_t5(clip.cpu(), torch.stack([self.t5[p] for p in prompts]))
        return PromptCache(full={p: (embeds[i], pooled[i].cpu()) for i, p in enumerate(prompts)})

    def trainable_cache(self) -> PromptCache:
        """T5 halves cached, CLIP recomputed through the (trainable) encoders, on the training device, at every
        lookup."""
        self.pipe.text_encoder.to(self.device)
        self.pipe.text_encoder_2.to(self.device)
        return PromptCache(t5=self.t5, clip_pipe=self.pipe)

    def close(self) -> None:
        release(self.pipe, "text_encoder")
        release(self.pipe, "text_encoder_2")


def run_prompts(args, run, prompts) -> list[str]:
    """A run's prompts plus its class and validation prompts (each encoded once with the rest)."""
    return list(prompts) + [args.class_prompt or "", run.validation_prompt or ""]
