"""Advantage dispatch for online RL: from a step's scored rollouts (one dict per
micro-batch, as rlhf/online/task.py prepares them) to each token's advantage, by
algo.algorithm, with the KL to the reference in the reward where algo.kl_penalty says
so. The maths are rlhf/core/advantages.py's pure functions; what is here is which of them,
on what, and the global-batch statistics (an all-reduce across training workers, given
as `all_sum`, so that whitening does not depend on how the batch was split).

A prepared micro-batch holds (S samples, T response positions):
    scores (S,)        the rollout-side reward plus the reward model's, clipped
    mask (S, T)        1 on trained tokens (model tokens; observations are 0)
    turn_rewards (S, T) a multi-turn episode's per-turn rewards at each turn's end
    ref, old (S, T)    the reference's and the proximal policy's log-probs, or None
    values (S, T)      the critic's values (ppo), or None
and gets "adv" ((S,) for grpo/rloo, (S, T) otherwise), "returns" (ppo) and
"reward_kl" (with algo.kl_penalty=reward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.core.advantages import (discounted_returns, gae, grpo_advantages, masked_moments,
                                  rloo_advantages, token_rewards, whiten_with)


def assign_advantages(rollouts: list[dict], algo, samples_per_prompt: int, kl_coef: float,
                      all_sum: Callable[[list[float]], list[float]]) -> tuple[float, float]:
    """Sets each rollout's advantages in place; returns (summed KL of the sampling policy
    to the reference, responses) over the global batch, for the adaptive KL controller
    (0, 0 without the KL in the reward)."""
    a, n = algo, samples_per_prompt
    local = [0.0, 0.0, 0.0, 0.0, 0.0]  # moments of the advantages, KL sum, responses
    for d in rollouts:
        mask = d["mask"]
        kl = None
        if a.kl_penalty == "reward" and d["ref"] is not None:
            kl = (d["old"] - d["ref"]) * mask  # k1 of the sampling policy, per token
            d["reward_kl"] = kl
            local[3] += float(kl.sum())
            local[4] += d["n_seqs"]
        if a.algorithm in ("rejection", "online_dpo"):  # losses without an advantage
            d["adv"] = torch.ones_like(d["scores"])
            continue
        if a.algorithm in ("grpo", "rloo"):
            s = d["scores"] - kl_coef * kl.sum(1) if kl is not None else d["scores"]
            d["adv"] = (grpo_advantages(s, n, scale=a.scale_rewards)
                        if a.algorithm == "grpo" else rloo_advantages(s, n))
            continue
        rewards = token_rewards(d["scores"], mask, kl, kl_coef, d["turn_rewards"])
        if a.algorithm == "ppo":
            d["adv"], d["returns"] = gae(rewards, d["values"], mask, a.gamma, a.lam)
        else:
            d["adv"] = discounted_returns(rewards, mask, a.gamma)
        local[:3] = [x + y for x, y in zip(local[:3], masked_moments(d["adv"], mask))]
    total = all_sum(local)
    if a.algorithm in ("ppo", "reinforce++"):
        for d in rollouts:
            d["adv"] = whiten_with(d["adv"], d["mask"], total[:3])
    return total[3], total[4]
