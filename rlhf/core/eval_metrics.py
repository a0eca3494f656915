"""The maths of rlhf.evaluate, pure Python: win rate and its interval, the verdict,
DPO's implicit-reward accuracy, and the degeneration measures (distinct-n, repeated
n-grams, loops) with the flags and advice they raise.

Texts are measured in whitespace-separated words, so the measures mean the same for
every tokenizer and a person can check them by reading the sample.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

WORKING, WORSE = 0.55, 0.50  # win-rate thresholds: > 55% working, < 50% worse


# ------------------------------------------------------------------------- win rate


def outcomes(aligned: Sequence[float], base: Sequence[float], tol: float = 0.0) -> list[int]:
    """Per comparison: 1 if the aligned response scored higher, -1 if lower, 0 for a tie
    (scores within `tol`)."""
    if len(aligned) != len(base):
        raise ValueError(f"{len(aligned)} aligned scores but {len(base)} base scores")
    return [0 if abs(a - b) <= tol else (1 if a > b else -1) for a, b in zip(aligned, base)]


def win_rate(results: Sequence[int]) -> float:
    """(wins + ties / 2) / comparisons: a tie is half a win, as in AlpacaEval."""
    if not results:
        raise ValueError("no comparisons")
    return (sum(r == 1 for r in results) + 0.5 * sum(r == 0 for r in results)) / len(results)


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed over n trials (95% for z=1.96):
    (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    if n <= 0:
        raise ValueError("n must be positive")
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def bootstrap_interval(groups: Sequence[Sequence[int]], resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the win rate, resampling prompts (a group is one
    prompt's comparisons: several samples of a prompt are not independent)."""
    if not groups:
        raise ValueError("no comparisons")
    rng = random.Random(seed)
    flat = [(sum(r == 1 for r in g) + 0.5 * sum(r == 0 for r in g), len(g)) for g in groups]
    rates = []
    for _ in range(resamples):
        pick = [flat[rng.randrange(len(flat))] for _ in flat]
        rates.append(sum(w for w, _ in pick) / sum(n for _, n in pick))
    rates.sort()
    lo = rates[int(math.floor((1 - level) / 2 * resamples))]
    hi = rates[min(int(math.ceil((1 + level) / 2 * resamples)) - 1, resamples - 1)]
    return lo, hi


def verdict(rate: float) -> str:
    """The seed's reading of a win rate against the base."""
    if rate > WORKING:
        return "working"
    if rate < WORSE:
        return "worse"
    return "inconclusive"


def interval_caveat(verdict_: str, lo: float, hi: float) -> str:
    """What the 95% interval adds to the verdict: "" when it lies on the verdict's side of
    its threshold, otherwise a sentence asking for more prompts."""
    if (verdict_ == "working" and lo <= WORKING) or (verdict_ == "worse" and hi >= WORSE):
        return (f" The 95% interval ({lo:.0%}-{hi:.0%}) reaches across the threshold: "
                "evaluate more prompts (data.max_prompts) or samples per prompt to be sure.")
    return ""


VERDICT_TEXT = {
    "working": "the aligned model beats its base (win rate above 55%): training worked.",
    "worse": "the aligned model loses to its base (win rate below 50%): training made it "
             "worse.",
    "inconclusive": "the aligned model is about as good as its base (win rate 50-55%): "
                    "no clear gain.",
}


# --------------------------------------------------------------- implicit reward


def implicit_reward_accuracy(aligned_chosen: Sequence[float], base_chosen: Sequence[float],
                             aligned_rejected: Sequence[float],
                             base_rejected: Sequence[float], beta: float) -> dict:
    """DPO's implicit reward r(x, y) = beta * (log pi(y|x) - log pi_base(y|x)), from
    summed response log-probs per pair. Returns accuracy (share of pairs with
    r(chosen) > r(rejected); a tie is a miss, as in TRL), the mean margin
    r(chosen) - r(rejected), and the mean rewards."""
    n = len(aligned_chosen)
    if not n or not (len(base_chosen) == len(aligned_rejected) == len(base_rejected) == n):
        raise ValueError("one log-prob per pair and model, for at least one pair")
    rc = [beta * (a - b) for a, b in zip(aligned_chosen, base_chosen)]
    rr = [beta * (a - b) for a, b in zip(aligned_rejected, base_rejected)]
    return {"accuracy": sum(c > r for c, r in zip(rc, rr)) / n,
            "margin": sum(c - r for c, r in zip(rc, rr)) / n,
            "chosen": sum(rc) / n, "rejected": sum(rr) / n, "pairs": n}


# ------------------------------------------------------------------ degeneration


def words(text: str) -> list[str]:
    return text.lower().split()


def _ngrams(ws: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all texts (Li et al., 2016); 0 when the texts
    hold no n-gram."""
    grams = [g for t in texts for g in _ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(text: str, n: int = 4) -> float:
    """Share of the text's n-grams that already occurred earlier in it (0 when it has
    none): about 0 for ordinary prose, near 1 for a text stuck in a loop."""
    grams = _ngrams(words(text), n)
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def is_looping(text: str, n: int = 4, threshold: float = 0.5) -> bool:
    """At least `threshold` of the text's n-grams are repeats."""
    return repeated_ngram_rate(text, n) >= threshold


def text_stats(texts: Sequence[str], token_lengths: Sequence[int],
               truncated: Sequence[bool]) -> dict:
    """The degeneration measures of one model's responses."""
    n = max(len(texts), 1)
    return {"responses": len(texts),
            "length_tokens": sum(token_lengths) / n,
            "length_words": sum(len(words(t)) for t in texts) / n,
            "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "repeated_4gram_rate": sum(repeated_ngram_rate(t) for t in texts) / n,
            "loop_share": sum(is_looping(t) for t in texts) / n,
            "truncated_share": sum(bool(x) for x in truncated) / n}


ADVICE = ("halve the learning rate, raise beta to 0.2-0.5, or train fewer epochs "
          "(one is usually enough for DPO)")


def drift_flags(base: dict, aligned: dict, kl_per_token: float | None,
                max_kl_per_token: float = 0.5) -> list[dict]:
    """Where the aligned model's responses cross a line its base does not: each flag is
    {"flag", "message"} in words, with the seed's advice. `base`/`aligned`: text_stats;
    kl_per_token: the KL estimate to the base per response token, in nats."""
    flags = []

    def flag(name: str, message: str) -> None:
        flags.append({"flag": name, "message": f"{message} Try: {ADVICE}."})

    a, b = aligned, base
    if a["loop_share"] >= max(b["loop_share"] + 0.1, 0.2):
        flag("repetitive", f"{a['loop_share']:.0%} of the aligned model's responses are stuck "
             f"in a loop (half or more of their 4-grams repeat), against "
             f"{b['loop_share']:.0%} of the base's.")
    if b["distinct_2"] > 0 and a["distinct_2"] < 0.7 * b["distinct_2"]:
        flag("low_diversity", f"distinct-2 fell from {b['distinct_2']:.2f} (base) to "
             f"{a['distinct_2']:.2f}: the aligned model says the same things over and over.")
    if b["length_tokens"] > 0 and not 0.5 <= a["length_tokens"] / b["length_tokens"] <= 2.0:
        flag("length", f"responses are {a['length_tokens']:.1f} tokens long on average "
             f"against the base's {b['length_tokens']:.1f}: the length drifted by more "
             "than 2x.")
    if a["truncated_share"] >= max(b["truncated_share"] + 0.2, 0.3):
        flag("no_stop", f"{a['truncated_share']:.0%} of the aligned model's responses ran to "
             f"the token limit without ending (base: {b['truncated_share']:.0%}).")
    if kl_per_token is not None and kl_per_token > max_kl_per_token:
        flag("drift", f"the aligned model is {kl_per_token:.2f} nats per token from its "
             f"base (KL estimate on its own responses; above {max_kl_per_token}): it has "
             "moved far from the model it started from.")
    return flags
