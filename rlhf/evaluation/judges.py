"""The evaluation's judges: a reward model exported by rlhf.rm scores every response (the
higher wins), or a causal LM is asked which of two responses is better (its letters'
log-probs, read, not sampled). `continuation_logprobs` is how a judge LM is read, here
and in the benchmarks' grading (rlhf/evaluation/benchmark_pass.py): the summed log-probs
of what follows a question its candidate answers share.

    judged = judge(cfg, setup, engines, items, aligned_texts, base_texts)
    # {"aligned": [score per response], "base": [...]} (pairwise: +1/0/-1 and 0)
"""

from __future__ import annotations

import json
import random

from cluster.models import load_tokenizer
from cluster.scoring import reward_actor
from rlhf.config import EvalConfig
from rlhf.data.judge_question import judge_prompt
from rlhf.data.pipeline import common_prefix_len
from rlhf.evaluation.engines import EngineSlot
from rlhf.evaluation.setup import Setup


def judge(cfg: EvalConfig, setup: Setup, engines: EngineSlot, items: list[dict],
          aligned: list[list[str]], base: list[list[str]]) -> dict:
    """The configured judge (setup.judge) over every (aligned, base) response pair."""
    fn = judge_pairwise if setup.judge == "pairwise" else judge_reward_model
    return fn(cfg, setup, engines, items, aligned, base)


def continuation_logprobs(engines: EngineSlot, path: str, groups: list[list[list[int]]]
                          ) -> list[list[float]]:
    """For each group of token id lists that share a question and differ in their ending
    (a judge's letters A and B, its ratings [[1]]..[[10]]): the model at `path`'s summed
    log-prob of each one's tokens after the group's shared prefix (at least its last
    token), grouped as given."""
    import ray

    seqs, starts = [], []
    for g in groups:
        start = min(min(common_prefix_len(g[0], x) for x in g[1:]), min(map(len, g)) - 1)
        seqs += g
        starts += [start] * len(g)
    engine = engines.get(path, max(map(len, seqs)) + 1)
    lps = [sum(x) for x in ray.get(engine.sequence_logprobs.remote(seqs, starts))]
    out, k = [], 0
    for g in groups:
        out.append(lps[k:k + len(g)])
        k += len(g)
    return out


def judge_texts(items: list[dict], texts: list[list[str]]):
    """(prompt, response) as RewardScorer takes them: text, or message lists for chats."""
    for it, resp in zip(items, texts):
        prompt = json.loads(it["prompt"]) if it["chat"] else it["prompt"]
        for t in resp:
            yield prompt, ([{"role": "assistant", "content": t}] if it["chat"] else t)


def judge_reward_model(cfg: EvalConfig, setup: Setup, engines: EngineSlot,
                       items: list[dict], aligned: list[list[str]], base: list[list[str]]
                       ) -> dict:
    """Scores of every response by the reward model (a Ray actor; the engine goes
    first, so one GPU is enough)."""
    import ray

    engines.close()

    scorer = reward_actor(setup.judge_path, num_gpus=1 if cfg.cluster.use_gpu else 0,
                          dtype=cfg.dtype)
    try:
        a = list(judge_texts(items, aligned))
        b = list(judge_texts(items, base))
        sa = ray.get(scorer.score.remote([x for x, _ in a], [y for _, y in a]))
        sb = ray.get(scorer.score.remote([x for x, _ in b], [y for _, y in b]))
    finally:
        ray.kill(scorer)
    return {"aligned": sa, "base": sb}


def judge_pairwise(cfg: EvalConfig, setup: Setup, engines: EngineSlot, items: list[dict],
                   aligned: list[list[str]], base: list[list[str]]) -> dict:
    """For each comparison the judge's preference for the aligned response in log-prob
    units, log p(aligned's letter) - log p(base's letter): > 0 prefers aligned. The
    aligned response is A or B at random (seeded per comparison); with both_orders it is
    asked both ways, and only a verdict the two orders agree on is a win or a loss."""
    tok = load_tokenizer(setup.judge_path)
    rng = random.Random(f"{setup.seed}/judge")
    groups, plan = [], []
    for it, ra, rb in zip(items, aligned, base):
        for a, b in zip(ra, rb):
            orders = [True, False] if cfg.judge.both_orders else [rng.random() < 0.5]
            for aligned_first in orders:
                first, second = (a, b) if aligned_first else (b, a)
                groups.append(list(judge_prompt(tok, it["prompt"], first, second, it["chat"],
                                                cfg.judge.max_length)))
                plan.append(aligned_first)
    # the letters' log-probs: every token after the shared question
    lps = continuation_logprobs(engines, setup.judge_path, groups)
    prefs = []
    for (lp_a, lp_b), aligned_first in zip(lps, plan):
        gap = lp_a - lp_b  # log p(A) - log p(B)
        prefs.append(gap if aligned_first else -gap)
    k = 2 if cfg.judge.both_orders else 1
    tol = cfg.judge.tie_tolerance
    verdicts = [(p > tol) - (p < -tol) for p in prefs]
    # both orders: a win or a loss only when the two agree; a verdict that follows the
    # position (A both times, or B both times) is a tie
    per = [float(v[0]) if len(set(v)) == 1 else 0.0
           for v in (verdicts[i:i + k] for i in range(0, len(verdicts), k))]
    return {"aligned": per, "base": [0.0] * len(per),
            "first_position_share": sum(a > b for a, b in lps) / max(len(plan), 1)}
