"""--validation_prompt: PNGs under <output>/validation and images in tensorboard, rendered from cached embeddings,
every --validation_epochs, through a scheduler of its own: training goes on after validation and ends with the
LoRA it would have reached without any."""

from __future__ import annotations

import pytest
import torch
from helpers import lora_tensors, stage1, stage2
from PIL import Image

VALIDATION = ["--validation_prompt", "a photo of sks robot toy in paris", "--validation_epochs", "1",
              "--num_validation_images", "2", "--validation_steps", "2"]
# 5 images in batches of 2: 3 batches an epoch; 7 steps run 3 epochs (3 + 3 + 1)
RUN = ["--train_batch_size", "2", "--random_flip", "--report_to", "tensorboard"]


def tensorboard_tags(folder) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events_dir in {p.parent for p in (folder / "logs").rglob("events.out.tfevents.*")}:
        events = EventAccumulator(str(events_dir))
        events.Reload()
        tags |= set(events.Tags()["images"]) | set(events.Tags()["scalars"])
    return tags


@pytest.mark.parametrize("stage", [1, 2])
def test_validation_every_epoch_leaves_training_unchanged(stage, tiny_sd35_path, extractors, tmp_path):
    def train(out, *extra):
        if stage == 1:
            return stage1(tiny_sd35_path, out, *RUN, *extra, "--learning_rate", "1e-3", steps=7), out
        result = stage2(tiny_sd35_path, out, *RUN, *extra, "--extractor_lora", extractors[0], steps=7)
        return result, out / "robot_toy"

    with_validation, out = train(tmp_path / "with", *VALIDATION)
    without_validation, plain_out = train(tmp_path / "without")
    assert [h["step"] for h in with_validation.history] == list(range(1, 8))
    names = sorted(p.name for p in (out / "validation").iterdir())
    # after each of the 3 epochs (steps 3, 6, 7), then the final render
    assert names == [f"{tag}-{step:06d}-{i}.png" for tag, step in
                     (("final", 7), ("validation", 3), ("validation", 6), ("validation", 7)) for i in (0, 1)]
    assert Image.open(out / "validation" / names[0]).size == (64, 64)
    assert {"validation", "final", "loss", "lr"} <= tensorboard_tags(out)
    a, b = lora_tensors(out), lora_tensors(plain_out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in with_validation.history] == [h["loss"] for h in without_validation.history]


def test_latents_decode_in_the_vaes_dtype(tiny_sd35_path):
    """Under FSDP's mixed precision the transformer returns bf16 latents while the VAE stays fp32 (accelerate's other
    wrappers return fp32): validation decodes them in the VAE's dtype, to the image the same values give in fp32."""
    import numpy as np
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from utils.outputs import decode_latents, pipeline_without_text_encoders

    vae = AutoencoderKL.from_pretrained(tiny_sd35_path, subfolder="vae")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd35_path, subfolder="scheduler")
    pipe = pipeline_without_text_encoders(None, vae, scheduler)
    latents = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    [from_bf16] = decode_latents(pipe, latents.bfloat16())
    [from_fp32] = decode_latents(pipe, latents.bfloat16().float())
    assert from_bf16.size == (16, 16) and np.array_equal(np.asarray(from_bf16), np.asarray(from_fp32))
