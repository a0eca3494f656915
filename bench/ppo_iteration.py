"""Where an online-RL iteration's time goes: runs `rlhf.ppo` (its embedded default plus
any overrides) and summarises the per-phase times the workers log every step.

    .venv/bin/python bench/ppo_iteration.py                          # GRPO default
    .venv/bin/python bench/ppo_iteration.py algo.algorithm=ppo algo.kl_penalty=reward \\
        algo.ppo_epochs=2 train.micro_batch_size=4 algo.mini_batches=2 --record

The first step is left out (engine warm-up, first sync). Times are rank 0's (the
workers run in lock-step, so its step time is the iteration's); "generate" includes the
wait for the engine, "sync" the gather, the transfer and every engine's reload, up to
the barrier after which anyone may generate again. Held-out reward before and after is
quoted from the run's summary.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = {  # the split: generate / score / train / sync
    "generate": ("generate",),
    "score": ("score", "reference", "old_logprobs", "values"),
    "train": ("forward", "backward", "critic", "optimizer"),
    "sync": ("sync",),
}


def main(argv: list[str]) -> int:
    record = "--record" in argv
    overrides = [a for a in argv if a != "--record"]
    from rlhf.config import PPOConfig, parse_args
    from rlhf.ppo import run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_args(PPOConfig, [f"output.dir={tmp}", "train.eval_every=0", *overrides],
                         "rlhf.ppo")
        run_dir = run(cfg)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                if x]
        summary = json.loads((run_dir / "summary.json").read_text())
    steps = [r for r in rows if "train/step_time_s" in r][1:]
    med = {k: statistics.median(r.get(f"time/{k}_s", 0.0) for r in steps)
           for ks in GROUPS.values() for k in ks}
    step_s = statistics.median(r["train/step_time_s"] for r in steps)
    parts = {g: sum(med[k] for k in ks) for g, ks in GROUPS.items()}
    other = max(step_s - sum(parts.values()), 0.0)
    lines = [
        f"`{' '.join(['rlhf.ppo', *overrides]) or 'rlhf.ppo'}`: {len(steps)} steps after the "
        f"first, {cfg.train.global_batch_size} prompts x {cfg.rollout.samples_per_prompt} "
        f"samples per step, {cfg.cluster.worker_range[1]} workers, {cfg.rollout.engines} "
        f"engine(s), weights via {cfg.rollout.weight_sync}",
        f"median step {step_s:.2f} s: " + ", ".join(
            f"{g} {v:.2f} s ({100 * v / step_s:.0f}%)" for g, v in parts.items())
        + f", other {other:.2f} s ({100 * other / step_s:.0f}%)",
        "score in detail: " + ", ".join(f"{k} {med[k]:.2f} s" for k in GROUPS["score"]),
        "train in detail: " + ", ".join(f"{k} {med[k]:.2f} s" for k in GROUPS["train"]),
        f"generated tokens/s (all engines): "
        f"{statistics.median(r['train/generated_tokens_per_s'] for r in steps):,.0f}; "
        f"sync {statistics.median(r['train/sync_mb'] for r in steps):.1f} MiB per step",
        f"held-out reward {summary['start/eval/reward']:.3f} (std "
        f"{summary['start/eval/reward_std']:.3f}) -> {summary['eval/reward']:.3f} (std "
        f"{summary['eval/reward_std']:.3f}) over {summary['eval/responses']} responses",
    ]
    print("\n".join(lines))
    if record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - online-RL iteration time split "
                    f"(`bench/ppo_iteration.py`)\n\n`.venv/bin/python bench/ppo_iteration.py "
                    f"{' '.join(overrides)} --record`\n\n"
                    + "\n".join(f"- {x}" for x in lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
