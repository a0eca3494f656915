"""Advantages and returns for online RL, as pure tensor functions (torch only).

Shapes: B responses, T response tokens (right-padded; `mask` (B, T) is 1 on real
tokens). Per-response scores are (B,). With n samples per prompt (GRPO, RLOO), the
responses of one prompt are consecutive: rows g*n .. g*n + n - 1.

    gae                  PPO with a critic: GAE(gamma, lambda) advantages and returns
    grpo_advantages      GRPO: score minus its group's mean, over the group's std
    rloo_advantages      RLOO: score minus the mean of the other samples of its prompt
    discounted_returns   REINFORCE++: reward-to-go per token (then `masked_whiten`)
    kl_estimate          per-token KL to the reference: k1, k2 or k3 (Schulman 2020)
    token_rewards        the score at each response's last token minus a KL penalty
                         (a multi-turn episode's per-turn rewards where they were earned)
    overlong_penalty     DAPO's soft length penalty near the token budget
    uniform_groups       prompts whose samples all scored the same (no GRPO signal)
    AdaptiveKLController the KL coefficient of Ziegler et al. (2019)

Variances are unbiased (Bessel's correction), as in TRL and OpenRLHF.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (0-d)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """x normalised to unit variance (and zero mean with shift_mean) over the masked
    positions of the whole batch; 0 where mask is 0. One worker's batch; split over
    workers, sum their `masked_moments` and call `whiten_with`."""
    return whiten_with(x, mask, masked_moments(x, mask), shift_mean, eps)


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """[count, sum, sum of squares] of x over the masked positions, as float64 numbers:
    summed over workers (an all-reduce), they give `whiten_with` the whole batch's
    statistics, so that whitening does not depend on how the batch was split."""
    xm = x.double() * mask
    return [float(mask.sum()), float(xm.sum()), float((xm * x.double()).sum())]


def whiten_with(x: torch.Tensor, mask: torch.Tensor, moments: list[float],
                shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """x whitened with the statistics of summed `masked_moments` (unbiased variance);
    0 where mask is 0."""
    n, s, ss = moments
    mean = s / max(n, 1.0)
    var = max(ss - n * mean * mean, 0.0) / max(n - 1.0, 1.0)
    out = (x - mean) / (var + eps) ** 0.5
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    rewards, values, mask: (B, T). The value after a response's last token is 0 (the
    episode ends there). Positions where mask is 0 inside a response (the observation
    tokens between a multi-turn episode's model turns) are stepped over: the recursion
    runs from each model token to the next model token, as if the observations were not
    there (they are the environment's move, not the policy's). Returns (advantages,
    returns), both (B, T), 0 where mask is 0; returns = advantages + values are the
    critic's targets.
    """
    values = values * mask
    rewards = rewards * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(last)
    for t in reversed(range(rewards.shape[1])):
        on = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = step
        last = torch.where(on, step, last)
        next_value = torch.where(on, values[:, t], next_value)
    return adv, (adv + values) * mask


def _groups(scores: torch.Tensor, n: int) -> torch.Tensor:
    if n < 2 or scores.numel() % n:
        raise ValueError(f"{scores.numel()} scores do not form groups of {n} samples per "
                         "prompt (n must be at least 2 and divide the batch).")
    return scores.view(-1, n)


def grpo_advantages(scores: torch.Tensor, n: int, scale: bool = True,
                    eps: float = 1e-4) -> torch.Tensor:
    """(B,) GRPO advantages: (score - group mean) / (group std + eps); `scale=False`
    leaves out the division (Dr. GRPO). A group whose scores are all equal gets 0."""
    g = _groups(scores, n)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        adv = adv / (g.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) RLOO advantages: each score minus the mean of the other n - 1 scores of its
    prompt (Ahmadian et al. 2024)."""
    g = _groups(scores, n)
    others = (g.sum(1, keepdim=True) - g) / (n - 1)
    return (g - others).reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor,
                       gamma: float = 1.0) -> torch.Tensor:
    """(B, T) reward-to-go sum_{k >= t} gamma^(k - t) r_k over each response's tokens where
    mask is 1 (observation tokens between model turns are stepped over, as in `gae`).
    REINFORCE++ whitens these over the batch (`masked_whiten`) to get advantages."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        step = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = step
        running = torch.where(mask[:, t] > 0, step, running)
    return out


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs
    (same shape in, same shape out). k1 = log r, k2 = (log r)^2 / 2, k3 = r' - 1 - log r'
    with r = pi / pi_ref and r' = 1 / r: k3 is unbiased and never negative."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"KL estimator {estimator!r} is not one of k1, k2, k3.")


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0, turn_rewards: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """(B, T) per-token rewards: -kl_coef * kl at every response token, plus the
    response's score at its last token (the KL-in-reward form of PPO in RLHF).

    turn_rewards: (B, T), a multi-turn episode's per-turn rewards at each turn's last
    model token (rlhf.core.rollouts.record_tables); they are part of `scores`, so what they
    hold is taken off the score at the last token and placed where it was earned."""
    out = torch.zeros_like(mask, dtype=scores.dtype)
    if kl is not None and kl_coef:
        out = -kl_coef * kl * mask
    # each row's last model token: where the running count of mask reaches its total
    # (mask may have holes: a multi-turn episode's observation tokens)
    count = torch.cumsum(mask, 1)
    last = torch.argmax(((count == count[:, -1:]) & (mask > 0)).float(), 1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    if turn_rewards is not None:
        out = out + turn_rewards * mask
        scores = scores - (turn_rewards * mask).sum(1)
    return out.index_put((rows, last), scores, accumulate=True) * mask


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int,
                     factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), (B,) lengths -> (B,)
    rewards <= 0: 0 up to max_length - buffer tokens, then falling linearly to -factor
    at max_length (and staying there beyond it)."""
    over = (lengths.float() - (max_length - buffer)).clamp(min=0)
    return -factor * (over / max(buffer, 1)).clamp(max=1.0)


def uniform_groups(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(G,) bool: the prompt groups (n consecutive scores each) whose scores are all
    equal: under GRPO and RLOO their advantages are all 0, no learning signal (DAPO's
    dynamic sampling drops them and samples other prompts instead)."""
    g = _groups(scores, n)
    return (g == g[:, :1]).all(1)


@dataclass
class AdaptiveKLController:
    """The KL coefficient, adapted towards a target KL (Ziegler et al. 2019):
    value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon. With target None
    the coefficient stays fixed. Its state (value) goes into checkpoints."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
