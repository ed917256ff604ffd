"""utils/flow_matching.py against values worked out by hand (docs/method.md section 3)."""

import math
from types import SimpleNamespace

import pytest
import torch

from utils.flow_matching import (
    Noised,
    add_noise,
    encode_latents,
    expand_sigmas,
    flow_matching_loss,
    latents_from_distribution,
    loss_weights,
    noisy_latents,
    precondition_to_x0,
    sample_timesteps,
    timestep_indices,
    velocity_target,
    weighted_mse,
)

SHAPE = (2, 2, 3, 3)


def _rand(seed, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _hand_weighted_mse(pred, target, w):
    """mean_b [ mean_i w_b * (pred - target)^2 ] with plain Python loops and floats."""
    batch = pred.shape[0]
    total = 0.0
    for b in range(batch):
        p, t = pred[b].flatten().tolist(), target[b].flatten().tolist()
        acc = 0.0
        for pi, ti in zip(p, t):
            acc += float(w[b]) * (pi - ti) ** 2
        total += acc / len(p)
    return total / batch


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


# ---- forward process -----------------------------------------------------------------------------------------

def test_expand_sigmas_shapes():
    s = torch.tensor([0.1, 0.7])
    assert expand_sigmas(s, 4).shape == (2, 1, 1, 1)
    assert expand_sigmas(s.reshape(2, 1, 1, 1), 4).shape == (2, 1, 1, 1)
    assert expand_sigmas(s, 3).shape == (2, 1, 1)
    with pytest.raises(ValueError):
        expand_sigmas(torch.zeros(2, 3), 4)


def test_noisy_latents_endpoints_and_midpoint():
    x0, noise = _rand(0), _rand(1)
    x_t = noisy_latents(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(x_t[0], x0[0])  # sigma 0: clean latent
    assert torch.equal(x_t[1], noise[1])  # sigma 1: pure noise
    x_t = noisy_latents(x0, noise, torch.tensor([0.25, 0.5]))
    for b, s in enumerate([0.25, 0.5]):
        for a, n, got in zip(x0[b].flatten().tolist(), noise[b].flatten().tolist(), x_t[b].flatten().tolist()):
            assert got == pytest.approx((1 - s) * a + s * n, abs=1e-6)


def test_velocity_target_and_precondition_recovers_x0():
    x0, noise = _rand(0, dtype=torch.float64), _rand(1, dtype=torch.float64)
    sigmas = torch.tensor([0.3, 0.9], dtype=torch.float64)
    u = velocity_target(x0, noise)
    assert torch.equal(u, noise - x0)
    x_t = noisy_latents(x0, noise, sigmas)
    torch.testing.assert_close(precondition_to_x0(u, x_t, sigmas), x0, rtol=0, atol=1e-12)
    # a wrong velocity must not recover x0
    assert not torch.allclose(precondition_to_x0(u + 0.1, x_t, sigmas), x0)


# ---- loss weights and the weighted MSE ----------------------------------------------------------------------

def test_loss_weights_by_hand():
    sigmas = torch.tensor([0.2, 0.8])
    w = loss_weights("sigma_sqrt", sigmas)
    assert w.shape == (2, 1, 1, 1)
    assert w.flatten().tolist() == pytest.approx([1 / 0.2**2, 1 / 0.8**2], rel=1e-6)
    w = loss_weights("cosmap", sigmas, ndim=3)
    assert w.shape == (2, 1, 1)
    assert w.flatten().tolist() == pytest.approx([2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.2, 0.8)],
                                                 rel=1e-6)
    for scheme in ("logit_normal", "mode", "none"):
        assert loss_weights(scheme, sigmas).flatten().tolist() == [1.0, 1.0]


def test_weighted_mse_by_hand_and_weights_matter():
    pred, target = _rand(2), _rand(3)
    w = torch.tensor([0.2, 3.0])
    got = weighted_mse(pred, target, w.reshape(2, 1, 1, 1))
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(_hand_weighted_mse(pred, target, [0.2, 3.0]), rel=1e-5)
    # a [B] weight vector is the same thing
    assert weighted_mse(pred, target, w).item() == pytest.approx(got.item(), rel=1e-6)
    uniform = weighted_mse(pred, target, torch.ones(2))
    assert uniform.item() == pytest.approx(_hand_weighted_mse(pred, target, [1.0, 1.0]), rel=1e-5)
    assert abs(uniform.item() - got.item()) > 1e-3
    assert weighted_mse(pred, target, None).item() == pytest.approx(uniform.item(), rel=1e-6)


def test_weighted_mse_rejects_bad_shapes():
    with pytest.raises(ValueError):
        weighted_mse(_rand(0), _rand(1, shape=(2, 2, 3, 4)), None)
    with pytest.raises(ValueError):
        weighted_mse(_rand(0), _rand(1), torch.ones(3))


def test_weighted_mse_upcasts_bf16():
    pred, target = _rand(4), _rand(5)
    w = torch.tensor([0.5, 2.0])
    p16, t16 = pred.bfloat16(), target.bfloat16()
    got = weighted_mse(p16, t16, w.bfloat16())
    assert got.dtype == torch.float32
    # computed in fp32 from the bf16 values: matches the hand value of those values almost exactly...
    assert got.item() == pytest.approx(_hand_weighted_mse(p16.float(), t16.float(), [0.5, 2.0]), rel=1e-5)
    # ...and is close to the fp32 loss of the unrounded tensors
    assert got.item() == pytest.approx(weighted_mse(pred, target, w).item(), rel=2e-2)


def _noised(x0, noise, sigmas, weights):
    return Noised(x0=x0, noise=noise, x_t=noisy_latents(x0, noise, sigmas), timesteps=sigmas * 1000, sigmas=sigmas,
                  weights=weights)


def test_flow_matching_loss_both_spaces():
    x0, noise, pred = _rand(6), _rand(7), _rand(8)
    sigmas = torch.tensor([0.25, 0.75])
    w = torch.tensor([1.5, 0.5])
    noised = _noised(x0, noise, sigmas, w)
    x_t = noised.x_t
    got_v = flow_matching_loss(pred, noised, precondition_outputs=False)
    assert got_v.item() == pytest.approx(_hand_weighted_mse(pred, noise - x0, [1.5, 0.5]), rel=1e-5)
    got_x0 = flow_matching_loss(pred, noised, precondition_outputs=True)
    x0_hat = torch.stack([x_t[b] - s * pred[b] for b, s in enumerate([0.25, 0.75])])
    assert got_x0.item() == pytest.approx(_hand_weighted_mse(x0_hat, x0, [1.5, 0.5]), rel=1e-5)
    assert abs(got_v.item() - got_x0.item()) > 1e-3
    # the true velocity has zero loss in both spaces
    u = noise - x0
    assert flow_matching_loss(u, noised, False).item() == 0.0
    assert flow_matching_loss(u, noised, True).item() == pytest.approx(0.0, abs=1e-12)


def test_add_noise_draws_noise_then_timesteps_from_the_generator(scheduler):
    """Algorithm 1 lines 9-10 as one helper: noise first, then the timestep draw, from the one generator; x_t, the
    sigmas and the weights follow by hand."""
    args = SimpleNamespace(weighting_scheme="sigma_sqrt", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    x0 = _rand(11)
    noised = add_noise(x0, scheduler, args, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=g)
    t, s = sample_timesteps(scheduler, 2, "sigma_sqrt", 0.0, 1.0, 1.29, "cpu", generator=g)
    assert torch.equal(noised.noise, noise) and torch.equal(noised.timesteps, t) and torch.equal(noised.sigmas, s)
    for b in range(2):
        torch.testing.assert_close(noised.x_t[b], (1 - s[b]) * x0[b] + s[b] * noise[b])
        assert noised.weights[b].item() == pytest.approx(1.0 / s[b].item() ** 2, rel=1e-5)  # sigma_sqrt: 1/sigma^2
    again = add_noise(x0, scheduler, args, torch.Generator().manual_seed(5))
    assert torch.equal(again.x_t, noised.x_t)
    x_t2, t2 = noised.repeat(2)
    assert x_t2.shape == (4, *SHAPE[1:]) and torch.equal(x_t2[2:], noised.x_t) and torch.equal(t2[2:], t)


# ---- timestep sampling ------------------------------------------------------------------------------------------

def test_timestep_indices_clamped():
    u = torch.tensor([-0.1, 0.0, 0.5, 0.9999, 1.0, 1.3])
    assert timestep_indices(u, 1000).tolist() == [0, 0, 500, 999, 999, 999]


def _hand_sigma(index, shift=3.0, n=1000):
    """Training schedule of FlowMatchEulerDiscreteScheduler: t = n - index, sigma = shift*s/(1+(shift-1)*s)."""
    s = (n - index) / n
    return shift * s / (1 + (shift - 1) * s)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none", "sigma_sqrt", "cosmap"])
def test_sample_timesteps_training_sigmas(scheduler, scheme):
    kwargs = dict(weighting_scheme=scheme, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, device="cpu")
    t, s = sample_timesteps(scheduler, 64, generator=torch.Generator().manual_seed(0), **kwargs)
    assert t.shape == (64,) and s.shape == (64,)
    # the same draw by hand: u from the same seeded stream, index = floor(u * 1000)
    g = torch.Generator().manual_seed(0)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(0.0, 1.0, size=(64,), generator=g))
    elif scheme == "mode":
        r = torch.rand(64, generator=g)
        u = 1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    else:
        u = torch.rand(64, generator=g)
    for i in range(64):
        idx = min(max(int(u[i].item() * 1000), 0), 999)
        assert t[i].item() == pytest.approx(scheduler.timesteps[idx].item(), abs=1e-3)
        assert s[i].item() == pytest.approx(_hand_sigma(idx), abs=1e-6)
        # sigma is the scheduler's sigma at that timestep
        j = int(torch.nonzero(scheduler.timesteps == t[i])[0])
        assert s[i].item() == scheduler.sigmas[j].item()
    assert 0 < s.min().item() and s.max().item() <= 1.0
    # reproducible with the same seed, different with another
    t2, s2 = sample_timesteps(scheduler, 64, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(t, t2) and torch.equal(s, s2)
    t3, _ = sample_timesteps(scheduler, 64, generator=torch.Generator().manual_seed(1), **kwargs)
    assert not torch.equal(t, t3)


def test_sample_timesteps_rejects_inference_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(28)
    with pytest.raises(ValueError, match="set_timesteps"):
        sample_timesteps(sched, 4, "logit_normal", 0.0, 1.0, 1.29, "cpu")


# ---- latents -----------------------------------------------------------------------------------------------------

class _FakeDist:
    def __init__(self, value):
        self.value = value

    def sample(self, generator=None):
        return self.value


class _FakeVAE:
    dtype = torch.float32

    def __init__(self, latent, config):
        self.latent, self.config = latent, config

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=_FakeDist(self.latent))


def test_encode_latents_shift_and_scale():
    z = _rand(9)
    got = encode_latents(_FakeVAE(z, {"shift_factor": 0.0609, "scaling_factor": 1.5305}), torch.zeros(2, 3, 8, 8))
    for a, b in zip(z.flatten().tolist(), got.flatten().tolist()):
        assert b == pytest.approx((a - 0.0609) * 1.5305, abs=1e-6)
    got = encode_latents(_FakeVAE(z, {"shift_factor": None, "scaling_factor": 0.5}), torch.zeros(2, 3, 8, 8))
    assert torch.equal(got, z * 0.5)


def test_latents_from_cached_distribution():
    mean, logvar = _rand(10), torch.full(SHAPE, -2.0)
    params = torch.cat([mean, logvar], dim=1)
    cfg = SimpleNamespace(shift_factor=0.1, scaling_factor=2.0)
    a = latents_from_distribution(params, cfg, generator=torch.Generator().manual_seed(0))
    b = latents_from_distribution(params, cfg, generator=torch.Generator().manual_seed(0))
    c = latents_from_distribution(params, cfg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)  # sampled each step, reproducibly
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    expected = (mean + math.exp(-1.0) * eps - 0.1) * 2.0
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-5)
