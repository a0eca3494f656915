"""A pairwise judge's preference, read from its own token probabilities and debiased for
position: the judge is asked "A or B?" with the two responses in both orders, and the
probability that `a` is better is the mean of what the two orders say.

    # log p("A"), log p("B") after the question with a first, then with b first
    two_order_preference(torch.tensor([[-0.1, -2.3]]), torch.tensor([[-0.4, -1.1]]))

Pure tensor maths; the judge's forwards are cluster/judge_service.py's.
"""

from __future__ import annotations

import torch


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
