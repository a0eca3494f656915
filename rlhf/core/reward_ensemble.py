"""Several reward sources made one reward: an ensemble of reward models combined as Coste
et al. 2023 ("Reward Model Ensembles Help Mitigate Overoptimization", ICLR 2024) do, each
source normalised over the batch before or after the weighted sum (TRL's
multi_objective_aggregation; GDPO normalises each reward before summing), the ensemble's
disagreement for the reward-hacking monitor, and the mask of reward thresholds.

    scores = torch.tensor([[0.2, 1.0], [0.4, -1.0], [0.3, 0.0]])  # (M models, B samples)
    combine_models(scores, "min")                # (B,) worst case: [0.2, -1.0]
    combine_models(scores, "uwo", coef=0.5)      # mean - 0.5 x intra-ensemble variance

Pure tensor maths, no Ray: the reward service (cluster/) calls these on the scores it
gathers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

ENSEMBLES = ("mean", "min", "uwo", "mean_minus_std")
AGGREGATIONS = ("sum_then_normalise", "normalise_then_sum")


def combine_models(scores: torch.Tensor, how: str = "mean", coef: float = 0.0) -> torch.Tensor:
    """(M, B) scores of M reward models for B samples -> (B,) ensemble rewards.

    mean:            (1/M) sum_i r_i                          (Coste et al., mean)
    min:             min_i r_i                                (worst-case optimisation, WCO)
    uwo:             mean - coef x (1/M) sum_i (r_i - mean)^2 (uncertainty-weighted, UWO:
                     the intra-ensemble variance, population form, as in the paper's eq. 3)
    mean_minus_std:  mean - coef x sqrt(that variance)        (the same penalty in the
                     scores' own units, so coef does not depend on the reward's scale)
    One model: every rule gives its scores (variance 0)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (models, samples), got shape {tuple(scores.shape)}")
    if how not in ENSEMBLES:
        raise ValueError(f"ensemble {how!r}: use one of {', '.join(ENSEMBLES)}")
    mean = scores.mean(dim=0)
    if how == "mean":
        return mean
    if how == "min":
        return scores.min(dim=0).values
    var = scores.var(dim=0, unbiased=False)
    return mean - coef * (var if how == "uwo" else var.sqrt())


def disagreement(scores: torch.Tensor) -> torch.Tensor:
    """(M, B) -> (B,) the ensemble's standard deviation per sample (population form): the
    monitor's sign that the policy has left the region where the models agree."""
    return scores.var(dim=0, unbiased=False).sqrt()


def normalise(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(..., B) -> zero mean, unit (population) standard deviation over the last axis; a
    constant row becomes 0 (nothing to tell its samples apart)."""
    mean = scores.mean(dim=-1, keepdim=True)
    std = scores.std(dim=-1, unbiased=False, keepdim=True)
    return (scores - mean) / (std + eps)


def aggregate(scores: torch.Tensor, weights: Sequence[float],
              how: str = "sum_then_normalise", groups: Sequence[int] | None = None
              ) -> torch.Tensor:
    """(S, B) scores of S sources (rule functions, environments, the reward-model
    ensemble, a remote endpoint) -> (B,) the reward the policy is trained on.

    sum_then_normalise:  sum_s w_s r_s (the algorithm's advantage estimator normalises
                         what it needs)
    normalise_then_sum:  sum_s w_s norm_g(r_s): each source first brought to zero mean
                         and unit (population) std within each group g of samples (a
                         prompt's samples: `groups` gives each sample's group; None: the
                         whole batch is one group), so that a source on a large scale (a
                         reward model's logits) does not drown one on a small scale (a 0/1
                         rule) (GDPO; TRL's multi_objective_aggregation, which normalises
                         per group the same way). A source constant within a group gives
                         that group 0: it tells the group's samples nothing apart."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation {how!r}: use one of {', '.join(AGGREGATIONS)}")
    w = torch.as_tensor(list(weights), dtype=scores.dtype).unsqueeze(1)
    if w.shape[0] != scores.shape[0]:
        raise ValueError(f"{w.shape[0]} weights for {scores.shape[0]} sources")
    if how == "sum_then_normalise":
        return (w * scores).sum(dim=0)
    g = torch.as_tensor(list(groups) if groups is not None else [0] * scores.shape[1])
    out = torch.empty_like(scores)
    for key in g.unique():
        cols = (g == key).nonzero().squeeze(1)
        out[:, cols] = normalise(scores[:, cols])
    return (w * out).sum(dim=0)


def within_thresholds(rewards: torch.Tensor, min_score: float | None = None,
                      max_score: float | None = None) -> torch.Tensor:
    """(B,) -> (B,) bool: the samples whose reward lies in [min_score, max_score] (either
    bound None: open on that side). The rest are dropped, and counted, by the caller."""
    keep = torch.ones_like(rewards, dtype=torch.bool)
    if min_score is not None:
        keep &= rewards >= min_score
    if max_score is not None:
        keep &= rewards <= max_score
    return keep


@dataclass
class ModelEnsemble:
    """Reward models as one reward source: each model's scores, combined by `how`
    (combine_models), weighted by `weight` in the sum of sources. `scorers[i](prompts,
    responses)` -> one float per response (a served reward model: RewardPool.score)."""

    names: list[str]
    scorers: list[Callable[[Sequence, Sequence], list[float]]]
    how: str = "mean"
    coef: float = 0.0
    weight: float = 1.0

    def __call__(self, prompts: Sequence, responses: Sequence
                 ) -> tuple[list[float], dict[str, list[float]]]:
        """(B combined scores, {each model's name: its B scores, "ensemble": the
        combined, "ensemble_std": the models' disagreement})."""
        # the models at once (each call waits on its own served replicas)
        with ThreadPoolExecutor(max_workers=len(self.scorers)) as pool:
            per_model = list(pool.map(lambda score: list(map(float, score(prompts, responses))),
                                      self.scorers))
        scores = torch.tensor(per_model, dtype=torch.float64).reshape(len(per_model), -1)
        combined = combine_models(scores, self.how, self.coef).tolist()
        parts = dict(zip(self.names, per_model))
        parts["ensemble"] = combined
        parts["ensemble_std"] = disagreement(scores).tolist()
        return combined, parts
