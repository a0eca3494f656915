"""Preference losses as pure tensor functions (torch only).

Every function takes per-example tensors and returns per-example tensors; the caller
decides how to reduce (the DPO loop divides by the global pair count so that the result
does not depend on how a batch was split over workers and micro-batches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf.config.sections import F_DIVERGENCE_TYPES, F_DIVERGENCES, REFERENCE_FREE_TYPES


@dataclass
class PreferenceOutput:
    """Per-pair results, all of shape (B,), and the weight of the NLL term."""

    losses: torch.Tensor
    """The weighted sum of the per-pair terms (the batch loss is their mean)."""
    chosen_rewards: torch.Tensor
    """Implicit reward of the chosen response: beta * (log pi - log pi_ref) (DPO family),
    beta * mean token log pi (SimPO, CPO-IPO, ORPO), beta * log pi (CPO). Detached."""
    rejected_rewards: torch.Tensor
    """Same for the rejected response. Detached."""
    nll_weight: float = 0.0
    """Weight of the chosen responses' NLL per token, which the caller adds as a token
    mean over the whole batch (TRL's "sft" loss type; rpo_alpha adds to it)."""


def _logistic(x: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigma(x) - eps log sigma(-x): the logistic loss with labels flipped
    with probability eps (cDPO, Mitchell 2023; eps 0: plain DPO)."""
    return -F.logsigmoid(x) * (1 - eps) - F.logsigmoid(-x) * eps


def f_divergence_score(log_ratio: torch.Tensor, kind: str = "reverse_kl",
                       alpha: float = 0.5) -> torch.Tensor:
    """f'(pi / pi_ref) of the f-divergence that regularises the policy (f-DPO, Wang et al.
    2023, Table 1), from log_ratio = log pi - log pi_ref, any shape:

        reverse_kl        log t                       (standard DPO)
        forward_kl        1 - 1/t
        js_divergence     log 2 + log sigma(log t)    (= log(2t / (1 + t)))
        alpha_divergence  (t^(alpha - 1) - 1) / (alpha - 1), exp clamped at 80 as TRL does
    """
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return log_ratio
    if kind == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if kind == "alpha_divergence":
        t = (alpha - 1.0) * log_ratio  # in at least float32, exp clamped below overflow
        t = t.to(torch.promote_types(t.dtype, torch.float32)).clamp(max=80.0)
        return (torch.exp(t) - 1.0).to(log_ratio.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f-divergence {kind!r}: one of {', '.join(F_DIVERGENCES)}")


def _dpo_term(kind: str, *, beta: float, eps: float, chosen_ratio: torch.Tensor,
              rejected_ratio: torch.Tensor, chosen_score: torch.Tensor,
              rejected_score: torch.Tensor, policy_margin: torch.Tensor,
              ref_margin: torch.Tensor, chosen_lengths, rejected_lengths,
              discopop_tau: float) -> torch.Tensor:
    """One type's per-pair term (B,). *_ratio: log pi - log pi_ref; *_score: its
    f-divergence score; policy_margin/ref_margin: log pi(c) - log pi(r) under each model."""
    delta = chosen_score - rejected_score
    if kind == "sigmoid":  # Rafailov et al. 2023, eq. 7 (cDPO label smoothing)
        return _logistic(beta * delta, eps)
    if kind == "hinge":  # SLiC, Zhao et al. 2023, eq. 3
        return torch.relu(1 - beta * delta)
    if kind in ("ipo", "sigmoid_norm"):  # per-token scores (TRL, confirmed with IPO's authors)
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"{kind} needs chosen_lengths and rejected_lengths")
        h = (chosen_score / chosen_lengths.clamp(min=1)
             - rejected_score / rejected_lengths.clamp(min=1))
        if kind == "ipo":  # Azar et al. 2023, eq. 17, tau = beta
            return (h - 1 / (2 * beta)) ** 2
        return -F.logsigmoid(beta * h)
    if kind == "exo_pair":  # EXO, Ji et al. 2024, eq. 16: KL(p_theta || [1 - eps, eps])
        if eps <= 0:
            raise ValueError("exo_pair needs label_smoothing > 0 (the paper uses 1e-3)")
        x = beta * delta
        return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
                + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))
    if kind == "nca_pair":  # NCA, Chen et al. 2024, eq. 11
        rc, rr = beta * chosen_ratio, beta * rejected_ratio
        return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
    if kind == "robust":  # rDPO, Chowdhury et al. 2024, eq. 8: unbiased under flip rate eps
        return ((-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta))
                / (1 - 2 * eps))
    if kind == "bco_pair":  # BCO, Jung et al. 2024, on pairs (no running reward shift)
        return -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
    if kind == "sppo_hard":  # SPPO, Wu et al. 2024, eq. 4.7 with P = 1 for the winner
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if kind in ("aot", "aot_unpaired"):  # AOT, Melnyk et al. 2024: sorted over the batch
        if kind == "aot":
            h = torch.sort(policy_margin, dim=0)[0] - torch.sort(ref_margin, dim=0)[0]
        else:
            h = torch.sort(chosen_ratio, dim=0)[0] - torch.sort(rejected_ratio, dim=0)[0]
        return _logistic(beta * h, eps)
    if kind == "apo_zero":  # APO, D'Oosterlinck et al. 2024, eq. 7
        return 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    if kind == "apo_down":  # APO eq. 8
        return (torch.sigmoid(beta * chosen_ratio)
                + 1 - torch.sigmoid(beta * (chosen_ratio - rejected_ratio)))
    if kind == "discopop":  # DiscoPOP, Chris Lu et al. 2024, eq. 5
        x = beta * delta
        mix = torch.sigmoid(x / discopop_tau)
        return -F.logsigmoid(x) * (1 - mix) + torch.exp(-x) * mix
    raise ValueError(f"unknown loss_type {kind!r}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012: branch at -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def reference_free_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, *,
                        loss_type: str, beta: float = 0.1, label_smoothing: float = 0.0,
                        chosen_lengths: torch.Tensor | None = None,
                        rejected_lengths: torch.Tensor | None = None,
                        simpo_gamma: float = 0.5, alphapo: float = 0.0) -> PreferenceOutput:
    """Paired objectives on the policy alone, from (B,) summed log-probs and (B,) lengths.

    cpo        (Xu et al. 2024, eq. 3): h = log pi(c) - log pi(r); _logistic(beta h, eps)
    cpo_hinge  relu(1 - beta h)
    cpo_ipo    h on per-token means: (h - 1 / (2 beta))^2
    simpo      (Meng et al. 2024, eq. 6): h = mean log pi(c) - mean log pi(r) - simpo_gamma
               (gamma as a fraction of beta: TRL's gamma_beta_ratio); _logistic(beta h, eps)
    orpo       (Hong et al. 2024, eq. 7): with per-token means a, the log odds ratio
               h = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)); -beta log sigma(h)
               (beta is ORPO's lambda; its NLL term comes from nll_weight, 1 by default)
    alphapo    (Gupta et al. 2025): for cpo and simpo, log p -> (1 - p^-alpha) / alpha
               before the difference (0: off).
    The NLL weight these return is 0: the caller's rpo_alpha (CPO's cpo_alpha; ORPO's 1 by
    default) weights the chosen NLL.
    """
    mean = loss_type in ("cpo_ipo", "simpo", "orpo")
    if mean and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"{loss_type} needs chosen_lengths and rejected_lengths")
    c = policy_chosen / chosen_lengths.clamp(min=1) if mean else policy_chosen
    r = policy_rejected / rejected_lengths.clamp(min=1) if mean else policy_rejected
    if loss_type == "orpo":
        up = torch.promote_types(c.dtype, torch.float32)  # log(1 - e^a) needs >= float32
        c, r = c.to(up), r.to(up)
        log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
        return PreferenceOutput(-beta * F.logsigmoid(log_odds), (beta * c).detach(),
                                (beta * r).detach())
    if alphapo:
        if loss_type not in ("cpo", "simpo"):
            raise ValueError(f"alphapo applies to cpo and simpo, not {loss_type}")
        c, r = -torch.expm1(-alphapo * c) / alphapo, -torch.expm1(-alphapo * r) / alphapo
    h = c - r
    if loss_type == "simpo":
        losses = _logistic(beta * (h - simpo_gamma), label_smoothing)
    elif loss_type == "cpo":
        losses = _logistic(beta * h, label_smoothing)
    elif loss_type == "cpo_hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "cpo_ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown reference-free loss_type {loss_type!r}")
    return PreferenceOutput(losses, (beta * c).detach(), (beta * r).detach())


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    alphapo: float = 0.0,
) -> PreferenceOutput:
    """The DPO family of losses on summed sequence log-probs, as TRL 1.16 computes them.

    policy_*/ref_*: (B,) sums of response-token log-probs under the policy and the
    reference (with LD-DPO's ld_alpha, the length-desensitised sums of
    rlhf.core.logprobs.ld_sums). *_lengths: (B,) response token counts (ipo,
    sigmoid_norm and the reference-free types need them). ref_* may be None only for a
    type of REFERENCE_FREE_TYPES (`reference_free_loss`), which stands alone.

    loss_type: one of DPO_LOSS_TYPES, or several with `weights` (MPO, Wang et al. 2024:
    e.g. sigmoid, bco_pair, sft with 0.8, 0.2, 1.0); the per-pair losses are the
    weighted sum, "sft" returns its weight as nll_weight. With h = s(c) - s(r), s the
    f-divergence score of the log-ratio (`f_divergence_score`; log-ratio itself by
    default) and eps = label_smoothing:
      sigmoid   -(1-eps) log sigma(beta h) - eps log sigma(-beta h)   (DPO, cDPO)
      hinge     relu(1 - beta h)                                       (SLiC)
      ipo       (h_tok - 1/(2 beta))^2, h_tok on per-token scores      (IPO)
      sigmoid_norm  -log sigma(beta h_tok)
      exo_pair  KL(softmax(beta s) || [1-eps, eps])                    (EXO, eps > 0)
      robust    (-(1-eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)
      nca_pair  -log sigma(b_c) - (log sigma(-b_c) + log sigma(-b_r)) / 2, b = beta ratio
      bco_pair  -log sigma(b_c) - log sigma(-b_r)
      sppo_hard (ratio_c - 1/(2 beta))^2 + (ratio_r + 1/(2 beta))^2
      aot       sigmoid on sort(pi margins) - sort(ref margins) over the batch
      aot_unpaired  sigmoid on sort(ratio_c) - sort(ratio_r) over the batch
      apo_zero  1 - sigma(b_c) + sigma(b_r);  apo_down  sigma(b_c) + 1 - sigma(b_c - b_r)
      discopop  logistic and exponential losses blended by sigma(beta h / tau)
      sft       the chosen NLL per token (as nll_weight)
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if weights is None else [float(w) for w in weights]
    if len(weights) != len(types):
        raise ValueError(f"{len(types)} loss types and {len(weights)} weights")
    free = [t for t in types if t in REFERENCE_FREE_TYPES]
    if free:
        if len(types) > 1:
            raise ValueError(f"{free[0]} stands alone: it cannot be combined with {types}")
        out = reference_free_loss(policy_chosen, policy_rejected, loss_type=free[0],
                                  beta=beta, label_smoothing=label_smoothing,
                                  chosen_lengths=chosen_lengths,
                                  rejected_lengths=rejected_lengths, simpo_gamma=simpo_gamma,
                                  alphapo=alphapo)
        out.losses = out.losses * weights[0]
        return out
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"loss_type={types} needs reference log-probs")
    if f_divergence != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_TYPES):
        raise ValueError(f"f_divergence={f_divergence} applies to {F_DIVERGENCE_TYPES}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    terms = dict(beta=beta, eps=label_smoothing, chosen_ratio=chosen_ratio,
                 rejected_ratio=rejected_ratio,
                 chosen_score=f_divergence_score(chosen_ratio, f_divergence, f_alpha),
                 rejected_score=f_divergence_score(rejected_ratio, f_divergence, f_alpha),
                 policy_margin=policy_chosen - policy_rejected,
                 ref_margin=ref_chosen - ref_rejected, chosen_lengths=chosen_lengths,
                 rejected_lengths=rejected_lengths, discopop_tau=discopop_tau)
    losses = torch.zeros_like(chosen_ratio)
    for kind, w in zip(types, weights):
        if kind != "sft":
            losses = losses + w * _dpo_term(kind, **terms)
    return PreferenceOutput(losses, (beta * chosen_ratio).detach(),
                            (beta * rejected_ratio).detach(), sft_weight(types, weights))


def sft_weight(loss_type: str | Sequence[str], weights: Sequence[float] | None = None
               ) -> float:
    """The weight of the "sft" type in a loss mix (0 without one): the chosen NLL's
    weight, which `dpo_loss` returns as nll_weight rather than adding per pair."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if weights is None else weights
    return float(sum(w for t, w in zip(types, weights) if t == "sft"))


@dataclass
class UnpairedOutput:
    """Per-example results of KTO's losses, all of shape (B,)."""

    losses: torch.Tensor
    """Each example's weighted loss (the batch loss is their mean)."""
    rewards: torch.Tensor
    """Implicit reward beta * (log pi - log pi_ref). Detached."""


def kl_reference_point(log_ratio_sum: float, count: float) -> float:
    """KTO's reference point z0 (Ethayarajh et al. 2024, eq. 6 and section 4.1): the mean
    log-ratio log pi - log pi_ref of mismatched (prompt, another example's completion)
    pairs, clamped at 0 (a KL is not negative); sum and count over the whole global
    batch, so it does not depend on how the batch is split. 0 for no pairs."""
    return max(log_ratio_sum / count, 0.0) if count else 0.0


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: float,
             *, loss_type: str = "kto", beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> UnpairedOutput:
    """KTO's losses on unpaired examples, as TRL 1.16's KTOTrainer computes them.

    policy, ref: (B,) summed response log-probs under the policy and the reference;
    desirable: (B,) bool, the label (thumbs-up); kl: the reference point z0
    (`kl_reference_point`, a constant). With r = log pi - log pi_ref:

      kto  (eq. 7)       desirable: lambda_D (1 - sigma(beta (r - z0)))
                         undesirable: lambda_U (1 - sigma(beta (z0 - r)))
      apo_zero_unpaired  (APO, D'Oosterlinck et al. 2024, eq. 7 unpaired; no z0)
                         desirable: lambda_D (1 - sigma(beta r)); undesirable:
                         lambda_U sigma(beta r)
    """
    r = policy - ref
    d = desirable.to(torch.bool)
    if loss_type == "kto":
        up, down = 1 - torch.sigmoid(beta * (r - kl)), 1 - torch.sigmoid(beta * (kl - r))
    elif loss_type == "apo_zero_unpaired":
        up, down = 1 - torch.sigmoid(beta * r), torch.sigmoid(beta * r)
    else:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}: kto or apo_zero_unpaired")
    losses = torch.where(d, desirable_weight * up, undesirable_weight * down)
    return UnpairedOutput(losses, (beta * r).detach())


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


def kept_samples_loss(logprobs: torch.Tensor, mask: torch.Tensor,
                      ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Online rejection sampling's per-token loss (RAFT, Dong et al. 2023; ReST, Gulcehre
    et al. 2023): the negative log-likelihood of the kept samples' tokens, + kl_coef x k3
    KL to the reference when given. logprobs, mask, ref_logprobs: (B, T). Returns
    (losses (B, T), the k3 KL (B, T), detached; zeros without a reference)."""
    losses = -logprobs * mask
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        log_ratio = logprobs - ref_logprobs.to(logprobs.device)
        kl = (torch.expm1(-log_ratio) + log_ratio) * mask
        if kl_coef:
            losses = losses + kl_coef * kl
    return losses, kl.detach()


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
