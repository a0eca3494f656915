"""The off-policy pieces of online RL against values computed by hand: importance
weights (tis, mis), the whole per-token policy loss, multi-turn masks (observation
tokens get no gradient, in the loss and through a real model), GAE and returns over
masks with holes, per-turn rewards, DAPO's length penalty and dynamic-sampling filter,
and the advantage dispatch."""

import math

import pytest
import torch

from rlhf.core.advantages import (discounted_returns, gae, grpo_advantages, overlong_penalty,
                             token_rewards, uniform_groups)
from rlhf.core.losses import importance_weights, online_rl_loss, ppo_policy_loss

T = torch.tensor


def test_importance_weights_by_hand():
    # w = exp(prox - mu): exp(0) = 1, exp(ln 3) = 3, exp(ln .5) = .5; the last is padding
    prox = T([[0.0, math.log(3.0), math.log(0.5), 7.0]])
    mu = T([[0.0, 0.0, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    tis = importance_weights(prox, mu, mask, "tis", cap=2.0)
    assert torch.allclose(tis.weights, T([[1.0, 2.0, 0.5, 0.0]]))  # 3 truncated to 2
    assert torch.allclose(tis.raw, T([[1.0, 3.0, 0.5, 0.0]]))
    assert tis.limited.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    mis = importance_weights(prox, mu, mask, "mis", cap=2.0)
    assert torch.allclose(mis.weights, T([[1.0, 0.0, 0.5, 0.0]]))  # 3 masked out
    assert mis.limited.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    none = importance_weights(prox, mu, mask, "none")
    assert none.weights.tolist() == mask.tolist() and none.limited.sum() == 0
    with pytest.raises(ValueError, match="tis or mis"):
        importance_weights(prox, mu, mask, "xyz")


def test_online_rl_loss_by_hand():
    # one sample, two tokens, A = 1: r = exp(lp - prox) = exp(.1), exp(-.5); clip .2
    # token 0: r = 1.10517 inside [.8, 1.2]: -A r = -1.10517; w = exp(prox - mu) =
    #          exp(0 - ln 4) = .25 (below the cap): loss -.27629
    # token 1: r = .60653 < .8, A > 0: max(-.60653, -.8) = -.60653; w = exp(0) = 1
    lp = T([[0.1, -0.5]], requires_grad=True)
    prox = T([[0.0, 0.0]])
    mu = T([[math.log(4.0), 0.0]])
    mask = T([[1.0, 1.0]])
    out = online_rl_loss(lp, prox, mu, T([1.0]), mask, rollout_is="tis", rollout_is_cap=2.0)
    assert torch.allclose(out.losses, T([[-0.25 * math.exp(0.1), -math.exp(-0.5)]]), atol=1e-6)
    assert out.clipped.tolist() == [[0.0, 0.0]]
    # with rollout_is none it is exactly PPO's clipped loss (what rlhf.ppo always used)
    plain = online_rl_loss(lp, prox, mu, T([1.0]), mask)
    ppo = ppo_policy_loss(lp, prox, T([1.0]), mask)
    assert torch.equal(plain.losses, ppo.losses)
    # the k3 KL in the loss and the entropy bonus, masked like the rest
    ref = T([[0.1, -0.5]])  # equal to the policy: k3 = 0
    kl = online_rl_loss(lp, prox, mu, T([1.0]), mask, ref_logprobs=ref, kl_coef=0.5,
                        entropy=T([[2.0, 3.0]]), entropy_coef=0.1)
    assert torch.allclose(kl.losses, ppo.losses - 0.1 * T([[2.0, 3.0]]))
    assert kl.kl.abs().max() < 1e-7


def test_observation_tokens_get_no_gradient(tiny_model_path, tokenizer):
    """A two-turn episode through the real tiny model and the real loss: the gradient of
    the loss is zero at the observation tokens' log-probs, and whatever the behaviour
    log-probs or advantages hold there changes neither the loss nor the weights'
    gradient."""
    from transformers import AutoModelForCausalLM

    from rlhf.core.environments import ChatCodec
    from rlhf.core.logprobs import response_batch, right_padded, scored_token_logprobs
    from rlhf.core.rollouts import OBSERVATION, RolloutRecord, record_tables

    codec = ChatCodec(tokenizer)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = enc(tokenizer.apply_chat_template([{"role": "user", "content": "What is in "
                                                 "the box?"}], tokenize=False,
                                               add_generation_prompt=True))
    turn1 = enc('<tool_call>{"name": "open_box", "arguments": {}}</tool_call><|end|>')
    obs = codec.observation_ids(turn1, "tool", "a plum")
    turn2 = enc("The box holds a plum.<|end|>")
    resp = turn1 + obs + turn2
    rec = RolloutRecord(group=0, sample=0, prompt_ids=prompt, response_ids=resp,
                        logprobs=[-1.0] * len(resp),
                        versions=[0] * len(turn1) + [OBSERVATION] * len(obs) + [0] * len(turn2),
                        loss_mask=[1] * len(turn1) + [0] * len(obs) + [1] * len(turn2))
    tables = record_tables([rec])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)

    def loss_and_grads(behaviour, adv):
        model.zero_grad()
        batch = response_batch([prompt], [resp], pad_id=tokenizer.pad_token_id, packing=False)
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        vals, seq = scored_token_logprobs(logits, batch)
        lp, _ = right_padded(vals, seq, 1)
        lp.retain_grad()
        out = online_rl_loss(lp, lp.detach(), behaviour, adv, tables["loss_mask"],
                             rollout_is="tis", ref_logprobs=lp.detach() - 0.1, kl_coef=0.1)
        loss = out.losses.sum()
        loss.backward()
        return loss.detach(), lp.grad.clone(), [p.grad.clone() for p in model.parameters()]

    obs_at = tables["loss_mask"] == 0
    adv = torch.where(obs_at, 0.0, 1.0)
    loss, lp_grad, grads = loss_and_grads(tables["behaviour"], adv)
    assert obs_at.sum() == len(obs) and len(obs) > 3
    assert (lp_grad[obs_at] == 0).all() and (lp_grad[~obs_at] != 0).all()
    # garbage where the observations are: nothing changes
    loss2, _, grads2 = loss_and_grads(torch.where(obs_at, 50.0, tables["behaviour"]),
                                      torch.where(obs_at, 1e6, adv))
    assert torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_gae_and_returns_step_over_observations():
    # model tokens at 0, 1 and 4 (2, 3 are observations; 5 is padding): the recursion
    # runs 4 -> 1 -> 0 as if 2 and 3 were not there. gamma 1, lambda .5,
    # values .1 .2 | .9 .9 | .4, reward 1 at the end:
    #   t4: delta = 1 - .4 = .6                       A4 = .6
    #   t1: delta = 0 + .4 - .2 = .2                  A1 = .2 + .5 * .6 = .5
    #   t0: delta = 0 + .2 - .1 = .1                  A0 = .1 + .5 * .5 = .35
    mask = T([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    values = T([[0.1, 0.2, 0.9, 0.9, 0.4, 0.0]])
    rewards = T([[0.0, 0.0, 7.0, 7.0, 1.0, 0.0]])  # rewards on observations are ignored
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(adv, T([[0.35, 0.5, 0.0, 0.0, 0.6, 0.0]]))
    assert torch.allclose(ret, T([[0.45, 0.7, 0.0, 0.0, 1.0, 0.0]]))
    # the same episode without its observations gives the same numbers
    dense, _ = gae(T([[0.0, 0.0, 1.0]]), T([[0.1, 0.2, 0.4]]), T([[1.0, 1.0, 1.0]]), 1.0, 0.5)
    assert torch.allclose(dense, adv[:, [0, 1, 4]])
    # reward-to-go, gamma .5: t4 = 1, t1 = 0 + .5 * 1, t0 = .25
    assert torch.allclose(discounted_returns(rewards, mask, gamma=0.5),
                          T([[0.25, 0.5, 0.0, 0.0, 1.0, 0.0]]))


def test_token_rewards_place_turn_rewards_where_earned():
    # an episode with model tokens 0-1 (turn 1), observation 2-3, model token 4 (turn 2);
    # turn 1 earned .3, the episode's score is 1.3 (so .3 + 1 at the end); KL .1 per token
    mask = T([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    turns = T([[0.0, 0.3, 0.0, 0.0, 0.0, 0.0]])
    kl = T([[0.1] * 6])
    out = token_rewards(T([1.3]), mask, kl, kl_coef=1.0, turn_rewards=turns)
    assert torch.allclose(out, T([[-0.1, 0.2, 0.0, 0.0, 0.9, 0.0]]))
    # without turn rewards: the score at the last model token (4, not 2: the mask's sum
    # minus one would point at an observation)
    assert torch.allclose(token_rewards(T([1.0]), mask), T([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]]))


def test_overlong_penalty_and_uniform_groups_by_hand():
    # budget 20, buffer 4: up to 16 tokens nothing; 18 -> -(2/4); 20 and beyond -> -1
    pen = overlong_penalty(T([10, 16, 18, 20, 30]), max_length=20, buffer=4, factor=1.0)
    assert torch.allclose(pen, T([0.0, 0.0, -0.5, -1.0, -1.0]))
    assert torch.allclose(overlong_penalty(T([18]), 20, 4, factor=0.5), T([-0.25]))
    # groups of 3: (1, 1, 1) uniform, (0, 1, 0) not, (.5, .5, .5) uniform
    assert uniform_groups(T([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5]), 3).tolist() == \
        [True, False, True]


def test_advantage_dispatch_matches_the_pure_functions():
    """rlhf.core.rl_advantages on two micro-batches: grpo per group with the KL in the reward
    taken off the score; reinforce++ whitened over both (the all-reduce is the sum of
    one worker's moments here)."""
    from types import SimpleNamespace

    from rlhf.core.rl_advantages import assign_advantages

    def micro(scores, old, ref):
        mask = torch.ones(len(scores), 2)
        return {"scores": T(scores), "mask": mask, "turn_rewards": torch.zeros(len(scores), 2),
                "ref": torch.as_tensor(ref), "old": torch.as_tensor(old), "values": None,
                "n_seqs": len(scores)}

    algo = SimpleNamespace(algorithm="grpo", kl_penalty="reward", scale_rewards=True,
                           gamma=1.0, lam=0.95)
    a = micro([1.0, 0.0], [[-1.0, -1.0], [-2.0, -1.0]], [[-1.5, -1.0], [-1.0, -1.0]])
    b = micro([2.0, 2.0], [[-1.0, -1.0], [-1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]])
    kl, n = assign_advantages([a, b], algo, 2, kl_coef=0.1, all_sum=lambda x: x)
    # summed k1 per sample: a: .5 and -1; b: 0, 0 -> KL 1 - 1 ... = -.5 over 4 samples
    assert (kl, n) == (pytest.approx(-0.5), 4)
    assert torch.allclose(a["adv"], grpo_advantages(T([1.0 - 0.05, 0.0 + 0.1]), 2))
    assert torch.allclose(b["adv"], T([0.0, 0.0]))  # equal scores: no signal
    algo.algorithm, algo.kl_penalty = "reinforce++", "loss"
    a, b = micro([1.0, 0.0], a["old"], a["ref"]), micro([2.0, 2.0], b["old"], b["ref"])
    assign_advantages([a, b], algo, 2, kl_coef=0.1, all_sum=lambda x: x)
    both = torch.cat([a["adv"], b["adv"]])  # returns 1 1 | 0 0 | 2 2 | 2 2, whitened
    assert abs(float(both.mean())) < 1e-6 and float(both.std()) == pytest.approx(1.0, abs=1e-4)
    # rejection sampling: the kept samples' SFT loss has no advantage to compute (each
    # micro-batch holds one sample per prompt); the weight is 1 per kept sample
    algo.algorithm = "rejection"
    a = micro([1.0, 0.5], a["old"], a["ref"])
    assert assign_advantages([a], algo, 2, kl_coef=0.1, all_sum=lambda x: x) == (0.0, 0.0)
    assert a["adv"].tolist() == [1.0, 1.0]
    algo.algorithm = "online_dpo"  # nor does online DPO's pair loss
    a = micro([1.0, 0.5], a["old"], a["ref"])
    assign_advantages([a], algo, 2, kl_coef=0.1, all_sum=lambda x: x)
    assert a["adv"].tolist() == [1.0, 1.0]
