"""Preference losses as pure tensor functions (torch only).

Every function takes per-example tensors and returns per-example tensors; the caller
decides how to reduce (the DPO loop divides by the global pair count so that the result
does not depend on how a batch was split over workers and micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceOutput:
    """Per-pair results, all of shape (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    """Implicit reward of the chosen response: beta * (log pi - log pi_ref) (DPO), or
    beta * mean token log pi (SimPO). Detached."""
    rejected_rewards: torch.Tensor
    """Same for the rejected response. Detached."""


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
) -> PreferenceOutput:
    """The DPO family of losses on summed sequence log-probs.

    policy_*/ref_*: (B,) sums of response-token log-probs under the policy and the frozen
    reference. *_lengths: (B,) response token counts, needed by ipo and simpo.
    ref_* may be None only for simpo, which has no reference.

    sigmoid  (Rafailov et al. 2023, eq. 7; cDPO label smoothing, Mitchell 2023):
        h = (pc - rc) - (pr - rr)
        loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    hinge    (SLiC, Zhao et al. 2023): loss = relu(1 - beta h)
    ipo      (Azar et al. 2023, eq. 17), with each side's log-ratio divided by its
             length as TRL does: loss = (h_avg - 1 / (2 beta))^2
    simpo    (Meng et al. 2024, eq. 6): length-normalised, reference-free:
        h = pc / |yc| - pr / |yr| - gamma_beta_ratio
        loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    """
    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("simpo needs chosen_lengths and rejected_lengths")
        avg_c = policy_chosen / chosen_lengths.clamp(min=1)
        avg_r = policy_rejected / rejected_lengths.clamp(min=1)
        h = avg_c - avg_r - simpo_gamma
        losses = (-F.logsigmoid(beta * h) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * h) * label_smoothing)
        return PreferenceOutput(losses, (beta * avg_c).detach(), (beta * avg_r).detach())

    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"loss_type={loss_type} needs reference log-probs")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        h = chosen_ratio - rejected_ratio
        losses = (-F.logsigmoid(beta * h) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * h) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo needs chosen_lengths and rejected_lengths")
        h = (chosen_ratio / chosen_lengths.clamp(min=1)
             - rejected_ratio / rejected_lengths.clamp(min=1))
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return PreferenceOutput(losses, (beta * chosen_ratio).detach(),
                            (beta * rejected_ratio).detach())


def nll_per_token(policy_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term (Pang et al. 2024): mean negative log-likelihood per chosen token.

    policy_chosen: (B,) summed log-probs; chosen_lengths: (B,) token counts.
    Returns (B,) per-pair values of -sum log p / len. The caller weights by rpo_alpha;
    a batch's term is the token-weighted mean, sum(-logp) / sum(len).
    """
    return -policy_chosen / chosen_lengths.clamp(min=1)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Reward-model loss on scalar scores (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1).

    chosen_rewards, rejected_rewards: (B,) scores r(x, y_c), r(x, y_r).
    margin: optional (B,) how much better the chosen response is (Llama 2, Touvron et al.
    2023, eq. 2): the chosen score must exceed the rejected one by at least that much.
    center_coefficient: reward centering (Eisenstein et al. 2023), a penalty
    c * (r_c + r_r)^2 that keeps the mean reward near zero without changing preferences.
    Returns (B,) per-pair losses:
        -log sigma(r_c - r_r - margin) + c * (r_c + r_r)^2
    The batch loss is their mean (as TRL's RewardTrainer computes it).
    """
    h = chosen_rewards - rejected_rewards
    if margin is not None:
        h = h - margin
    losses = -F.logsigmoid(h)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


# ------------------------------------------------------------------------ online RL
# Per-token tensors (B, T) over response tokens, 0 where `mask` is 0; the caller sums
# them and divides by the global token count (or per-sequence, as the algorithm asks).


@dataclass
class PolicyLossOutput:
    """Per-token results of the clipped policy objective, all (B, T)."""

    losses: torch.Tensor
    clipped: torch.Tensor
    """1.0 where the clipped term was the one taken (it bounds the update). Detached."""
    ratio: torch.Tensor
    """pi / pi_old per token. Detached."""


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor, *, clip_low: float = 0.2,
                    clip_high: float | None = None) -> PolicyLossOutput:
    """PPO's clipped surrogate (Schulman et al. 2017), per token, to minimise:

        max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high)),  r = pi / pi_old

    logprobs: (B, T) under the policy being trained; old_logprobs: (B, T) under the
    policy that sampled (constants); advantages: (B, T), or (B,) for one advantage per
    response (GRPO, RLOO). clip_high defaults to clip_low; a larger one is DAPO's
    clip-higher.
    """
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + high)
    return PolicyLossOutput(torch.maximum(unclipped, clipped) * mask,
                            ((clipped > unclipped).float() * mask).detach(),
                            ratio.detach())


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip_range: float | None = 0.2
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's clipped squared error, per token, and where clipping took effect:

        0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)

    values: (B, T) from the critic being trained; old_values: (B, T) at sampling time;
    returns: (B, T) targets (GAE returns). clip_range None: the plain squared error.
    Returns (losses (B, T), clipped (B, T) detached).
    """
    plain = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * plain * mask, torch.zeros_like(plain)
    v_clip = old_values + (values - old_values).clamp(-clip_range, clip_range)
    bounded = (v_clip - returns) ** 2
    return (0.5 * torch.maximum(plain, bounded) * mask,
            ((bounded > plain).float() * mask).detach())


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) entropy of the next-token distribution, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class ImportanceWeights:
    """Per-token rollout correction, all (B, T), 0 where mask is 0, detached."""

    weights: torch.Tensor
    """What multiplies each token's policy loss."""
    raw: torch.Tensor
    """pi_prox / mu before truncation or masking."""
    limited: torch.Tensor
    """1.0 where the cap took effect (weight truncated, or token masked out)."""


def importance_weights(proximal: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor,
                       mode: str = "tis", cap: float = 2.0) -> ImportanceWeights:
    """Importance weights for the mismatch between the policy that sampled (the engine,
    behaviour log-probs mu) and the trainer's proximal policy pi_prox (the policy at the
    step's start, recomputed by the trainer), per token: w = pi_prox / mu.

    proximal, behaviour, mask: (B, T).
    tis   truncated importance sampling (Yao et al. 2025): min(w, cap)
    mis   masked importance sampling: w where w <= cap, else 0 (the token is left out)
    none  1 everywhere (the behaviour policy is ignored)
    With samples several versions old, clipping around pi_prox and weighting by
    pi_prox / mu is the decoupled PPO objective (Hilton et al. 2021; AReaL, Fu et al.
    2025); with fresh samples w only corrects the engine/trainer numerical mismatch.
    """
    raw = torch.exp((proximal - behaviour).float()) * mask
    if mode == "none":
        weights, limited = mask.float(), torch.zeros_like(raw)
    elif mode == "tis":
        weights = raw.clamp(max=cap)
        limited = (raw > cap).float() * mask
    elif mode == "mis":
        keep = (raw <= cap).float() * mask
        weights, limited = raw * keep, (1.0 - keep) * mask
    else:
        raise ValueError(f"rollout importance sampling {mode!r}: none, tis or mis")
    return ImportanceWeights(weights.detach(), raw.detach(), limited.detach())


@dataclass
class RLLossOutput:
    """Per-token terms of the online-RL policy loss, all (B, T), 0 where mask is 0."""

    losses: torch.Tensor
    """What is summed and normalised into the loss (with a graph)."""
    clipped: torch.Tensor
    """1.0 where PPO's clip bounded the update. Detached."""
    weights: ImportanceWeights
    kl: torch.Tensor
    """The k3 KL estimate to the reference (zeros without a reference). Detached."""


def online_rl_loss(logprobs: torch.Tensor, proximal: torch.Tensor, behaviour: torch.Tensor,
                   advantages: torch.Tensor, mask: torch.Tensor, *, clip_low: float = 0.2,
                   clip_high: float | None = None, rollout_is: str = "none",
                   rollout_is_cap: float = 2.0, ref_logprobs: torch.Tensor | None = None,
                   kl_coef: float = 0.0, entropy: torch.Tensor | None = None,
                   entropy_coef: float = 0.0) -> RLLossOutput:
    """The per-token policy loss of GRPO / RLOO / REINFORCE++ / PPO, to minimise:

        w * max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))   r = pi / pi_prox
        + kl_coef * k3(pi, pi_ref) - entropy_coef * H(pi)

    w: `importance_weights(proximal, behaviour)`. Every term is multiplied by `mask`, so
    positions where it is 0 (observation tokens of a multi-turn episode, padding, a
    filtered response) get no gradient at all.
    logprobs: (B, T) of the policy being trained (with a graph); proximal: (B, T) the
    policy at the step's start (constants); behaviour: (B, T) the engine's; advantages:
    (B, T) or (B,); ref_logprobs, entropy: (B, T) or None.
    """
    w = importance_weights(proximal, behaviour, mask, rollout_is, rollout_is_cap)
    pl = ppo_policy_loss(logprobs, proximal.to(logprobs.device), advantages, mask,
                         clip_low=clip_low, clip_high=clip_high)
    losses = pl.losses * w.weights.to(pl.losses.device)
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        log_ratio = logprobs - ref_logprobs.to(logprobs.device)
        kl = (torch.expm1(-log_ratio) + log_ratio) * mask  # k3 (Schulman 2020)
        if kl_coef:
            losses = losses + kl_coef * kl
    if entropy is not None and entropy_coef:
        losses = losses - entropy_coef * entropy * mask
    return RLLossOutput(losses, pl.clipped, w, kl.detach())
