"""Online-RL maths against values computed by hand (the working is in the comments)."""

import math

import pytest
import torch

from rlhf.core.advantages import (AdaptiveKLController, discounted_returns, gae, grpo_advantages,
                             kl_estimate, masked_moments, masked_whiten, rloo_advantages,
                             token_rewards, whiten_with)
from rlhf.core.losses import entropy_from_logits, ppo_policy_loss, ppo_value_loss

T = torch.tensor


def test_gae_by_hand():
    # row 0, gamma 1, lambda 0.95, values .5 .6 .7, reward 1 at the end:
    #   t2: delta = 1 + 0 - .7 = .3                A2 = .3
    #   t1: delta = 0 + .7 - .6 = .1               A1 = .1 + .95 * .3 = .385
    #   t0: delta = 0 + .6 - .5 = .1               A0 = .1 + .95 * .385 = .46575
    # row 1, two tokens then padding (its value 9 and reward 5 must be ignored):
    #   t1: delta = 2 + 0 - 1 = 1                  A1 = 1
    #   t0: delta = 0 + 1 - 1 = 0                  A0 = .95
    rewards = T([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = T([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert torch.allclose(adv, T([[0.46575, 0.385, 0.3], [0.95, 1.0, 0.0]]))
    assert torch.allclose(ret, T([[0.96575, 0.985, 1.0], [1.95, 2.0, 0.0]]))
    # gamma .9, lambda .8, row 0:
    #   t2: delta = 1 - .7 = .3                    A2 = .3
    #   t1: delta = .9 * .7 - .6 = .03             A1 = .03 + .72 * .3 = .246
    #   t0: delta = .9 * .6 - .5 = .04             A0 = .04 + .72 * .246 = .21712
    adv, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.8)
    assert torch.allclose(adv, T([[0.21712, 0.246, 0.3]]))


def test_group_baselines_by_hand():
    scores = T([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean .5, unbiased std sqrt(4 * .25 / 3) = .57735 -> +-.5 / .57735 = +-.86603
    # group 2: all equal -> 0
    s = 1 / math.sqrt(3)
    want = T([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / T([s] * 4 + [1] * 4)
    assert torch.allclose(grpo_advantages(scores, 4, eps=0.0)[:4], want[:4], atol=1e-6)
    assert torch.equal(grpo_advantages(scores, 4)[4:], torch.zeros(4))
    assert torch.allclose(grpo_advantages(scores, 4, scale=False), T([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    # RLOO: 1 - (0 + 0 + 1) / 3 = 2/3, 0 - 2/3 = -2/3
    assert torch.allclose(rloo_advantages(scores, 4),
                          T([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(scores, 3)


def test_reinforce_pp_returns_and_whitening():
    rewards = T([[0.0, 1.0, 0.0], [0.5, -1.0, 7.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # gamma .5: row 0: t2 0, t1 1, t0 .5 * 1 = .5; row 1: t1 -1, t0 .5 + .5 * -1 = 0
    ret = discounted_returns(rewards, mask, gamma=0.5)
    assert torch.allclose(ret, T([[0.5, 1.0, 0.0], [0.0, -1.0, 0.0]]))
    # whitening over the 5 real tokens .5 1 0 0 -1: mean .1, unbiased var
    # (.16 + .81 + .01 + .01 + 1.21) / 4 = .55
    w = masked_whiten(ret, mask, eps=0.0)
    want = (T([[0.5, 1.0, 0.0], [0.0, -1.0, 0.1]]) - 0.1) / math.sqrt(0.55)
    assert torch.allclose(w[mask.bool()], want[mask.bool()], atol=1e-6)
    assert w[1, 2] == 0

    # Split over two workers, the summed moments whiten both halves as the whole batch:
    # moments of row 0: n 3, sum 1.5, sumsq 1.25; row 1: n 2, sum -1, sumsq 1
    m0, m1 = masked_moments(ret[:1], mask[:1]), masked_moments(ret[1:], mask[1:])
    assert m0 == pytest.approx([3, 1.5, 1.25]) and m1 == pytest.approx([2, -1, 1])
    total = [a + b for a, b in zip(m0, m1)]
    split = torch.cat([whiten_with(ret[:1], mask[:1], total, eps=0.0),
                       whiten_with(ret[1:], mask[1:], total, eps=0.0)])
    assert torch.allclose(split, w, atol=1e-6)


def test_kl_estimators_and_token_rewards():
    logp, ref = T([-1.0, -2.0]), T([-2.0, -2.0])
    # log r = 1: k1 = 1, k2 = .5, k3 = e^-1 - 1 + 1 = .36788; log r = 0: all 0
    assert torch.allclose(kl_estimate(logp, ref, "k1"), T([1.0, 0.0]))
    assert torch.allclose(kl_estimate(logp, ref, "k2"), T([0.5, 0.0]))
    assert torch.allclose(kl_estimate(logp, ref, "k3"), T([math.exp(-1), 0.0]))
    assert (kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = T([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]])
    # -.5 * kl everywhere real, plus the score at the last real token
    out = token_rewards(T([2.0, -1.0]), mask, kl, kl_coef=0.5)
    assert torch.allclose(out, T([[-0.05, -0.1, 1.85], [-0.5, -1.5, 0.0]]))
    assert torch.allclose(token_rewards(T([2.0, -1.0]), mask), T([[0, 0, 2.0], [0, -1.0, 0]]))


def test_adaptive_kl_controller():
    # error clip(9 / 6 - 1, -.2, .2) = .2; value .1 * (1 + .2 * 256 / 10000) = .100512
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(9.0, 256) == pytest.approx(0.100512)
    # below target: error (3 / 6 - 1) = -.5 -> -.2
    assert c.update(3.0, 10000) == pytest.approx(0.100512 * 0.8)
    assert AdaptiveKLController(0.05).update(100.0, 10) == 0.05  # fixed without a target


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(T([[1.5, 1.5, 0.5, 1.0]]))
    adv = T([[1.0, -1.0, -1.0, 2.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    out = ppo_policy_loss(logp, old, adv, mask, clip_low=0.2)
    # r 1.5, A 1: max(-1.5, -1.2) = -1.2 (clipped); r 1.5, A -1: max(1.5, 1.2) = 1.5;
    # r .5, A -1: max(.5, .8) = .8 (clipped); masked token: 0
    assert torch.allclose(out.losses, T([[-1.2, 1.5, 0.8, 0.0]]))
    assert out.clipped.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    # clip-higher: r 1.5 with A 1 clipped at 1.28
    assert torch.allclose(ppo_policy_loss(logp, old, adv, mask, clip_high=0.28).losses[0, 0],
                          T(-1.28))
    # one advantage per response broadcasts over its tokens
    per_seq = ppo_policy_loss(logp, old, T([1.0]), mask)
    assert torch.allclose(per_seq.losses, T([[-1.2, -1.2, -0.5, 0.0]]))
    # the gradient flows only through the unclipped tokens: d/dlogp (-A r) = -A r
    logp.requires_grad_(True)
    ppo_policy_loss(logp, old, adv, mask).losses.sum().backward()
    assert torch.allclose(logp.grad, T([[0.0, 1.5, 0.0, 0.0]]))


def test_clipped_value_loss_by_hand():
    # V 1.5, V_old 1, R 2, c .2: clipped V 1.2; .5 * max(.25, .64) = .32 (clipped)
    # V .9, V_old 1, R 0: clipped .9 (inside); .5 * .81 = .405
    v, old, ret = T([[1.5, 0.9]]), T([[1.0, 1.0]]), T([[2.0, 0.0]])
    losses, clipped = ppo_value_loss(v, old, ret, torch.ones(1, 2), clip_range=0.2)
    assert torch.allclose(losses, T([[0.32, 0.405]]))
    assert clipped.tolist() == [[1.0, 0.0]]
    plain, _ = ppo_value_loss(v, old, ret, torch.ones(1, 2), clip_range=None)
    assert torch.allclose(plain, T([[0.125, 0.405]]))


def test_entropy():
    # uniform over 4: log 4; one-hot: 0
    logits = T([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(entropy_from_logits(logits), T([math.log(4), 0.0]), atol=1e-6)
