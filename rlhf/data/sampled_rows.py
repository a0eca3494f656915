"""One prompt's scored samples -> the rows rlhf.sample writes, in the formats the
training entry points read (docs/data-formats.md):

    sft     {"prompt", "completion", "score"}: the prompt's best sample (the first of
            equals), at or above a threshold when one is given (rejection sampling)
    pairs   {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}: the
            pairs of rlhf.core.pairwise.select_pairs (rlhf.dpo, rlhf.rm; the scores are
            what data.min_score_gap reads)
    scored  {"prompt", "completion", "label", "score", "sample", ...}: every sample, for
            rlhf.kto (label: desirable or not) and for analysis

A chat prompt (a list of messages) gives conversational rows: the completion, chosen
and rejected as one assistant message each, as TRL's conversational formats have them.
Every row carries the prompt's row id ("prompt_id"), so a row can be traced back.
"""

from __future__ import annotations

import random
import statistics
from typing import Any

from rlhf.core.pairwise import best_index, select_pairs


def _answer(text: str, chat: bool) -> Any:
    return [{"role": "assistant", "content": text}] if chat else text


def prompt_rows(prompt: Any, chat: bool, prompt_id: int, responses: list[str],
                scores: list[float], *, pairs: str = "best_worst", min_pair_gap: float = 0.0,
                sft_min_score: float | None = None, kto_threshold: float | None = None,
                seed: int = 0, extra: list[dict] | None = None) -> dict[str, list[dict]]:
    """{"sft": [0 or 1 row], "pairs": [rows], "scored": [one row per sample]}.

    extra: per sample, more columns for its scored row (each source's score, gold).
    kto_threshold None: label = score above the prompt's median; a prompt whose samples
    all score the same gets label None (no information: rlhf.kto counts and drops it).
    best_random draws from Random(f"{seed}-{prompt_id}"), so a resumed job draws the same.
    """
    n = len(responses)
    if len(scores) != n:
        raise ValueError(f"{n} responses but {len(scores)} scores")
    out: dict[str, list[dict]] = {"sft": [], "pairs": [], "scored": []}
    if not n:
        return out
    best = best_index(scores)
    if sft_min_score is None or scores[best] >= sft_min_score:
        out["sft"].append({"prompt": prompt, "completion": _answer(responses[best], chat),
                           "score": scores[best], "prompt_id": prompt_id})
    rng = random.Random(f"{seed}-{prompt_id}")
    for i, j in select_pairs(scores, pairs, min_pair_gap, rng):
        out["pairs"].append({"prompt": prompt, "chosen": _answer(responses[i], chat),
                             "rejected": _answer(responses[j], chat),
                             "score_chosen": scores[i], "score_rejected": scores[j],
                             "prompt_id": prompt_id})
    median = statistics.median(scores)
    uniform = len(set(scores)) == 1
    for k, (r, s) in enumerate(zip(responses, scores)):
        if kto_threshold is not None:
            label = s >= kto_threshold
        else:
            label = None if uniform else s > median
        out["scored"].append({"prompt": prompt, "completion": _answer(r, chat), "label": label,
                              "score": s, "prompt_id": prompt_id, "sample": k,
                              **((extra or [{}] * n)[k])})
    return out
