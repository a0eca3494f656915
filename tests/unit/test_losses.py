"""Losses against values computed by hand (math module, not torch)."""

import math

import pytest
import torch

from rlhf.core.logprobs import ld_sums
from rlhf.core.losses import (bradley_terry_loss, dpo_loss, f_divergence_score, kl_reference_point,
                               kto_loss, nll_per_token, reference_free_loss, sft_weight)


def logsig(x):
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1 / (1 + math.exp(-x))


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


# With PC, PR, RC, RR above: log-ratios chosen (1, -1), rejected (-0.5, 1); policy
# margins pc - pr (2, -5), reference margins (0.5, -3).
CR, RJ = [1.0, -1.0], [-0.5, 1.0]


@pytest.mark.parametrize("kind,beta,kw,want", [
    ("nca_pair", 0.1, {}, [-logsig(0.1 * c) - 0.5 * logsig(-0.1 * c) - 0.5 * logsig(-0.1 * r)
                           for c, r in zip(CR, RJ)]),
    ("bco_pair", 0.1, {}, [-logsig(0.1 * c) - logsig(-0.1 * r) for c, r in zip(CR, RJ)]),
    ("sppo_hard", 0.1, {}, [(1 - 5) ** 2 + (-0.5 + 5) ** 2, (-1 - 5) ** 2 + (1 + 5) ** 2]),
    ("apo_zero", 0.1, {}, [1 - sig(0.1 * c) + sig(0.1 * r) for c, r in zip(CR, RJ)]),
    ("apo_down", 0.1, {}, [sig(0.1 * c) + 1 - sig(0.1 * (c - r)) for c, r in zip(CR, RJ)]),
    ("robust", 0.1, {"label_smoothing": 0.1},
     [(-0.9 * logsig(0.1 * h) + 0.1 * logsig(-0.1 * h)) / 0.8 for h in (1.5, -2.0)]),
    ("exo_pair", 0.1, {"label_smoothing": 0.01},
     [sig(0.1 * h) * (logsig(0.1 * h) - math.log(0.99))
      + sig(-0.1 * h) * (logsig(-0.1 * h) - math.log(0.01)) for h in (1.5, -2.0)]),
    # aot: sorted policy margins (-5, 2) minus sorted reference margins (-3, 0.5)
    ("aot", 0.1, {}, [-logsig(0.1 * -2.0), -logsig(0.1 * 1.5)]),
    # aot_unpaired: sorted chosen ratios (-1, 1) minus sorted rejected ratios (-0.5, 1)
    ("aot_unpaired", 0.1, {}, [-logsig(0.1 * -0.5), -logsig(0.0)]),
    ("discopop", 0.1, {"discopop_tau": 0.05},
     [-logsig(0.1 * h) * (1 - sig(0.1 * h / 0.05)) + math.exp(-0.1 * h) * sig(0.1 * h / 0.05)
      for h in (1.5, -2.0)]),
    # per-token scores: 1/5 - (-0.5)/4 and -1/10 - 1/8
    ("sigmoid_norm", 0.1, {}, [-logsig(0.1 * 0.325), -logsig(0.1 * -0.225)]),
])
def test_dpo_family_by_hand(kind, beta, kw, want):
    out = run(kind, beta=beta, **kw)
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * c for c in CR])
    assert out.nll_weight == 0.0


def test_weighted_mix_and_sft_weight():
    # MPO (Wang et al. 2024): 0.8 sigmoid + 0.2 bco_pair; sft comes back as the NLL weight
    out = run(["sigmoid", "bco_pair", "sft"], beta=0.1, weights=[0.8, 0.2, 1.5])
    want = [0.8 * -logsig(0.1 * h) + 0.2 * (-logsig(0.1 * c) - logsig(-0.1 * r))
            for h, c, r in zip((1.5, -2.0), CR, RJ)]
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12)
    assert out.nll_weight == 1.5
    assert sft_weight(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.5]) == 1.5
    assert sft_weight(["sigmoid", "sft"]) == 1.0 and sft_weight("sigmoid") == 0.0
    with pytest.raises(ValueError, match="2 loss types and 1 weights"):
        run(["sigmoid", "ipo"], weights=[1.0])


def test_f_divergences_by_hand():
    r = t([1.0, -0.5])
    assert f_divergence_score(r, "forward_kl").tolist() == pytest.approx(
        [1 - math.exp(-1), 1 - math.exp(0.5)], abs=1e-12)
    assert f_divergence_score(r, "js_divergence").tolist() == pytest.approx(
        [math.log(2) + logsig(1.0), math.log(2) + logsig(-0.5)], abs=1e-12)
    assert f_divergence_score(r, "alpha_divergence", 0.5).tolist() == pytest.approx(
        [(math.exp(-0.5) - 1) / -0.5, (math.exp(0.25) - 1) / -0.5], abs=1e-12)
    assert f_divergence_score(r, "alpha_divergence", 1.0).tolist() == [1.0, -0.5]
    out = run("sigmoid", beta=0.1, f_divergence="forward_kl")
    h0 = (1 - math.exp(-1.0)) - (1 - math.exp(0.5))
    assert out.losses[0].item() == pytest.approx(-logsig(0.1 * h0), abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1])  # still log-ratios
    with pytest.raises(ValueError, match="f_divergence=js_divergence applies to"):
        run("bco_pair", f_divergence="js_divergence")


def test_reference_free_family_by_hand():
    kw = dict(beta=0.1, chosen_lengths=t(LC), rejected_lengths=t(LR))
    # cpo on sums: h = -10 - (-12) = 2 and -20 - (-15) = -5
    out = reference_free_loss(t(PC), t(PR), loss_type="cpo", **kw)
    assert out.losses.tolist() == pytest.approx([-logsig(0.2), -logsig(-0.5)], abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([-1.0, -2.0])
    out = reference_free_loss(t(PC), t(PR), loss_type="cpo_hinge", **kw)
    assert out.losses.tolist() == pytest.approx([0.8, 1.5], abs=1e-12)
    # cpo_ipo on per-token means: -2 - (-3) = 1 and -2 - (-1.875) = -0.125
    out = reference_free_loss(t(PC), t(PR), loss_type="cpo_ipo", **kw)
    assert out.losses.tolist() == pytest.approx([(1 - 5) ** 2, (-0.125 - 5) ** 2], abs=1e-12)
    # orpo: log odds of per-token means a: (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))
    out = reference_free_loss(t(PC), t(PR), loss_type="orpo", **kw)
    want = [-0.1 * logsig((c - r) - (math.log1p(-math.exp(c)) - math.log1p(-math.exp(r))))
            for c, r in ((-2.0, -3.0), (-2.0, -1.875))]
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12)
    # AlphaPO on cpo: log p -> (1 - p^-a) / a, finite even where p underflows (sum -200)
    out = reference_free_loss(t([-200.0]), t([-210.0]), loss_type="cpo", alphapo=0.5, beta=0.1)
    h = (1 - math.exp(100)) / 0.5 - (1 - math.exp(105)) / 0.5
    assert out.losses.tolist() == pytest.approx([-logsig(0.1 * h)], rel=1e-9)
    with pytest.raises(ValueError, match="stands alone"):
        dpo_loss(t(PC), t(PR), None, None, loss_type=["orpo", "sft"])
    with pytest.raises(ValueError, match="label_smoothing > 0"):
        run("exo_pair")


def test_ld_sums_weights_the_longer_tail():
    # one pair: chosen tokens (a, b, c), rejected (d, e); alpha 0.5 weights c by half
    per_token = t([-1.0, -2.0, -4.0, -8.0, -16.0])
    seq = torch.tensor([0, 0, 0, 1, 1])
    sums, counts = ld_sums(per_token, seq, 2, 0.5)
    assert sums.tolist() == [-1 - 2 - 0.5 * 4, -8 - 16] and counts.tolist() == [3, 2]
    assert ld_sums(per_token, seq, 2, 1.0)[0].tolist() == [-7.0, -24.0]
    # a packed batch interleaves the sequences: the same sums
    mixed = torch.tensor([0, 3, 1, 4, 2])  # a, d, b, e, c
    sums, counts = ld_sums(per_token[mixed], seq[mixed], 2, 0.5)
    assert sums.tolist() == [-1 - 2 - 0.5 * 4, -8 - 16] and counts.tolist() == [3, 2]


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


def test_kto_by_hand():
    # r = policy - ref: 1.0 (desirable), -2.0 (undesirable), 0.5 (undesirable); z0 = 0.3
    pol, ref = t([-10.0, -14.0, -9.5]), t([-11.0, -12.0, -10.0])
    up = torch.tensor([True, False, False])
    out = kto_loss(pol, ref, up, 0.3, beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    want = [1 - sig(0.1 * (1.0 - 0.3)), 1.5 * (1 - sig(0.1 * (0.3 + 2.0))),
            1.5 * (1 - sig(0.1 * (0.3 - 0.5)))]
    assert out.losses.tolist() == pytest.approx(want, abs=1e-12)
    assert out.rewards.tolist() == pytest.approx([0.1, -0.2, 0.05])
    out = kto_loss(pol, ref, up, 0.3, loss_type="apo_zero_unpaired", beta=0.1)
    assert out.losses.tolist() == pytest.approx(
        [1 - sig(0.1), sig(-0.2), sig(0.05)], abs=1e-12)  # no z0
    # the reference point: the mean mismatched log-ratio over the whole batch, >= 0
    assert kl_reference_point(1.2, 4) == pytest.approx(0.3)
    assert kl_reference_point(-1.2, 4) == 0.0 and kl_reference_point(0.0, 0) == 0.0


def test_kept_samples_loss_is_the_nll_plus_k3_by_hand():
    """Online rejection sampling trains the kept samples' tokens by their NLL: log-probs
    [-1, -2 | -0.5, pad]; with a reference 0.5 above the policy on every token, k3 =
    e^{0.5} - 1 - 0.5 per token, weighted 0.1."""
    from rlhf.core.losses import kept_samples_loss

    lp = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    losses, kl = kept_samples_loss(lp, mask)
    assert losses.tolist() == [[1.0, 2.0], [0.5, 0.0]] and not kl.any()
    k3 = math.exp(0.5) - 1.5
    losses, kl = kept_samples_loss(lp, mask, lp + 0.5, kl_coef=0.1)
    assert kl.flatten().tolist() == pytest.approx([k3, k3, k3, 0.0])
    assert losses.flatten().tolist() == pytest.approx(
        [1 + 0.1 * k3, 2 + 0.1 * k3, 0.5 + 0.1 * k3, 0])
