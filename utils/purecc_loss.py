"""The PureCC stage-2 objective (method.md section 4; PureCC, arXiv 2603.07561, Eqs. 9-12).

    v        trainable model, concept prompt                 (gradient)
    v_base   trainable model, base prompt (or frozen base)   (gradient when it comes from the trainable branch)
    delta    = e_cond - e_uncond, the frozen extractor's implicit guidance for the concept (never gradient)

    L = mse_w(v, target) + eta * mse_w(v, v_base + lambda * delta)     (Eq. 9; + prior term if given)

With output preconditioning on, the caller converts v, v_base, e_cond and e_uncond to x0 space
(x_t - sigma * .) and passes target = x0, so both terms compare like with like. The adaptive lambda* is
unchanged by that conversion (both r and delta scale by -sigma), up to its 1e-8 regulariser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from utils.flow_matching import expand_sigmas, weighted_mse

LAMBDA_MODES = ("adaptive", "fixed")
_PROJECTION_EPS = 1e-8  # keeps lambda* finite (0) when the extractor's direction vanishes


def adaptive_lambda(
    v: torch.Tensor,
    v_base: torch.Tensor,
    delta: torch.Tensor,
    lambda_min: float = 0.0,
    lambda_max: float = 5.0,
) -> torch.Tensor:
    """Per-sample lambda* (Eqs. 10-12): the coefficient of the projection of r = v - v_base onto delta.

    lambda* = argmin_l ||r - l * delta||^2 = <r, delta> / (<delta, delta> + eps), inner products over all
    non-batch elements. It is a scale, not a gradient path, so it is computed on detached tensors (in float32,
    the sums run over whole latents). The clamp is ours (the paper states none): a near-zero delta must not
    blow the target up. Returns a detached float32 tensor [B].
    """
    if not (v.shape == v_base.shape == delta.shape):
        raise ValueError(
            f"adaptive_lambda needs equal shapes, got v {tuple(v.shape)}, v_base {tuple(v_base.shape)}, "
            f"delta {tuple(delta.shape)}"
        )
    if lambda_min > lambda_max:
        raise ValueError(f"lambda_min ({lambda_min}) exceeds lambda_max ({lambda_max})")
    batch = v.shape[0]
    r = (v.detach().float() - v_base.detach().float()).reshape(batch, -1)
    d = delta.detach().float().reshape(batch, -1)
    lam = (r * d).sum(dim=1) / ((d * d).sum(dim=1) + _PROJECTION_EPS)
    return lam.clamp(lambda_min, lambda_max)


@dataclass
class PureCCLoss:
    """The terms of one PureCC step; `total` carries the graph, `lambda_` [B] is detached (log its mean)."""

    total: torch.Tensor
    diff_loss: torch.Tensor
    pure_loss: torch.Tensor
    lambda_: torch.Tensor
    prior_loss: Optional[torch.Tensor] = None


def purecc_loss(
    v: torch.Tensor,
    v_base: torch.Tensor,
    e_cond: torch.Tensor,
    e_uncond: torch.Tensor,
    target: torch.Tensor,
    weights: Optional[torch.Tensor],
    eta: float,
    lambda_mode: str = "adaptive",
    fix_lambda: float = 1.0,
    lambda_min: float = 0.0,
    lambda_max: float = 5.0,
    prior_loss: Optional[torch.Tensor] = None,
    prior_loss_weight: float = 1.0,
) -> PureCCLoss:
    """L = L_diff + eta * L_pure (+ prior_loss_weight * L_prior), the decoupled PureCC objective (Eq. 9).

    L_diff = mse_w(v, target) learns the concept images; L_pure = mse_w(v, v_base + lambda * delta) asks the
    concept-prompt prediction to be the model's own original prediction plus the extractor's concept
    direction, so the concept is learned as an increment instead of overwriting the original behaviour.
    v_base is deliberately not detached: in the paper's trainable original branch it is pulled towards
    v - lambda * delta too; a frozen-branch v_base computed under no_grad simply carries no gradient.
    """
    if lambda_mode not in LAMBDA_MODES:
        raise ValueError(f"lambda_mode must be one of {LAMBDA_MODES}, got {lambda_mode!r}")
    shapes = {"v": v.shape, "v_base": v_base.shape, "e_cond": e_cond.shape, "e_uncond": e_uncond.shape,
              "target": target.shape}
    if len(set(shapes.values())) != 1:
        raise ValueError("purecc_loss needs equal shapes: " + ", ".join(f"{k} {tuple(s)}" for k, s in shapes.items()))
    if v.ndim < 2:
        raise ValueError(f"purecc_loss needs batched tensors [B, ...], got shape {tuple(v.shape)}")

    # The extractor is frozen: cut it out of the graph even if its outputs were produced with grad enabled.
    # float32 because the difference of two close bf16 predictions keeps few significant bits.
    delta = e_cond.detach().float() - e_uncond.detach().float()

    if lambda_mode == "adaptive":
        lam = adaptive_lambda(v, v_base, delta, lambda_min=lambda_min, lambda_max=lambda_max)
    else:
        lam = torch.full((v.shape[0],), float(fix_lambda), device=v.device, dtype=torch.float32)

    diff_loss = weighted_mse(v, target, weights)
    pure_target = v_base.float() + expand_sigmas(lam, v.ndim) * delta
    pure_loss = weighted_mse(v.float(), pure_target, weights)
    total = diff_loss + eta * pure_loss
    if prior_loss is not None:
        total = total + prior_loss_weight * prior_loss
    return PureCCLoss(total=total, diff_loss=diff_loss, pure_loss=pure_loss, lambda_=lam, prior_loss=prior_loss)
