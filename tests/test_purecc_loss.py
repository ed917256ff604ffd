"""utils/purecc_loss.py (PureCC lambda* Eqs. 10-12, target Eq. 13, loss Eqs. 14-15) against values worked out by
hand."""

import pytest
import torch

from utils.purecc_loss import (PureCCLoss, adaptive_lambda, clamped_fractions, extractor_delta, purecc_lambda,
                               purecc_loss)

SHAPE = (3, 2, 2, 3)  # B = 3, 12 elements per sample
B, N = 3, 12
W = [0.5, 1.0, 2.5]


def _rand(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _inputs(requires_grad=False):
    v, v_base, e_cond, e_uncond, target = (_rand(s) for s in range(5))
    if requires_grad:
        for t in (v, v_base, e_cond, e_uncond):
            t.requires_grad_(True)
    return v, v_base, e_cond, e_uncond, target


def _weights():
    return torch.tensor(W).reshape(B, 1, 1, 1)


def _flat(t, b):
    return t[b].detach().flatten().tolist()


def _hand_mse(a_rows, b_rows, w):
    """mean over samples of mean over elements of w_b * (a - b)^2, from lists of per-sample lists."""
    total = 0.0
    for b, (ar, br) in enumerate(zip(a_rows, b_rows)):
        total += sum(w[b] * (x - y) ** 2 for x, y in zip(ar, br)) / len(ar)
    return total / len(a_rows)


def _hand_lambda(v, v_base, delta_rows, lo, hi):
    lams = []
    for b in range(B):
        r = [x - y for x, y in zip(_flat(v, b), _flat(v_base, b))]
        d = delta_rows[b]
        num = sum(x * y for x, y in zip(r, d))
        den = sum(y * y for y in d) + 1e-8
        lams.append(min(max(num / den, lo), hi))
    return lams


def _step(v, v_base, e_cond, e_uncond, target, weights, eta, lambda_mode="adaptive", fix_lambda=1.0, lambda_min=0.0,
          lambda_max=5.0):
    """The loss part of a stage-2 step: delta, lambda (Eqs. 10-12), then Eqs. 13-15."""
    delta = extractor_delta(e_cond, e_uncond)
    lam = purecc_lambda(lambda_mode, v, v_base, delta, fix_lambda, lambda_min, lambda_max)
    return purecc_loss(v, v_base, delta, target, weights, eta, lam)


def _hand_terms(v, v_base, e_cond, e_uncond, target, lams):
    delta = [[c - u for c, u in zip(_flat(e_cond, b), _flat(e_uncond, b))] for b in range(B)]
    v_rows = [_flat(v, b) for b in range(B)]
    pure_target = [[vb + lams[b] * d for vb, d in zip(_flat(v_base, b), delta[b])] for b in range(B)]
    diff = _hand_mse(v_rows, [_flat(target, b) for b in range(B)], W)
    pure = _hand_mse(v_rows, pure_target, W)
    return diff, pure


# ---- fixed and adaptive lambda: totals by hand ----------------------------------------------------------------

def test_fixed_lambda_terms_by_hand():
    v, v_base, e_cond, e_uncond, target = _inputs()
    out = _step(v, v_base, e_cond, e_uncond, target, _weights(), eta=2.0, lambda_mode="fixed", fix_lambda=0.7)
    assert isinstance(out, PureCCLoss)
    assert torch.equal(out.lambda_, torch.full((B,), 0.7))  # exactly fix_lambda per sample
    diff, pure = _hand_terms(v, v_base, e_cond, e_uncond, target, [0.7] * B)
    assert out.diff_loss.item() == pytest.approx(diff, rel=1e-5)
    assert out.pure_loss.item() == pytest.approx(pure, rel=1e-5)
    assert out.total.item() == pytest.approx(diff + 2.0 * pure, rel=1e-5)


def test_adaptive_lambda_terms_by_hand():
    v, v_base, e_cond, e_uncond, target = _inputs()
    # put a known component along delta into r so lambda* lands inside (0, 5) for each sample
    delta = e_cond - e_uncond
    v = v_base + torch.tensor([0.3, 1.2, 2.0]).reshape(B, 1, 1, 1) * delta + 0.2 * _rand(9)
    out = _step(v, v_base, e_cond, e_uncond, target, _weights(), eta=1.5)
    delta_rows = [_flat(delta, b) for b in range(B)]
    lams = _hand_lambda(v, v_base, delta_rows, 0.0, 5.0)
    assert all(0.0 < lam < 5.0 for lam in lams)  # the clamp does not hide anything here
    assert out.lambda_.tolist() == pytest.approx(lams, rel=1e-5)
    diff, pure = _hand_terms(v, v_base, e_cond, e_uncond, target, lams)
    assert out.diff_loss.item() == pytest.approx(diff, rel=1e-5)
    assert out.pure_loss.item() == pytest.approx(pure, rel=1e-5)
    assert out.total.item() == pytest.approx(diff + 1.5 * pure, rel=1e-5)


def test_clamped_fractions_count_samples_at_each_bound():
    v_base, delta = _rand(0), _rand(1)
    v = v_base + torch.tensor([-1.0, 10.0, 2.0]).reshape(B, 1, 1, 1) * delta  # projections -1, 10, 2
    lam = adaptive_lambda(v, v_base, delta)  # clamped to [0, 5]: one sample at each bound
    assert clamped_fractions("adaptive", lam, 0.0, 5.0) == pytest.approx((1 / 3, 1 / 3))
    lam = adaptive_lambda(v, v_base, delta, float("-inf"), float("inf"))  # Eq. 12 as written: nothing clamps
    assert lam.tolist() == pytest.approx([-1.0, 10.0, 2.0], rel=1e-5)
    assert clamped_fractions("adaptive", lam, float("-inf"), float("inf")) == (0.0, 0.0)
    fixed = purecc_lambda("fixed", v, v_base, delta, fix_lambda=7.0)  # outside [0, 5], yet never clamped
    assert fixed.tolist() == [7.0] * B and clamped_fractions("fixed", fixed, 0.0, 5.0) == (0.0, 0.0)


def test_extractor_delta_is_detached_float32_difference():
    e_cond, e_uncond = _rand(3).bfloat16().requires_grad_(True), _rand(4).bfloat16()
    delta = extractor_delta(e_cond, e_uncond)
    assert delta.dtype == torch.float32 and not delta.requires_grad
    assert torch.equal(delta, e_cond.detach().float() - e_uncond.float())
    with pytest.raises(ValueError, match="shape"):
        extractor_delta(e_cond, e_uncond[:1])


def test_eta_zero_is_flow_matching_loss():
    v, v_base, e_cond, e_uncond, target = _inputs()
    out = _step(v, v_base, e_cond, e_uncond, target, _weights(), eta=0.0)
    hand = _hand_mse([_flat(v, b) for b in range(B)], [_flat(target, b) for b in range(B)], W)
    assert out.total.item() == pytest.approx(hand, rel=1e-5)
    assert torch.equal(out.total, out.diff_loss)
    assert out.pure_loss.item() > 0  # still reported


def test_weights_are_applied():
    v, v_base, e_cond, e_uncond, target = _inputs()
    uniform = _step(v, v_base, e_cond, e_uncond, target, torch.ones(B), eta=2.0, lambda_mode="fixed")
    weighted = _step(v, v_base, e_cond, e_uncond, target, _weights(), eta=2.0, lambda_mode="fixed")
    delta = [[c - u for c, u in zip(_flat(e_cond, b), _flat(e_uncond, b))] for b in range(B)]
    v_rows = [_flat(v, b) for b in range(B)]
    t_rows = [_flat(target, b) for b in range(B)]
    pure_target = [[vb + 1.0 * d for vb, d in zip(_flat(v_base, b), delta[b])] for b in range(B)]
    for out, w in ((uniform, [1.0] * B), (weighted, W)):
        hand = _hand_mse(v_rows, t_rows, w) + 2.0 * _hand_mse(v_rows, pure_target, w)
        assert out.total.item() == pytest.approx(hand, rel=1e-5)
    assert abs(uniform.total.item() - weighted.total.item()) > 1e-2


# ---- adaptive lambda itself -----------------------------------------------------------------------------------

def test_adaptive_lambda_is_per_sample_projection():
    v, v_base, delta = _rand(0), _rand(1), _rand(2)
    lam = adaptive_lambda(v, v_base, delta, lambda_min=-100.0, lambda_max=100.0)
    assert lam.shape == (B,) and lam.dtype == torch.float32
    for b in range(B):
        r, d = (v[b] - v_base[b]).flatten(), delta[b].flatten()
        expected = torch.dot(r, d) / (torch.dot(d, d) + 1e-8)
        assert lam[b].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
        # it minimises ||r - l * delta||^2: the residual is orthogonal to delta
        assert torch.dot(r - lam[b] * d, d).item() == pytest.approx(0.0, abs=1e-4)


def test_adaptive_lambda_detached_even_with_grad_inputs():
    v, v_base, e_cond, e_uncond, target = _inputs(requires_grad=True)
    lam = adaptive_lambda(v, v_base, e_cond - e_uncond)
    assert not lam.requires_grad and lam.grad_fn is None
    # a lambda that does carry a graph is still used as a constant by the loss
    out = purecc_loss(v, v_base, extractor_delta(e_cond, e_uncond), target, _weights(), 2.0, lam * v.sum() / v.sum())
    out.total.backward()
    assert e_cond.grad is None and v.grad is not None
    v.grad = v_base.grad = None
    out = _step(v, v_base, e_cond, e_uncond, target, _weights(), eta=2.0)
    assert not out.lambda_.requires_grad
    assert out.total.requires_grad


def test_adaptive_lambda_clamp():
    v_base, delta = _rand(0), _rand(1)
    scale = torch.tensor([-1.0, 10.0, 2.0]).reshape(B, 1, 1, 1)
    v = v_base + scale * delta  # exact projections -1, 10, 2
    assert adaptive_lambda(v, v_base, delta).tolist() == pytest.approx([0.0, 5.0, 2.0], rel=1e-5)
    assert adaptive_lambda(v, v_base, delta, lambda_min=-2.0, lambda_max=3.0).tolist() == pytest.approx(
        [-1.0, 3.0, 2.0], rel=1e-5)
    with pytest.raises(ValueError):
        adaptive_lambda(v, v_base, delta, lambda_min=1.0, lambda_max=0.0)


def test_zero_delta_gives_zero_lambda():
    v, v_base, _, _, target = _inputs()
    e = _rand(7)
    out = _step(v, v_base, e, e.clone(), target, _weights(), eta=2.0)
    assert torch.equal(out.lambda_, torch.zeros(B))
    assert torch.isfinite(out.total)
    # with delta = 0 the pure target is v_base itself
    hand = _hand_mse([_flat(v, b) for b in range(B)], [_flat(v_base, b) for b in range(B)], W)
    assert out.pure_loss.item() == pytest.approx(hand, rel=1e-5)


def test_lambda_invariant_under_x0_preconditioning():
    # with --precondition_outputs the caller passes x_t - sigma * (.) for every prediction: r and delta both
    # scale by -sigma, so lambda* is unchanged
    v, v_base, delta, x_t = _rand(0), _rand(1), _rand(2), _rand(3)
    s = torch.tensor([0.2, 0.5, 0.9]).reshape(B, 1, 1, 1)
    lam_v = adaptive_lambda(v, v_base, delta, -100.0, 100.0)
    lam_x0 = adaptive_lambda(x_t - s * v, x_t - s * v_base, -s * delta, -100.0, 100.0)
    torch.testing.assert_close(lam_x0, lam_v, rtol=1e-4, atol=1e-5)


# ---- gradients --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
def test_gradients_reach_v_and_v_base_never_extractor(mode):
    v, v_base, e_cond, e_uncond, target = _inputs(requires_grad=True)
    eta = 2.0
    out = _step(v, v_base, e_cond, e_uncond, target, _weights(), eta=eta, lambda_mode=mode, fix_lambda=0.8)
    out.total.backward()
    assert e_cond.grad is None and e_uncond.grad is None
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert v_base.grad is not None and v_base.grad.abs().sum() > 0
    # analytic gradient with lambda a constant (it is detached):
    #   dL/dv      = 2 w_b / N / B * [(v - target) + eta * (v - v_base - lambda_b * delta)]
    #   dL/dv_base = -2 w_b / N / B * eta * (v - v_base - lambda_b * delta)
    lam = out.lambda_.tolist()
    for b in range(B):
        c = 2 * W[b] / N / B
        vb, vbb, tb = _flat(v, b), _flat(v_base, b), _flat(target, b)
        db = [x - y for x, y in zip(_flat(e_cond, b), _flat(e_uncond, b))]
        res = [x - y - lam[b] * d for x, y, d in zip(vb, vbb, db)]
        gv = [c * ((x - t) + eta * r) for x, t, r in zip(vb, tb, res)]
        gvb = [-c * eta * r for r in res]
        assert v.grad[b].flatten().tolist() == pytest.approx(gv, rel=1e-4, abs=1e-7)
        assert v_base.grad[b].flatten().tolist() == pytest.approx(gvb, rel=1e-4, abs=1e-7)


def test_frozen_branch_v_base_without_grad():
    v, v_base, e_cond, e_uncond, target = _inputs()
    v.requires_grad_(True)  # v_base from a no-grad frozen pass
    _step(v, v_base, e_cond, e_uncond, target, _weights(), eta=2.0).total.backward()
    assert v.grad is not None and v_base.grad is None


# ---- validation ----------------------------------------------------------------------------------------------

def test_rejects_bad_mode_and_shapes():
    v, v_base, e_cond, e_uncond, target = _inputs()
    with pytest.raises(ValueError, match="lambda_mode"):
        _step(v, v_base, e_cond, e_uncond, target, _weights(), eta=2.0, lambda_mode="adptive")
    with pytest.raises(ValueError, match="shapes"):
        _step(v, v_base[:, :1], e_cond, e_uncond, target, _weights(), eta=2.0, lambda_mode="fixed")
    with pytest.raises(ValueError):
        _step(v, v_base, e_cond, e_uncond, target, torch.ones(2), eta=2.0)
    with pytest.raises(ValueError, match="one value per sample"):
        purecc_loss(v, v_base, e_cond - e_uncond, target, _weights(), 2.0, torch.ones(2))


def test_bf16_inputs_give_float32_losses():
    v, v_base, e_cond, e_uncond, target = (t.bfloat16() for t in _inputs())
    out = _step(v, v_base, e_cond, e_uncond, target, _weights(), eta=2.0)
    assert out.total.dtype == torch.float32 and out.lambda_.dtype == torch.float32
    ref = _step(*(t.float() for t in (v, v_base, e_cond, e_uncond, target)), _weights(), eta=2.0)
    assert out.total.item() == pytest.approx(ref.total.item(), rel=1e-2)
