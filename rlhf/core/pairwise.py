"""A pairwise judge's preference, read from its own token probabilities and debiased for
position: the judge is asked "A or B?" with the two responses in both orders, and the
probability that `a` is better is the mean of what the two orders say.

    # log p("A"), log p("B") after the question with a first, then with b first
    two_order_preference(torch.tensor([[-0.1, -2.3]]), torch.tensor([[-0.4, -1.1]]))

And which of a prompt's scored samples make preference pairs (online DPO's, and
rlhf.sample's pairs):

    select_pairs([0.2, 0.9, 0.5, 0.1], "best_worst", min_gap=0.1)   # [(1, 3)]

Pure maths; the judge's forwards are cluster/judge_service.py's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

PAIRINGS = ("best_worst", "best_random", "all")


def two_order_preference(a_first: torch.Tensor, b_first: torch.Tensor) -> torch.Tensor:
    """(N, 2) log-probs of the letters ("A", "B") when `a` is shown as A, and (N, 2) when
    `b` is shown as A -> (N,) P(a better than b) in [0, 1]:

        0.5 x (sigma(lA - lB | a first) + sigma(lB - lA | b first))

    Each order's two letters are renormalised between themselves (the judge may put mass
    on other tokens); a judge that always answers A (position bias, no judgement) gives
    exactly 0.5."""
    if a_first.shape != b_first.shape or a_first.dim() != 2 or a_first.shape[1] != 2:
        raise ValueError(f"want two (N, 2) tables, got {tuple(a_first.shape)} and "
                         f"{tuple(b_first.shape)}")
    first = torch.sigmoid(a_first[:, 0] - a_first[:, 1])  # a is A
    second = torch.sigmoid(b_first[:, 1] - b_first[:, 0])  # a is B
    return 0.5 * (first + second)


def best_index(scores: Sequence[float]) -> int:
    """The index of the highest score, the first of equals (best-of-n's choice)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def select_pairs(scores: Sequence[float], how: str = "best_worst", min_gap: float = 0.0,
                 rng: random.Random | None = None) -> list[tuple[int, int]]:
    """One prompt's n sample scores -> [(chosen index, rejected index)]; a pair whose
    scores differ by less than `min_gap`, or not at all, is never made (a tie says
    nothing about which is better; TRL's online DPO keeps ties, RLHFlow drops them):

        best_worst   the best sample against the worst (RLHFlow's iterative DPO): at
                     most one pair; of equal scores the first is the best and the last
                     the worst
        best_random  the best against one other drawn by `rng` from those at least
                     min_gap below it: at most one pair
        all          every pair at least min_gap apart, the better one chosen: up to
                     n (n - 1) / 2 pairs, in order of (chosen, rejected) index
    """
    if how not in PAIRINGS:
        raise ValueError(f"pairing {how!r}: use one of {', '.join(PAIRINGS)}")
    s = [float(x) for x in scores]

    def apart(i: int, j: int) -> bool:
        gap = s[i] - s[j]
        return gap > 0 and gap >= min_gap

    if len(s) < 2:
        return []
    if how == "all":
        return [(i, j) if s[i] > s[j] else (j, i)
                for i in range(len(s)) for j in range(i + 1, len(s))
                if apart(i, j) or apart(j, i)]
    best = best_index(s)
    if how == "best_worst":
        worst = min(range(len(s)), key=lambda i: (s[i], -i))  # the last of the lowest
        return [(best, worst)] if apart(best, worst) else []
    others = [j for j in range(len(s)) if apart(best, j)]
    return [(best, (rng or random.Random(0)).choice(others))] if others else []
