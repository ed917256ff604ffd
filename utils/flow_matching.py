"""Rectified-flow step maths shared by stage 1 and stage 2 (docs/method.md section 3).

SD3 trains with rectified flow: x_t = (1 - sigma) * x0 + sigma * noise, and the network predicts the velocity
u = noise - x0. Both stages draw noise and timesteps with one helper (``add_noise``: Algorithm 1, lines 9-10) and
weight the loss the same way, so every formula lives here once. The PureCC objective (paper Eqs. 13-15,
utils/purecc_loss.py) reuses `weighted_mse` so that L_diff and L_pure are measured by exactly the same norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3


# --------------------------------------------------------------------------------------------------------------
# timesteps and sigmas
# --------------------------------------------------------------------------------------------------------------

def timestep_indices(u: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Map u in [0, 1] to indices into the scheduler's training timesteps (the diffusers SD3 recipe).

    Clamped because the density can reach the closed end: "mode" gives u = 1 exactly at a uniform draw of 0,
    and a float32 sigmoid saturates to 1.0, either of which would index one past the end.
    """
    indices = (u * num_train_timesteps).long()
    return indices.clamp(0, num_train_timesteps - 1)


def sample_timesteps(
    noise_scheduler,
    batch_size: int,
    weighting_scheme: str,
    logit_mean: Optional[float],
    logit_std: Optional[float],
    mode_scale: Optional[float],
    device: torch.device | str,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw per-sample training timesteps and their sigmas: returns (timesteps [B], sigmas [B]) on `device`.

    The scheduler must be as constructed (its training schedule): after `set_timesteps` it holds an inference
    schedule, and indexing it would silently give the wrong sigmas. Sigmas are taken at the same indices as the
    timesteps, which is what the diffusers recipe's timestep->sigma lookup amounts to, without the search.
    """
    num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
    if len(noise_scheduler.timesteps) != num_train_timesteps or len(noise_scheduler.sigmas) < num_train_timesteps:
        raise ValueError(
            f"sample_timesteps needs the scheduler's training schedule ({num_train_timesteps} timesteps), got "
            f"{len(noise_scheduler.timesteps)} timesteps / {len(noise_scheduler.sigmas)} sigmas: was set_timesteps "
            "called on it? Use a fresh copy for training."
        )
    # u is drawn where the generator lives (a CPU generator cannot draw on CUDA), then moved.
    draw_device = generator.device if generator is not None else torch.device("cpu")
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=draw_device,
        generator=generator,
    )
    indices = timestep_indices(u, num_train_timesteps).to(noise_scheduler.timesteps.device)
    timesteps = noise_scheduler.timesteps[indices]
    sigmas = noise_scheduler.sigmas.to(indices.device)[indices]
    return timesteps.to(device), sigmas.to(device)


def expand_sigmas(sigmas: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-sample sigmas [B] (or already [B,1,...]) reshaped to [B,1,...,1] with `ndim` dims, to broadcast."""
    batch = sigmas.shape[0] if sigmas.ndim > 0 else 1
    if sigmas.numel() != batch:
        raise ValueError(f"expected one sigma per sample, got shape {tuple(sigmas.shape)}")
    return sigmas.reshape(batch, *([1] * (ndim - 1)))


# --------------------------------------------------------------------------------------------------------------
# forward process, target, output preconditioning
# --------------------------------------------------------------------------------------------------------------

def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise (rectified-flow interpolation), sigma in the latents' dtype."""
    sigma = expand_sigmas(sigmas, x0.ndim).to(device=x0.device, dtype=x0.dtype)
    return (1.0 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """u = dx_t/dsigma = noise - x0, the rectified-flow velocity the network is trained to predict."""
    return noise - x0


def precondition_to_x0(pred: torch.Tensor, x_t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """EDM-style x0 prediction from a velocity: x0_hat = x_t - sigma * v (exact inverse of the forward process)."""
    sigma = expand_sigmas(sigmas, pred.ndim).to(device=pred.device, dtype=x_t.dtype)
    return x_t - sigma * pred


# --------------------------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------------------------

def loss_weights(weighting_scheme: str, sigmas: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """Per-sample SD3 loss weights w(sigma), shaped [B,1,...,1] (`ndim` dims) to broadcast over the latents.

    Only "sigma_sqrt" (1/sigma^2) and "cosmap" weight; every other scheme ("logit_normal", "mode", "none")
    is uniform, its effect being in where the timesteps are drawn instead.
    """
    flat = sigmas.reshape(-1)
    weights = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=flat)
    return expand_sigmas(weights, ndim)


def _per_sample_weights(weights: Optional[torch.Tensor], pred: torch.Tensor) -> torch.Tensor:
    """Weights as float32, broadcastable to `pred`; a [B] vector is expanded, None means uniform."""
    if weights is None:
        return torch.ones((), device=pred.device, dtype=torch.float32)
    if weights.ndim == 1 and pred.ndim > 1:
        weights = expand_sigmas(weights, pred.ndim)
    try:
        shape = torch.broadcast_shapes(weights.shape, pred.shape)
    except RuntimeError as err:
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not broadcast to {tuple(pred.shape)}") from err
    if shape != pred.shape:
        raise ValueError(f"weights of shape {tuple(weights.shape)} would enlarge the loss shape {tuple(pred.shape)}")
    return weights.to(device=pred.device, dtype=torch.float32)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """mse_w(a, b) = mean over batch of (mean over elements of w * (a - b)^2), a float32 scalar.

    Upcast first: squared differences of bf16 predictions lose most of their mantissa. This is the one norm
    both terms of the PureCC loss (Eqs. 14-15) use.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    w = _per_sample_weights(weights, pred)
    err = w * (pred.float() - target.float()) ** 2
    return err.reshape(pred.shape[0], -1).mean(dim=1).mean()


@dataclass(frozen=True)
class Noised:
    """One batch on the rectified-flow path: clean latents, the noise, x_t, the timesteps and sigmas drawn for
    them, and the per-sample loss weights w(sigma)."""

    x0: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    weights: torch.Tensor

    def repeat(self, times: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, timesteps) stacked ``times`` over: one forward pass for several prompts at the same x_t and t."""
        return self.x_t.repeat(times, *([1] * (self.x_t.ndim - 1))), self.timesteps.repeat(times)


def add_noise(x0: torch.Tensor, noise_scheduler, args, generator: torch.Generator) -> Noised:
    """Algorithm 1, lines 9-10: noise ~ N(0, I), then a timestep per sample (--weighting_scheme, --logit_mean,
    --logit_std, --mode_scale), then x_t. Both stages call this for the instance batch and, separately, for the
    class sub-batch of prior preservation: every image gets its own noise and timestep."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    timesteps, sigmas = sample_timesteps(noise_scheduler, x0.shape[0], args.weighting_scheme, args.logit_mean,
                                         args.logit_std, args.mode_scale, x0.device, generator=generator)
    return Noised(x0=x0, noise=noise, x_t=noisy_latents(x0, noise, sigmas), timesteps=timesteps, sigmas=sigmas,
                  weights=loss_weights(args.weighting_scheme, sigmas, x0.ndim))


def prediction_space(pred: torch.Tensor, noised: Noised, precondition_outputs: bool) -> torch.Tensor:
    """A velocity prediction in the space the loss compares in: itself, or x0_hat = x_t - sigma * v."""
    return precondition_to_x0(pred, noised.x_t, noised.sigmas) if precondition_outputs else pred


def flow_target(noised: Noised, precondition_outputs: bool) -> torch.Tensor:
    """What a prediction is compared with: the velocity noise - x0, or x0 itself when preconditioned."""
    return noised.x0 if precondition_outputs else velocity_target(noised.x0, noised.noise)


def flow_matching_loss(pred: torch.Tensor, noised: Noised, precondition_outputs: bool) -> torch.Tensor:
    """The stage-1 loss: velocity vs. noise - x0, or (preconditioned) x0_hat = x_t - sigma * v vs. x0."""
    return weighted_mse(prediction_space(pred, noised, precondition_outputs), flow_target(noised, precondition_outputs),
                        noised.weights)


# --------------------------------------------------------------------------------------------------------------
# VAE latents
# --------------------------------------------------------------------------------------------------------------

def _config_value(config: Any, name: str) -> Any:
    """Read a VAE config entry from a diffusers FrozenDict, a plain dict or an attribute object."""
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def scale_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """(z - shift_factor) * scaling_factor: SD3's VAE latents normalised to the transformer's input scale."""
    shift = _config_value(vae_config, "shift_factor")
    scale = _config_value(vae_config, "scaling_factor")
    if scale is None:
        raise ValueError("VAE config has no scaling_factor")
    return (latents - (shift if shift is not None else 0.0)) * scale


def encode_latents(vae, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x0 for a batch of images in [-1, 1]: a fresh sample from the VAE posterior, shifted and scaled."""
    latent_dist = vae.encode(pixel_values.to(dtype=vae.dtype)).latent_dist
    return scale_latents(latent_dist.sample(generator=generator), vae.config)


def latents_from_distribution(
    latent_dist_or_params, vae_config: Any, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """x0 from a cached VAE posterior: a DiagonalGaussianDistribution or its `parameters` tensor (mean, logvar).

    Caching the posterior rather than one sample keeps the per-step sampling noise of the uncached path.
    """
    if isinstance(latent_dist_or_params, torch.Tensor):
        latent_dist_or_params = DiagonalGaussianDistribution(latent_dist_or_params)
    return scale_latents(latent_dist_or_params.sample(generator=generator), vae_config)
