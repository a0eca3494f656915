"""Losses against values computed by hand (math module, not torch)."""

import math

import pytest
import torch

from rlhf.core.losses import bradley_terry_loss, dpo_loss, nll_per_token


def logsig(x):
    return -math.log1p(math.exp(-x))


PC, PR, RC, RR = [-10.0, -20.0], [-12.0, -15.0], [-11.0, -19.0], [-11.5, -16.0]
LC, LR = [5.0, 10.0], [4.0, 8.0]


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def run(loss_type, **kw):
    return dpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type=loss_type,
                    chosen_lengths=t(LC), rejected_lengths=t(LR), **kw)


def test_sigmoid_matches_hand_computed():
    out = run("sigmoid", beta=0.1)
    # pair 0: h = (-10+11) - (-12+11.5) = 1.5 ; pair 1: h = (-20+19) - (-15+16) = -2
    assert out.losses.tolist() == pytest.approx([-logsig(0.15), -logsig(-0.2)], abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, 0.1])


def test_label_smoothing_is_conservative_dpo():
    out = run("sigmoid", beta=0.1, label_smoothing=0.2)
    h = [1.5, -2.0]
    want = [-0.8 * logsig(0.1 * x) - 0.2 * logsig(-0.1 * x) for x in h]
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12)


def test_hinge():
    out = run("hinge", beta=0.5)
    assert out.losses.tolist() == pytest.approx([max(0, 1 - 0.75), max(0, 1 + 1.0)])


def test_ipo_length_normalised():
    out = run("ipo", beta=0.1)
    # pair 0: (1/5 - (-0.5)/4) - 5 ; pair 1: (-1/10 - 1/8) - 5
    want = [(0.2 + 0.125 - 5) ** 2, (-0.1 - 0.125 - 5) ** 2]
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12)


def test_simpo_is_reference_free():
    out = dpo_loss(t(PC), t(PR), None, None, loss_type="simpo", beta=2.0, simpo_gamma=0.5,
                   chosen_lengths=t(LC), rejected_lengths=t(LR))
    h = [-10 / 5 - (-12 / 4) - 0.5, -20 / 10 - (-15 / 8) - 0.5]
    assert out.losses.tolist() == pytest.approx([-logsig(2 * x) for x in h], abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([2 * -2.0, 2 * -2.0])


def test_nll_per_token():
    assert nll_per_token(t(PC), t(LC)).tolist() == pytest.approx([2.0, 2.0])


def test_reference_required_and_unknown_type():
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(t(PC), t(PR), None, None, loss_type="sigmoid")
    with pytest.raises(ValueError, match="unknown"):
        run("nope")


def test_gradient_flows_to_policy_only():
    pc, pr = t(PC).requires_grad_(), t(PR).requires_grad_()
    out = dpo_loss(pc, pr, t(RC), t(RR), beta=0.1)
    out.losses.sum().backward()
    # d/dpc of -log sigma(beta h) = -beta * sigma(-beta h)
    assert pc.grad.tolist() == pytest.approx(
        [-0.1 / (1 + math.exp(0.15)), -0.1 / (1 + math.exp(-0.2))])
    assert not out.chosen_rewards.requires_grad


def test_bradley_terry_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # h = (1, -1): log(1 + e^-1) = 0.3132617, log(1 + e) = 1.3132617
    assert bradley_terry_loss(rc, rr).tolist() == pytest.approx([0.3132617, 1.3132617], abs=1e-6)
    # margin 0.5 on the first pair: h = 0.5 -> log(1 + e^-0.5) = 0.4740770
    got = bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 0.0]))
    assert got.tolist() == pytest.approx([0.4740770, 1.3132617], abs=1e-6)
    # centering 0.01 * (rc + rr)^2 = 0.09 and 0.01
    got = bradley_terry_loss(rc, rr, center_coefficient=0.01)
    assert got.tolist() == pytest.approx([0.4032617, 1.3232617], abs=1e-6)


def test_bradley_terry_gradient_pushes_scores_apart():
    rc = torch.zeros(3, requires_grad=True)
    rr = torch.zeros(3, requires_grad=True)
    bradley_terry_loss(rc, rr).mean().backward()
    # d/dh of -log sigma(h) at 0 is -1/2, over B = 3
    assert torch.allclose(rc.grad, torch.full((3,), -1 / 6))
    assert torch.allclose(rr.grad, torch.full((3,), 1 / 6))
