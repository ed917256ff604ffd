"""The PureCC stage-2 objective as pure functions over tensors (docs/method.md section 4; PureCC, arXiv 2603.07561).

    v        trainable model, concept prompt                 (gradient)
    v_base   trainable model, base prompt (or frozen base)   (gradient when it comes from the trainable branch)
    delta    = E(x_t, t, target_prompt) - E(x_t, t, "")      the frozen extractor's implicit guidance (never gradient)

    lambda*  = <v - v_base, delta> / <delta, delta>                      Eqs. 10-12 (or a fixed lambda)
    target   = v_base + lambda * delta                                   Eq. 13
    L_pure   = mse_w(v, target)                                          Eq. 14
    L        = mse_w(v, flow target) + eta * L_pure                      Eq. 15

The prior-preservation term, when used, is added by the caller. With output preconditioning on, the caller
converts v, v_base and both extractor outputs to x0 space (x_t - sigma * .) and passes the x0 target, so both
terms compare like with like; lambda* is unchanged by that conversion (r and delta both scale by -sigma), up to its
1e-8 regulariser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.flow_matching import expand_sigmas, weighted_mse

LAMBDA_MODES = ("adaptive", "fixed")
_PROJECTION_EPS = 1e-8  # keeps lambda* finite (0) when the extractor's direction vanishes


def extractor_delta(e_cond: torch.Tensor, e_uncond: torch.Tensor) -> torch.Tensor:
    """delta = e_cond - e_uncond, cut out of the graph (the extractor is frozen) and in float32: the difference of
    two close bf16 predictions keeps few significant bits."""
    if e_cond.shape != e_uncond.shape:
        raise ValueError(f"extractor outputs differ in shape: {tuple(e_cond.shape)} vs {tuple(e_uncond.shape)}")
    return e_cond.detach().float() - e_uncond.detach().float()


def adaptive_lambda(v: torch.Tensor, v_base: torch.Tensor, delta: torch.Tensor, lambda_min: float = 0.0,
                    lambda_max: float = 5.0) -> torch.Tensor:
    """Per-sample lambda* (Eqs. 10-12): the coefficient of the projection of r = v - v_base onto delta.

    lambda* = argmin_l ||r - l * delta||^2 = <r, delta> / (<delta, delta> + eps), inner products over all
    non-batch elements. It is a scale, not a gradient path, so it is computed on detached tensors (in float32,
    the sums run over whole latents). The clamp to [lambda_min, lambda_max] is ours (the paper states none; pass
    -inf / inf for Eq. 12 as written). Returns a detached float32 tensor [B].
    """
    if not (v.shape == v_base.shape == delta.shape):
        raise ValueError(f"adaptive_lambda needs equal shapes, got v {tuple(v.shape)}, v_base {tuple(v_base.shape)}, "
                         f"delta {tuple(delta.shape)}")
    if lambda_min > lambda_max:
        raise ValueError(f"lambda_min ({lambda_min}) exceeds lambda_max ({lambda_max})")
    batch = v.shape[0]
    r = (v.detach().float() - v_base.detach().float()).reshape(batch, -1)
    d = delta.detach().float().reshape(batch, -1)
    lam = (r * d).sum(dim=1) / ((d * d).sum(dim=1) + _PROJECTION_EPS)
    return lam.clamp(lambda_min, lambda_max)


def purecc_lambda(mode: str, v: torch.Tensor, v_base: torch.Tensor, delta: torch.Tensor, fix_lambda: float = 1.0,
                  lambda_min: float = 0.0, lambda_max: float = 5.0) -> torch.Tensor:
    """lambda per sample [B]: the adaptive lambda* of Eqs. 10-12, or ``fix_lambda`` (the release's fixed scale)."""
    if mode not in LAMBDA_MODES:
        raise ValueError(f"lambda_mode must be one of {LAMBDA_MODES}, got {mode!r}")
    if mode == "adaptive":
        return adaptive_lambda(v, v_base, delta, lambda_min, lambda_max)
    return torch.full((v.shape[0],), float(fix_lambda), device=v.device, dtype=torch.float32)


def clamped_fractions(mode: str, lam: torch.Tensor, lambda_min: float, lambda_max: float) -> tuple[float, float]:
    """Fractions of the batch whose adaptive lambda* was clamped to --lambda_min and to --lambda_max (a fixed
    lambda is never clamped). A clamped lambda equals the bound exactly; at a lower bound of 0 the target is v_base
    alone and the extractor has no influence at all."""
    if mode != "adaptive":
        return 0.0, 0.0
    return (lam <= lambda_min).float().mean().item(), (lam >= lambda_max).float().mean().item()


@dataclass
class PureCCLoss:
    """The terms of one PureCC step; ``total`` carries the graph, ``lambda_`` [B] is detached (log its mean)."""

    total: torch.Tensor
    diff_loss: torch.Tensor
    pure_loss: torch.Tensor
    lambda_: torch.Tensor


def purecc_loss(v: torch.Tensor, v_base: torch.Tensor, delta: torch.Tensor, target: torch.Tensor,
                weights: torch.Tensor | None, eta: float, lambda_: torch.Tensor) -> PureCCLoss:
    """L = L_diff + eta * L_pure (Eq. 15), L_pure = mse_w(v, v_base + lambda * delta) (Eqs. 13-14).

    L_diff = mse_w(v, target) learns the concept images; L_pure asks the concept-prompt prediction to be the
    model's own original prediction plus the extractor's concept direction, so the concept is learned as an
    increment instead of overwriting the original behaviour. v_base is deliberately not detached: in the paper's
    trainable original branch it is pulled towards v - lambda * delta too; a frozen-branch v_base computed under
    no_grad simply carries no gradient.
    """
    shapes = {"v": v.shape, "v_base": v_base.shape, "delta": delta.shape, "target": target.shape}
    if len(set(shapes.values())) != 1:
        raise ValueError("purecc_loss needs equal shapes: " + ", ".join(f"{k} {tuple(s)}" for k, s in shapes.items()))
    if v.ndim < 2:
        raise ValueError(f"purecc_loss needs batched tensors [B, ...], got shape {tuple(v.shape)}")
    if lambda_.shape != (v.shape[0],):
        raise ValueError(f"lambda_ must hold one value per sample, shape ({v.shape[0]},), got {tuple(lambda_.shape)}")
    diff_loss = weighted_mse(v, target, weights)
    pure_target = v_base.float() + expand_sigmas(lambda_.detach(), v.ndim) * delta.detach().float()  # Eq. 13
    pure_loss = weighted_mse(v.float(), pure_target, weights)  # Eq. 14
    return PureCCLoss(total=diff_loss + eta * pure_loss, diff_loss=diff_loss, pure_loss=pure_loss, lambda_=lambda_)
