"""Fidelity and preservation metrics of trained LoRAs, measured on the denoiser itself (no extra models needed).

For each --lora (stage 1, stage 2, ...), against the base model, on fixed (image, noise, sigma) triples:

- ``concept_loss``: flow-matching loss on the concept images with their CSV ``prompt`` (fidelity: lower = the
  concept is learned better; compare with the base model's value).
- ``preservation_drift``: ||v_lora - v_base||^2 / ||v_base||^2 on prompts WITHOUT the concept (the CSV's
  ``base_prompt`` column plus --preservation_prompts): how much the LoRA changes the model where it should not.
  PureCC's claim is that stage 2 drifts less than stage 1 here.

    python eval.py --pretrained_model_name_or_path SD3.5 --data_path data --csv_name robot_toy.csv \
        --lora output/base_ckpt/robot_toy --lora output/robot_toy --output_json output/robot_toy/eval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from utils.checks import BadInput, check_model_folder, exit_on_error
from utils.data import read_concept_csv
from utils.dataset import load_image
from utils.flow_matching import noisy_latents, scale_latents, velocity_target, weighted_mse
from utils.lora import activate_adapter, adapters_disabled, load_lora_as_adapter, lora_format
from utils.prompts import PromptEncoder, load_text_pipeline
from utils.training import transformer_velocity

GENERIC_PROMPTS = ("a photo of a dog on the grass", "a red car parked on a city street", "a bowl of fruit on a table",
                   "a mountain lake at sunrise", "a portrait of an old man", "a cat sleeping on a sofa")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--lora", action="append", required=True, help="LoRA folder (either format); repeatable.")
    p.add_argument("--data_path", required=True)
    p.add_argument("--csv_name", required=True)
    p.add_argument("--preservation_prompts_file", default=None,
                   help="One prompt per line without the concept (default: a built-in generic set).")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--sigmas", default="0.25,0.5,0.75", help="Noise levels the metrics average over.")
    p.add_argument("--num_noise_seeds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_sequence_length", type=int, default=77)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output_json", default=None)
    return p.parse_args(argv)


def read_inputs(args):
    check_model_folder(args.pretrained_model_name_or_path)
    for path in args.lora:
        if lora_format(path) is None:
            raise BadInput(f"--lora {path}: no LoRA there (expected pytorch_lora_weights.safetensors or "
                           "adapter_config.json + adapter_model.safetensors).")
    rows = read_concept_csv(args.data_path, args.csv_name)
    if args.preservation_prompts_file:
        path = Path(args.preservation_prompts_file)
        if not path.is_file():
            raise BadInput(f"--preservation_prompts_file {path}: no such file.")
        generic = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    else:
        generic = list(GENERIC_PROMPTS)
    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
    except ValueError:
        raise BadInput(f"--sigmas {args.sigmas!r}: expected comma-separated numbers in (0, 1].")
    if not all(0.0 < s <= 1.0 for s in sigmas):
        raise BadInput(f"--sigmas {args.sigmas!r}: every value must be in (0, 1].")
    instance_words = {row.instance_word for row in rows}
    preservation = sorted({row.base_prompt for row in rows} | set(generic))
    leaking = [p for p in preservation if any(word in p for word in instance_words)]
    if leaking:
        raise BadInput(f"preservation prompts must not contain the concept ({sorted(instance_words)}): {leaking[:2]}")
    return rows, preservation, sigmas


def fixed_triples(vae, rows, args, sigmas, device):
    """(x0, noise, sigma) for every image x noise seed x sigma: the same inputs for every model compared."""
    triples = []
    with torch.no_grad():
        for row in rows:
            pixels = load_image(row.image_path, args.resolution, center_crop=True, flip=False, rng=None)
            dist = vae.encode(pixels.unsqueeze(0).to(device, vae.dtype)).latent_dist
            x0 = scale_latents(dist.mean, vae.config)
            for noise_seed in range(args.num_noise_seeds):
                generator = torch.Generator().manual_seed(args.seed + noise_seed)
                noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
                triples += [(row, x0, noise, torch.tensor([sigma], device=device)) for sigma in sigmas]
    return triples


@torch.no_grad()
def measure(transformer, scheduler, prompt_cache, triples, preservation, base_predictions, dtype, device):
    """Metrics of the transformer as currently configured (adapter active or all disabled)."""
    concept_losses, drifts, predictions = [], [], []
    for row, x0, noise, sigma in triples:
        x_t = noisy_latents(x0, noise, sigma)
        timestep = sigma * scheduler.config.num_train_timesteps
        embeds, pooled = prompt_cache.lookup([row.prompt] + preservation, device, dtype)
        batch = len(preservation) + 1
        v = transformer_velocity(transformer, x_t.repeat(batch, 1, 1, 1).to(dtype), timestep.repeat(batch),
                                 embeds, pooled).float()
        concept_losses.append(weighted_mse(v[:1], velocity_target(x0, noise), None).item())
        predictions.append(v[1:])
    if base_predictions is not None:
        for v, v_base in zip(predictions, base_predictions):
            drifts.append(((v - v_base) ** 2).sum().item() / ((v_base ** 2).sum().item() + 1e-12))
    result = {"concept_loss": sum(concept_losses) / len(concept_losses)}
    if drifts:
        result["preservation_drift"] = sum(drifts) / len(drifts)
    return result, predictions


def main(argv=None):
    args = parse_args(argv)
    rows, preservation, sigmas = read_inputs(args)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    text_pipe = load_text_pipeline(args.pretrained_model_name_or_path, dtype=dtype)
    encoder = PromptEncoder(text_pipe, [r.prompt for r in rows] + preservation, device, args.max_sequence_length)
    prompt_cache = encoder.cache()
    encoder.close()
    path = args.pretrained_model_name_or_path
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device)
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer").to(device, dtype)
    transformer.requires_grad_(False)
    triples = fixed_triples(vae, rows, args, sigmas, device)

    names = [f"lora{i}" for i in range(len(args.lora))]
    for name, lora_dir in zip(names, args.lora):
        load_lora_as_adapter(transformer, lora_dir, name, trainable=False)
    transformer.to(device, dtype)
    with adapters_disabled(transformer):
        base, base_predictions = measure(transformer, scheduler, prompt_cache, triples, preservation, None, dtype, device)
    results = {"base": base}
    for name, lora_dir in zip(names, args.lora):
        activate_adapter(transformer, name, trainable=False)
        results[lora_dir] = measure(transformer, scheduler, prompt_cache, triples, preservation, base_predictions,
                                    dtype, device)[0]

    print(f"{'model':<50} {'concept_loss':>13} {'preservation_drift':>19}")
    for name, metrics in results.items():
        drift = metrics.get("preservation_drift")
        print(f"{name:<50} {metrics['concept_loss']:>13.5f} {'-' if drift is None else f'{drift:.3e}':>19}")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps({"preservation_prompts": preservation, "sigmas": sigmas,
                                                      "results": results}, indent=2))
    return results


if __name__ == "__main__":
    exit_on_error(main)
