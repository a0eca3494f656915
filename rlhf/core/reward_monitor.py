"""The reward-hacking monitor's maths: the reward's correlation with response length (a
policy that learns "longer scores higher" shows it first), and the warning when the
training reward keeps rising while a reward kept out of training (reward.gold) or the
ensemble's agreement keeps falling (Gao et al. 2022: the proxy climbs while the gold
reward turns down; Coste et al. 2023: the ensemble's members start to disagree).

    sums = length_sums(torch.tensor([1.0, 2.0]), [10, 20])   # summed over all ranks ...
    length_correlation({**sums, "reward": 3.0, "reward_sq": 5.0, "responses": 2})  # 1.0
    hacking_warnings([{"step": 8, "eval/reward": 0.1, "eval/reward[gold]": 0.5}, ...])

Pure functions: the per-step sums are all-reduced by the training loop like the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

WINDOW = 3  # evaluations over which a trend must hold before it is reported
# every warning's start: the evaluation report finds them in a run's summary by it
PREFIX = "possible reward hacking"


def length_sums(scores: torch.Tensor, lengths: Sequence[int]) -> dict[str, float]:
    """(B,) rewards and B response lengths (tokens) -> the sums Pearson's correlation
    needs beside the reward's own (reward, reward_sq, responses)."""
    n = torch.tensor([float(x) for x in lengths], dtype=torch.float64)
    r = scores.detach().double().cpu()
    return {"length": float(n.sum()), "length_sq": float((n * n).sum()),
            "reward_length": float((r * n).sum())}


def length_correlation(sums: dict) -> float:
    """Pearson's correlation of reward and response length over a step's responses, from
    the sums (responses, reward, reward_sq, length, length_sq, reward_length); 0 when
    either does not vary."""
    n = sums["responses"]
    if n < 2:
        return 0.0
    cov = sums["reward_length"] / n - sums["reward"] / n * sums["length"] / n
    var_r = sums["reward_sq"] / n - (sums["reward"] / n) ** 2
    var_l = sums["length_sq"] / n - (sums["length"] / n) ** 2
    if var_r <= 1e-12 or var_l <= 1e-12:
        return 0.0
    return max(-1.0, min(1.0, cov / math.sqrt(var_r * var_l)))


def _trend(values: list[float]) -> int:
    """+1 if every step of `values` rises, -1 if every step falls, else 0."""
    steps = [b - a for a, b in zip(values, values[1:])]
    if steps and all(d > 0 for d in steps):
        return 1
    if steps and all(d < 0 for d in steps):
        return -1
    return 0


def hacking_warnings(evals: list[dict], window: int = WINDOW,
                     whole_run: bool = False) -> list[str]:
    """The warnings the last `window` evaluations give (metrics rows with eval/reward,
    in step order): the training reward rose at each of them while the gold reward fell
    at each (eval/reward[gold]), or while the ensemble's disagreement grew at each
    (eval/reward[ensemble_std]). whole_run: every window of the run, each kind of
    warning once (its first). Empty when neither holds or there are too few."""
    rows = [r for r in evals if "eval/reward" in r]
    if whole_run:
        seen: dict[str, str] = {}
        for end in range(window, len(rows) + 1):
            for kind, text in _window_warnings(rows[end - window:end]):
                seen.setdefault(kind, text)
        return list(seen.values())
    return [text for _, text in _window_warnings(rows[-window:])] if len(rows) >= window else []


def _window_warnings(rows: list[dict]) -> list[tuple[str, str]]:
    if _trend([r["eval/reward"] for r in rows]) != 1:
        return []
    span = f"steps {rows[0]['step']}-{rows[-1]['step']}"
    rise = f"{rows[0]['eval/reward']:.3f} -> {rows[-1]['eval/reward']:.3f}"
    out = []
    if all("eval/reward[gold]" in r for r in rows) and \
            _trend([r["eval/reward[gold]"] for r in rows]) == -1:
        out.append(("gold", f"{PREFIX}: over {span} the training reward rose "
                    f"({rise}) while the gold reward (reward.gold) fell "
                    f"({rows[0]['eval/reward[gold]']:.3f} -> {rows[-1]['eval/reward[gold]']:.3f}"
                    "). Keep an earlier checkpoint, raise algo.kl_coef, or train against an "
                    "ensemble (reward.models with reward.ensemble=min or uwo)."))
    if all("eval/reward[ensemble_std]" in r for r in rows) and \
            _trend([r["eval/reward[ensemble_std]"] for r in rows]) == 1:
        out.append(("disagreement", f"{PREFIX}: over {span} the training "
                    f"reward rose ({rise}) while the reward models disagreed more and more "
                    f"(ensemble std {rows[0]['eval/reward[ensemble_std]']:.3f} -> "
                    f"{rows[-1]['eval/reward[ensemble_std]']:.3f}): the policy is leaving what "
                    "they were trained on. Consider reward.ensemble=uwo or min, or a larger "
                    "algo.kl_coef."))
    return out
