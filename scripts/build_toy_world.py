"""Pretrain the toy world's text-to-image model from a seed and write it as a StableDiffusion3Pipeline folder.

    OMP_NUM_THREADS=1 python scripts/build_toy_world.py                  # CPU: 84-90 minutes on two cores
    python scripts/build_toy_world.py --device cuda                      # GPU: minutes
    python scripts/build_toy_world.py --evaluate_only                    # re-measure the committed world
    OMP_NUM_THREADS=1 python scripts/build_toy_world.py --vae_only       # retrain the VAE only: ~40 minutes

The first command, run twice on this project's 2-core CPU, wrote bitwise the committed world (every weight file
and config, and the same gate report) in 83.9 minutes (90.0 when the box was shared): the VAE's first phase 16.4
min, then the transformer (12,000 steps, 66 min) with the VAE's decoder phase (22 min) beside it in a second
process, then the gates (1.1 min). Each process uses one thread. ``--time_budget_s`` cuts the transformer's steps
to fit a slower machine (the world then differs from the committed one); ``--no_decoder_in_parallel`` runs the
phases one after the other (the same phase times add up to ~113 minutes; not run end to end).

What it builds (docs/evidence.md): the world of ``utils/toy_world.py`` (32x32 images, captions naming background,
object colour, shape and position), seen through

1. the project's tiny CLIP-L / CLIP-G / T5 text encoders (``utils/tiny_sd3.py``, variant sd35, seed 0), frozen,
   with prompts padded to 16 tokens for CLIP and for T5 (``--max_sequence_length 16`` in every script that runs
   the world: captions have at most 12 tokens, and a short joint attention makes the world fast);
2. a VAE (``AutoencoderKL``, 16 latent channels, downsampling 2) trained on world images and random striped /
   chequered textures of any colour, so that it is a general codec and not one fitted to the concept; then grown
   to two resnets per block (the new ones start as the identity) and its decoder trained alone, the encoder (and
   so the latent space) frozen;
3. an ``SD3Transformer2DModel`` with SD3.5 features (patch 2, MMDiT-X dual attention in the first half of the
   blocks, RMS qk-norm) trained with rectified flow on the 600 world scenes and their randomly shortened
   captions (10% empty), EMA weights kept, with the scheduler's shift 3 (SD3's own value, ``--shift``).

Then it measures the quality gates with the exact evaluators on ``--eval_samples`` fixed-seed samples of full
captions, through the saved folder and the stock pipeline, and writes ``build_report.json`` beside the model:
background and position >= 90%, object colour and shape >= 80%, and the VAE round trip of the concept images
keeping concept fidelity >= 0.9. The concept itself (``sks_toy.csv`` + images) is written next to the model; the
pretraining never sees it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import random
import shutil
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import utils  # noqa: E402,F401  before diffusers: utils/quiet.py silences known-harmless library messages
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,  # noqa: E402
                       StableDiffusion3Pipeline)
from utils import toy_world as world  # noqa: E402
from utils.flow_matching import noisy_latents, sample_timesteps, velocity_target  # noqa: E402
from utils.tiny_sd3 import write_model_index, write_text_encoders  # noqa: E402

TEXT_LENGTH = 16  # CLIP and T5 tokens: captions have at most 12; short sequences keep the joint attention cheap
LATENT_CHANNELS = 16  # as SD3: overcomplete at this downsampling, so the codec is sharp after minutes of training
GATES = {"background": 0.90, "position": 0.90, "color": 0.80, "shape": 0.80}
VAE_FIDELITY_GATE = 0.9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=str(REPO_ROOT / "data" / "toy_world"),
                   help="Writes <dir>/model (the pipeline), <dir>/sks_toy.csv + sks_toy/ and <dir>/build_report.json.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core box).")
    p.add_argument("--vae_steps", type=int, default=3000)
    p.add_argument("--vae_batch_size", type=int, default=16)
    p.add_argument("--vae_width", type=int, default=32, help="Channels of both VAE blocks (encoder and decoder).")
    p.add_argument("--vae_layers_per_block", type=int, default=1, help="Resnets per VAE block in the first phase.")
    p.add_argument("--decoder_layers_per_block", type=int, default=2,
                   help="Before the decoder phase the VAE grows to this many resnets per block, each new one "
                        "starting as the identity: the decoder gains capacity, the encoder's latents stay bitwise "
                        "the same. Measured (concept fidelity after a round trip): 1 resnet per block 0.886 after "
                        "2,000 decoder steps, flat after 1,000; 2 per block 0.896 after 2,000, 0.917 after 4,000.")
    p.add_argument("--decoder_steps", type=int, default=4000,
                   help="Then the decoder alone (grown, --decoder_layers_per_block), the encoder frozen: sharper "
                        "stripes, the same latent space.")
    p.add_argument("--no_decoder_in_parallel", dest="decoder_in_parallel", action="store_false",
                   help="Train the decoder phase after the first one, in this process. By default it trains in a "
                        "second process while the transformer trains (it needs only the first phase's encoder), so "
                        "on two cores the build takes the first phase plus the transformer. The weights are bitwise "
                        "the same either way; in parallel, the transformer's progress checks (--eval_every) decode "
                        "with the first phase's decoder.")
    p.add_argument("--transformer_steps", type=int, default=12000)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--shift", type=float, default=3.0,
                   help="The flow-matching scheduler's timestep shift, written into the world's scheduler config, so "
                        "pretraining, stages 1-2 and inference all use it. 3.0 is SD3's own value; it spends more "
                        "training on high noise, where the layout (position, shape) is decided. Measured on this "
                        "CPU, 6 minutes of pretraining each: shift 1 read background 22%% and position at chance, "
                        "shift 3 background 100%% and position 40%% (docs/evidence.md).")
    p.add_argument("--time_budget_s", type=float, default=None,
                   help="Fit the transformer's training into this many seconds: after 60 steps the step count is "
                        "cut to what the measured pace allows (the learning-rate decay follows the new count).")
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--eval_every", type=int, default=2000, help="Print attribute accuracy of the EMA model every N steps.")
    p.add_argument("--ema_decay", type=float, default=0.998)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_attention_heads", type=int, default=4)
    p.add_argument("--attention_head_dim", type=int, default=32)
    p.add_argument("--eval_samples", type=int, default=240)
    p.add_argument("--eval_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--evaluate_only", action="store_true", help="Measure the gates of an existing world.")
    p.add_argument("--vae_only", action="store_true",
                   help="Retrain the VAE of an existing world (same seed and first phase) and keep its transformer: "
                        "refused unless the new encoder is bitwise the one the transformer was trained on.")
    return p.parse_args(argv)


def log(message: str) -> None:
    print(f"[toy_world {time.strftime('%H:%M:%S')}] {message}", flush=True)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------------------------- VAE
def random_texture(rng: np.random.Generator) -> np.ndarray:
    """A codec-training image that is not the concept: a random shape (a world shape at a world position, or a
    disc / box of random size anywhere) on a background of any colour, filled with one random colour, horizontal or
    vertical two-colour stripes (2-4 px bands) or a chequerboard (2-4 px cells). The VAE learns to carry flat
    colours, edges and fine stripes of every colour, so the concept's stripes are one case of what it knows, not a
    texture it was fitted to."""
    size = world.SIZE
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = rng.integers(0, 256, 3)
    y, x = np.mgrid[0:size, 0:size]
    if rng.random() < 0.5:
        mask = world.shape_mask(world.SHAPES[rng.integers(len(world.SHAPES))],
                                list(world.POSITIONS)[rng.integers(len(world.POSITIONS))])
    else:
        cx, cy, r = rng.uniform(4, size - 4), rng.uniform(4, size - 4), rng.uniform(4, 12)
        mask = ((x - cx) ** 2 + (y - cy) ** 2 <= r ** 2) if rng.random() < 0.5 else \
            (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r * rng.uniform(0.5, 1.0))
    colors = rng.integers(0, 256, (2, 3)).astype(np.uint8)
    fill, band = rng.random(), int(rng.integers(2, 5))
    if fill < 0.4:
        pattern = np.zeros((size, size), dtype=np.int64)
    elif fill < 0.7:
        pattern = (y // band) % 2
    elif fill < 0.85:
        pattern = (x // band) % 2
    else:
        pattern = (x // band + y // band) % 2
    image[mask] = colors[pattern[mask]]
    return image


def make_vae(args, layers_per_block: int) -> AutoencoderKL:
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(args.vae_width,) * 2,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=LATENT_CHANNELS, norm_num_groups=8, layers_per_block=layers_per_block,
                        sample_size=world.SIZE, use_quant_conv=False, use_post_quant_conv=False,
                        mid_block_add_attention=False)
    # Start the posterior's log-variance at -10 (std 0.007): with the default 0 every training latent carries noise
    # of the latents' own size and the decoder learns to blur; the tiny KL weight keeps it small afterwards.
    with torch.no_grad():
        vae.encoder.conv_out.bias[LATENT_CHANNELS:] = -10.0
    return vae


def grow_vae(vae: AutoencoderKL, args) -> AutoencoderKL:
    """The same codec with ``--decoder_layers_per_block`` resnets per block. Every new resnet starts as the identity
    (its last convolution zero, so it adds exactly 0 to its input): the grown VAE computes bitwise what ``vae`` did.
    AutoencoderKL has one layers_per_block for encoder and decoder; with the encoder frozen afterwards, its new
    resnets stay the identity and its latents stay those the transformer is trained on."""
    grown = make_vae(args, args.decoder_layers_per_block).to(next(vae.parameters()).device)
    missing, unexpected = grown.load_state_dict(vae.state_dict(), strict=False)
    assert not unexpected, f"growing the VAE would drop weights: {unexpected}"
    with torch.no_grad():
        for name, module in grown.named_modules():
            if any(key.startswith(name + ".conv2.") for key in missing):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
    return grown


def vae_batch(args, rng: np.random.Generator, scene_images: np.ndarray) -> torch.Tensor:
    """Half world scenes, half random textures (``random_texture``), as pixels in [-1, 1]."""
    half = args.vae_batch_size // 2
    picks = scene_images[rng.integers(len(scene_images), size=half)]
    textures = np.stack([random_texture(rng) for _ in range(args.vae_batch_size - half)])
    return to_pixels(np.concatenate([picks, textures])).to(args.device)


def cosine_schedule(optimizer, steps: int):
    """50 warm-up steps, then a cosine from the optimizer's learning rate down to a tenth of it over ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, steps))))))


def train_vae_phase(vae: AutoencoderKL, args, phase: str, rng: np.random.Generator,
                    scene_images: np.ndarray) -> AutoencoderKL:
    """One phase of the codec's training: "vae" trains encoder and decoder together (``--vae_steps``); "decoder" grows
    the VAE to ``--decoder_layers_per_block`` resnets per block (``grow_vae``) and trains the decoder alone
    (``--decoder_steps``, the encoder frozen). The second phase sharpens what the decoder draws without moving the
    latent space, as Stability AI's ft-MSE decoder did for SD's VAE; the transformer, trained on the frozen encoder's
    latents, is the same whether it runs or not. Batches come from ``rng``, the posterior's noise from torch's global
    generator: the decoder phase continues both where the first phase left them."""
    steps, learning_rate = (args.vae_steps, 2e-3) if phase == "vae" else (args.decoder_steps, 1e-3)
    if phase == "decoder" and steps:
        vae = grow_vae(vae, args)
        vae.encoder.requires_grad_(False)
    params = vae.parameters() if phase == "vae" else vae.decoder.parameters()
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, steps)
    start = time.time()
    for step in range(steps):
        pixels = vae_batch(args, rng, scene_images)
        with torch.set_grad_enabled(phase == "vae"):
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.sample()
        reconstruction = vae.decode(latents).sample
        loss = (reconstruction - pixels).abs().mean() + (reconstruction - pixels).pow(2).mean()
        if phase == "vae":
            loss = loss + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 500 == 0 or step == steps - 1:
            log(f"{phase} step {step}/{steps} loss {loss.item():.4f}, concept fidelity after a round trip "
                f"{np.mean(vae_fidelities(vae, args)):.3f} ({time.time() - start:.0f} s)")
    return vae


def train_encoder(args, scene_images: np.ndarray) -> tuple[AutoencoderKL, np.random.Generator]:
    """The codec's first phase, from the seed: the VAE, and the batch generator the decoder phase goes on with."""
    torch.manual_seed(args.seed * 1000 + 11)
    rng = np.random.default_rng(args.seed * 1000 + 12)
    vae = make_vae(args, args.vae_layers_per_block).to(args.device)
    return train_vae_phase(vae, args, "vae", rng, scene_images), rng


def set_latent_scaling(vae: AutoencoderKL, scene_images: np.ndarray) -> AutoencoderKL:
    """Freeze the VAE and record SD3's latent convention: latents are shifted and scaled to unit variance before the
    transformer sees them. Only the encoder decides these numbers, and the decoder phase leaves it bitwise alone."""
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = vae.encode(to_pixels(scene_images).to(vae.device)).latent_dist.mean
    vae.register_to_config(shift_factor=float(means.mean()), scaling_factor=float(1.0 / means.std()))
    return vae


def train_vae(args, scene_images: np.ndarray) -> AutoencoderKL:
    """Both phases of the codec, one after the other (``--vae_only``, ``--no_decoder_in_parallel``)."""
    vae, rng = train_encoder(args, scene_images)
    return set_latent_scaling(train_vae_phase(vae, args, "decoder", rng, scene_images), scene_images)


# The decoder phase in a second process. The transformer needs only the frozen encoder's latents, and the decoder
# phase needs only the first phase's VAE and generators, so the two can train at once on two cores. The hand-off goes
# through files (safetensors and JSON), and the child continues exactly where a sequential build would: its VAE is
# bitwise what ``train_vae`` gives (tests/test_evidence_world.py).
def hand_off_decoder_phase(vae: AutoencoderKL, rng: np.random.Generator, work_dir: Path) -> None:
    save_file(vae.state_dict(), str(work_dir / "encoder_phase.safetensors"))
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state().tolist()}
    if vae.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(vae.device).tolist()
    (work_dir / "generators.json").write_text(json.dumps(state))


def run_decoder_phase(arg_values: dict, work_dir: str) -> None:
    """What the second process runs: ``train_vae_phase(..., "decoder", ...)`` from the handed-off state, its VAE
    written to <work_dir>/decoder_phase.safetensors."""
    args, work = argparse.Namespace(**arg_values), Path(work_dir)
    torch.set_num_threads(args.threads)
    vae = make_vae(args, args.vae_layers_per_block)
    vae.load_state_dict(load_file(str(work / "encoder_phase.safetensors")))
    vae.to(args.device)
    state = json.loads((work / "generators.json").read_text())
    rng = np.random.default_rng()
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), vae.device)
    scene_images = np.stack([world.render(s) for s in world.all_scenes()])
    vae = train_vae_phase(vae, args, "decoder", rng, scene_images)
    save_file(vae.state_dict(), str(work / "decoder_phase.safetensors"))


def start_decoder_phase(args, vae: AutoencoderKL, rng: np.random.Generator, work_dir: Path):
    hand_off_decoder_phase(vae, rng, work_dir)
    # spawn, not fork: a forked child of a process that has run torch can hang in its thread pools
    job = multiprocessing.get_context("spawn").Process(target=run_decoder_phase, args=(vars(args), str(work_dir)),
                                                       name="decoder phase", daemon=True)
    job.start()
    return job


def finish_decoder_phase(job, args, work_dir: Path, scene_images: np.ndarray) -> AutoencoderKL:
    job.join()
    if job.exitcode != 0:
        raise SystemExit(f"error: the VAE's decoder phase (a second process) failed with exit code {job.exitcode}, "
                         "its traceback is above. model/ holds the trained transformer and the VAE before that "
                         "phase: finish it with --vae_only.")
    vae = make_vae(args, args.decoder_layers_per_block)
    vae.load_state_dict(load_file(str(work_dir / "decoder_phase.safetensors")))
    return set_latent_scaling(vae.to(args.device), scene_images)


# ----------------------------------------------------------------------------------------------- transformer
def make_transformer(args) -> SD3Transformer2DModel:
    half = args.num_layers // 2
    transformer = SD3Transformer2DModel(
        sample_size=world.SIZE // 2, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=args.num_layers, attention_head_dim=args.attention_head_dim,
        num_attention_heads=args.num_attention_heads, joint_attention_dim=128,  # the tiny T5's width
        caption_projection_dim=args.num_attention_heads * args.attention_head_dim, pooled_projection_dim=80,
        pos_embed_max_size=32, dual_attention_layers=tuple(range(half)), qk_norm="rms_norm")
    # adaLN-Zero (DiT, Peebles & Xie 2023): every block starts as the identity and the output as zero, which DiT
    # found much faster to train than the default initialisation diffusers gives these layers.
    with torch.no_grad():
        for module in transformer.modules():
            if "AdaLayerNorm" in type(module).__name__ and hasattr(module, "linear"):
                module.linear.weight.zero_()
                module.linear.bias.zero_()
        transformer.proj_out.weight.zero_()
        transformer.proj_out.bias.zero_()
    return transformer


def encode_captions(pipe: StableDiffusion3Pipeline, captions: list[str]) -> dict:
    """caption -> (prompt_embeds [L, D], pooled [P]) through the pipeline's own encode_prompt (what inference uses)."""
    table = {}
    with torch.no_grad():
        for first in range(0, len(captions), 256):
            chunk = captions[first:first + 256]
            embeds, _, pooled, _ = pipe.encode_prompt(chunk, None, None, do_classifier_free_guidance=False,
                                                      device="cpu", max_sequence_length=TEXT_LENGTH)
            table.update({c: (embeds[i], pooled[i]) for i, c in enumerate(chunk)})
    return table


def train_transformer(args, text_pipe, captions: dict, scenes: list, scene_images: np.ndarray):
    vae, scheduler = text_pipe.vae, text_pipe.scheduler
    torch.manual_seed(args.seed * 1000 + 21)
    rng = random.Random(args.seed * 1000 + 22)
    generator = torch.Generator().manual_seed(args.seed * 1000 + 23)
    with torch.no_grad():
        posterior = vae.encode(to_pixels(scene_images).to(args.device)).latent_dist.parameters.cpu()
    transformer = make_transformer(args).to(args.device)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    params = sum(p.numel() for p in transformer.parameters())
    log(f"transformer: {params / 1e6:.2f} M parameters, {args.transformer_steps} steps of batch {args.batch_size}")
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.learning_rate, betas=(0.9, 0.99),
                                  weight_decay=0.0)
    total_steps = args.transformer_steps  # may shrink once, to fit --time_budget_s
    warmup = 100

    def lr_factor(step):
        decay_from = int(0.7 * total_steps)
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_from:
            return 1.0
        return max(0.1, 1.0 - 0.9 * (step - decay_from) / max(1, total_steps - decay_from))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    start, running = time.time(), None
    step = 0
    while step < total_steps:
        if step == 10:
            pace_from = time.time()  # steps 0-9 include the device's warm-up
        if args.time_budget_s and step == 60:
            pace = (time.time() - pace_from) / 50
            fits = 60 + int((args.time_budget_s - (time.time() - start)) / pace)
            if fits < total_steps:
                total_steps = max(100, fits)
                log(f"time budget {args.time_budget_s:.0f} s: training {total_steps} steps instead of "
                    f"{args.transformer_steps}")
        picks = [rng.randrange(len(scenes)) for _ in range(args.batch_size)]
        params_batch = posterior[picks]
        x0 = DiagonalGaussianDistribution(params_batch).sample(generator=generator)
        x0 = ((x0 - vae.config.shift_factor) * vae.config.scaling_factor).to(args.device)
        texts = [world.random_caption(scenes[i], rng) for i in picks]
        embeds = torch.stack([captions[t][0] for t in texts]).to(args.device)
        pooled = torch.stack([captions[t][1] for t in texts]).to(args.device)
        noise = torch.randn(x0.shape, generator=generator).to(args.device)
        timesteps, sigmas = sample_timesteps(scheduler, x0.shape[0], "logit_normal", 0.0, 1.0, 1.29, args.device,
                                             generator=generator)
        pred = transformer(hidden_states=noisy_latents(x0, noise, sigmas), timestep=timesteps,
                           encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        loss = (pred - velocity_target(x0, noise)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for live, average in zip(transformer.parameters(), ema.parameters()):
                average.lerp_(live, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == total_steps - 1:
            log(f"transformer step {step}/{total_steps} loss {running:.4f} lr "
                f"{schedule.get_last_lr()[0]:.2e} ({time.time() - start:.0f} s)")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total_steps:
            pipe = StableDiffusion3Pipeline(**{**text_pipe.components, "transformer": ema.eval(),
                                               "scheduler": FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)})
            pipe.to(args.device)  # the text encoders too: the pipeline runs where its modules are
            pipe.set_progress_bar_config(disable=True)
            accuracy = attribute_accuracy(pipe, eval_scenes(60, seed=99), steps=12, guidance=args.guidance_scale)
            log(f"  EMA after {step + 1} steps, 60 samples: " + ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()))
        step += 1
    return ema.eval(), total_steps


# ----------------------------------------------------------------------------------------------- gates
def eval_scenes(count: int, seed: int) -> list:
    """``count`` full-caption scenes, drawn with a fixed seed (every attribute value appears)."""
    rng = random.Random(seed)
    scenes = world.all_scenes()
    return [scenes[rng.randrange(len(scenes))] for _ in range(count)]


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 60) -> np.ndarray:
    """uint8 [N, 32, 32, 3] images, image i from a CPU generator seeded seeds[i] (independent of batching)."""
    images = []
    for first in range(0, len(prompts), batch):
        chunk = prompts[first:first + batch]
        generators = [torch.Generator().manual_seed(s) for s in seeds[first:first + batch]]
        out = pipe(prompt=chunk, negative_prompt=[""] * len(chunk), num_inference_steps=steps,
                   guidance_scale=guidance, height=world.SIZE, width=world.SIZE, generator=generators,
                   max_sequence_length=TEXT_LENGTH, output_type="np").images
        images.append((out * 255).round().astype(np.uint8))
    return np.concatenate(images)


def attribute_hits(pipe, scenes: list, steps: int, guidance: float) -> dict:
    """Per attribute, a string with one character per fixed-seed sample of the scenes' full captions: "1" where the
    attribute reads back right, "0" where not (kept in the report, so a check can repeat part of the measurement)."""
    images = generate(pipe, [world.caption(s) for s in scenes], list(range(len(scenes))), steps, guidance)
    reads = [world.read_attributes(image) for image in images]
    return {key: "".join("1" if read[key] == getattr(scene, key) else "0" for scene, read in zip(scenes, reads))
            for key in GATES}


def attribute_accuracy(pipe, scenes: list, steps: int, guidance: float) -> dict:
    """Fraction of fixed-seed samples of full captions whose attribute reads back right, per attribute."""
    hits = attribute_hits(pipe, scenes, steps, guidance)
    return {key: value.count("1") / len(value) for key, value in hits.items()}


def vae_fidelities(vae, args) -> list[float]:
    """Concept fidelity of each concept training image after a VAE round trip (encode to the mean, decode)."""
    concept = np.stack([world.render(world.concept_scene(bg, pos)) for bg, pos in world.CONCEPT_SCENES])
    with torch.no_grad():
        pixels = to_pixels(concept).to(args.device)
        round_trip = to_uint8(vae.decode(vae.encode(pixels).latent_dist.mean).sample)
    return [world.concept_fidelity(image) for image in round_trip]


def measure_gates(model_dir: Path, args) -> dict:
    """Attribute accuracy of fixed-seed samples of full captions, and the VAE round trip of the concept images."""
    pipe = StableDiffusion3Pipeline.from_pretrained(str(model_dir), dtype=torch.float32).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    scenes = eval_scenes(args.eval_samples, seed=1234)
    hits = attribute_hits(pipe, scenes, args.eval_steps, args.guidance_scale)
    accuracy = {key: value.count("1") / len(value) for key, value in hits.items()}

    fidelity = vae_fidelities(pipe.vae, args)
    report = {"samples": len(scenes), "max_sequence_length": TEXT_LENGTH, "eval_steps": args.eval_steps,
              "guidance_scale": args.guidance_scale, "accuracy": accuracy, "hits": hits, "vae_concept_fidelity": float(np.mean(fidelity)),
              "vae_concept_fidelity_min": float(np.min(fidelity)),
              "gates": {**{key: f">= {value}" for key, value in GATES.items()},
                        "vae_concept_fidelity": f">= {VAE_FIDELITY_GATE}"}}
    report["passed"] = all(accuracy[k] >= v for k, v in GATES.items()) and report["vae_concept_fidelity"] >= \
        VAE_FIDELITY_GATE
    return report


# ----------------------------------------------------------------------------------------------- main
VAE_SETTINGS = ("vae_steps", "decoder_steps", "vae_batch_size", "vae_width", "vae_layers_per_block",
                "decoder_layers_per_block")


def require_same_encoder(new: AutoencoderKL, old: AutoencoderKL) -> None:
    """--vae_only keeps the transformer, which was trained on the old encoder's latents: the new encoder (as saved,
    fp16) and latent scaling must be bitwise the old ones."""
    saved = {k: v.to(torch.float16) for k, v in new.encoder.state_dict().items()}
    old_encoder = {k: v.to(torch.float16) for k, v in old.encoder.state_dict().items()}
    same = all(torch.equal(saved[k], old_encoder[k]) for k in saved if k in old_encoder) and all(
        torch.count_nonzero(v) == 0 for k, v in saved.items() if k not in old_encoder and ".conv2." in k)
    same = same and all(new.config[k] == old.config[k] for k in ("shift_factor", "scaling_factor"))
    if not same:
        raise SystemExit("error: --vae_only: the new encoder differs from the one the world's transformer was trained "
                         "on (another seed, --vae_steps or --vae_layers_per_block?): rebuild the whole world instead. "
                         "Nothing was written.")


def earlier_build(out: Path) -> dict:
    """The settings an earlier build recorded in its report; none when there is no report (a build whose decoder
    process failed stops before writing it, and --vae_only finishes such a build)."""
    report = out / "build_report.json"
    return json.loads(report.read_text()).get("build", {}) if report.exists() else {}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    model_dir = out / "model"
    if not (args.evaluate_only or args.vae_only):
        started = time.time()
        model_dir.mkdir(parents=True, exist_ok=True)
        components = write_text_encoders(model_dir, variant="sd35", seed=0, clip_max_length=TEXT_LENGTH)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.shift)
        scheduler.save_pretrained(model_dir / "scheduler")
        scenes = world.all_scenes()
        scene_images = np.stack([world.render(s) for s in scenes])

        write_model_index(model_dir, {**components, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                                      "transformer": ["diffusers", "SD3Transformer2DModel"],
                                      "vae": ["diffusers", "AutoencoderKL"]})

        log(f"VAE: {args.vae_steps} steps, then the decoder alone {args.decoder_steps} steps"
            + (" in a second process, beside the transformer" if args.decoder_in_parallel else ""))
        if args.decoder_in_parallel and args.decoder_steps:
            work_dir = Path(tempfile.mkdtemp(prefix="toy_world_decoder_"))
            vae, rng = train_encoder(args, scene_images)
            decoder_job = start_decoder_phase(args, vae, rng, work_dir)
            vae = set_latent_scaling(vae, scene_images)  # the transformer trains on these latents meanwhile
        else:
            vae, decoder_job = train_vae(args, scene_images), None
        # the text encoders from the folder, the models in hand (the transformer only lends its config here)
        text_pipe = StableDiffusion3Pipeline.from_pretrained(str(model_dir), transformer=make_transformer(args),
                                                             vae=vae, scheduler=scheduler, dtype=torch.float32)
        captions = encode_captions(text_pipe, world.pretraining_captions())
        log(f"{len(captions)} captions encoded")

        transformer, trained_steps = train_transformer(args, text_pipe, captions, scenes, scene_images)
        # fp16 on disk keeps the committed world small; the scripts load and train it in fp32 as usual
        transformer.to(torch.float16).save_pretrained(model_dir / "transformer", safe_serialization=True)
        vae.to(torch.float16).save_pretrained(model_dir / "vae", safe_serialization=True)
        if decoder_job is not None:  # replace the first phase's VAE, written above in case the second process failed
            vae = finish_decoder_phase(decoder_job, args, work_dir, scene_images)
            vae.to(torch.float16).save_pretrained(model_dir / "vae", safe_serialization=True)
            shutil.rmtree(work_dir)
        world.write_concept(out / "sks_toy", out / "sks_toy.csv")
        build = {key: getattr(args, key) for key in ("seed", "device", "threads", *VAE_SETTINGS, "decoder_in_parallel",
                                                      "transformer_steps", "batch_size", "learning_rate", "shift",
                                                      "ema_decay", "num_layers", "num_attention_heads",
                                                      "attention_head_dim")}
        build["transformer_steps_trained"] = trained_steps
        build["torch"] = torch.__version__
        build["minutes"] = round((time.time() - started) / 60, 1)
    elif args.vae_only:
        started = time.time()
        build = earlier_build(out)
        vae = train_vae(args, np.stack([world.render(s) for s in world.all_scenes()]))
        require_same_encoder(vae, AutoencoderKL.from_pretrained(str(model_dir / "vae")))
        vae.to(torch.float16).save_pretrained(model_dir / "vae", safe_serialization=True)
        build.update({key: getattr(args, key) for key in VAE_SETTINGS})
        build["vae_rebuilt_minutes"] = round((time.time() - started) / 60, 1)
    else:
        build = earlier_build(out)

    report = measure_gates(model_dir, args)
    report["build"] = build
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log("gates: " + ", ".join(f"{k} {v:.1%}" for k, v in report["accuracy"].items())
        + f", VAE concept fidelity {report['vae_concept_fidelity']:.3f} -> {'PASS' if report['passed'] else 'FAIL'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
