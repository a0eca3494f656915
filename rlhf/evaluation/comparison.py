"""The comparison of the aligned model with its base: per prompt, the judge's outcome of
each sample pair; over all, the win rate with a bootstrap interval and its verdict (> 55%
working, < 50% worse), the implicit-reward accuracy on held-out pairs, the KL to the base,
and drift flags (rlhf/core/eval_metrics.py has the maths).

    results, samples = summarise(cfg, setup, items, aligned, base, texts_a, texts_b,
                                 judged, counts, left_out)
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import fields
from pathlib import Path

from rlhf.config import EvalConfig
from rlhf.core import eval_metrics as em
from rlhf.core import reward_monitor
from rlhf.evaluation.setup import Setup

DEMO_NOTE = (" (The demo: a tiny model that starts from random weights, on the project's "
             "generated pairs, judged by a reward model trained on the same kind of pairs. "
             "'Working' means training moved the model the way the demo preference asks, "
             "polite and on topic; its text is still word salad.)")


def win_rate(groups: list[list[int]], seed: int) -> dict:
    """Outcomes (+1 win, 0 tie, -1 loss) grouped per prompt -> {"rate" (ties half),
    "ci95" (bootstrap over prompts), "wins", "ties", "losses", "verdict", "says"}."""
    flat = [r for g in groups for r in g]
    rate = em.win_rate(flat)
    lo, hi = em.bootstrap_interval(groups, seed=seed)
    v = em.verdict(rate)
    return {"rate": rate, "ci95": [lo, hi], "wins": flat.count(1), "ties": flat.count(0),
            "losses": flat.count(-1), "verdict": v,
            "says": em.VERDICT_TEXT[v] + em.interval_caveat(v, lo, hi)}


def training_flags(run_dir: Path | None) -> list[dict]:
    """The training run's own warnings worth a flag: the reward-hacking monitor's (online
    RL; rlhf.core.reward_monitor), from its summary.json."""
    summary = run_dir / "summary.json" if run_dir is not None else None
    if summary is None or not summary.is_file():
        return []
    return [{"flag": "reward_hacking", "message": w}
            for w in json.loads(summary.read_text()).get("warnings", [])
            if w.startswith(reward_monitor.PREFIX)]


def summarise(cfg: EvalConfig, setup: Setup, items: list[dict], aligned: dict, base: dict,
              texts_a: list[list[str]], texts_b: list[list[str]], judge: dict,
              counts: Counter, left_out: Counter) -> tuple[dict, list[dict]]:
    """Per-prompt records (samples.jsonl) and the results (results.json): win rate,
    preference accuracy, KL, text statistics and flags. aligned / base: model_pass's
    output; texts_*: their decoded samples; judge: the judge's scores."""
    tol = cfg.judge.tie_tolerance if setup.judge == "reward_model" else 0.0
    groups, samples, k = [], [], 0
    kls, tokens = [], 0
    for it, sa, sb, ta, tb in zip(items, aligned["samples"], base["samples"], texts_a,
                                  texts_b):
        n = len(sa)
        ja, jb = judge["aligned"][k:k + n], judge["base"][k:k + n]
        res = em.outcomes(ja, jb, tol)
        groups.append(res)
        kl = [s["logp"] - other for s, other in zip(sa, base["other"][k:k + n])]
        kls += kl
        tokens += sum(len(s["token_ids"]) for s in sa)
        k += n
        samples.append({"id": it["id"], "prompt": it["prompt"], "aligned": ta, "base": tb,
                        "judge_aligned": ja, "judge_base": jb, "outcome": res, "kl": kl,
                        "aligned_tokens": [len(s["token_ids"]) for s in sa],
                        "base_tokens": [len(s["token_ids"]) for s in sb]})
    flat = [r for g in groups for r in g]
    won = win_rate(groups, setup.seed)

    def stats(ss, texts):
        flat_s = [s for o in ss for s in o]
        return em.text_stats([t for o in texts for t in o],
                             [len(s["token_ids"]) for s in flat_s],
                             [s["finish"] == "length" for s in flat_s])

    sa, sb = stats(aligned["samples"], texts_a), stats(base["samples"], texts_b)
    kl_seq = sum(kls) / max(len(kls), 1)
    kl_tok = sum(kls) / max(tokens, 1)
    results = {
        "aligned": setup.aligned, "base": setup.base,
        "run": str(setup.run_dir) if setup.run_dir else None,
        "judge": {"kind": setup.judge, "path": setup.judge_path,
                  **({"both_orders": cfg.judge.both_orders,
                      "first_position_share": judge["first_position_share"]}
                     if setup.judge == "pairwise" else {})},
        "data": {"source": setup.data.eval_path or setup.data.path,
                 "rows_read": sum(counts.values()), "usable": counts[""],
                 "dropped": {r: n for r, n in counts.items() if r},
                 "left_out": dict(left_out), "prompts": len(items),
                 "samples_per_prompt": cfg.generation.samples_per_prompt},
        "generation": {f.name: getattr(cfg.generation, f.name)
                       for f in fields(cfg.generation)},
        "win_rate": {"rate": won.pop("rate"), "ci95": won.pop("ci95"),
                     "comparisons": len(flat), **won},
        "kl": {"per_response": kl_seq, "per_token": kl_tok},
        "stats": {"aligned": sa, "base": sb},
        "judge_scores": {"aligned": sum(judge["aligned"]) / len(flat),
                         "base": sum(judge["base"]) / len(flat)},
    }
    if aligned["chosen"]:
        results["preference"] = {"beta": setup.beta, **em.implicit_reward_accuracy(
            aligned["chosen"], base["chosen"], aligned["rejected"], base["rejected"],
            setup.beta)}
    results["flags"] = em.drift_flags(sb, sa, kl_tok, cfg.max_kl_per_token)
    results["flags"] += training_flags(setup.run_dir)
    if setup.demo:
        results["win_rate"]["says"] += DEMO_NOTE
    if results["flags"] and results["win_rate"]["verdict"] != "worse":
        results["win_rate"]["says"] += (" But the aligned responses show signs of "
                                        "degeneration (below), and a judge can be fooled by "
                                        "them: read the samples before trusting this win "
                                        "rate.")
    return results, samples


