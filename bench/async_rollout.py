"""What asynchronous rollouts buy: rlhf.ppo's embedded default task (GRPO, demo prompts,
the tiny SFT'd policy) with rollout.max_staleness 0 (lock-step), 1 and 2, side by side
in one invocation on one machine, plainly and with the reward behind an environment
whose step takes 0.2 s (a tool behind a network call, as agentic tasks have: time the
engines and trainers spend waiting, which overlap can fill even on 2 cores).

    .venv/bin/python bench/async_rollout.py                    # 3 seeds with the env
    .venv/bin/python bench/async_rollout.py --seeds 1 --steps 16 --record
    python bench/async_rollout.py --gpu --seeds 1     # a GPU machine: 1 training GPU,
                                                      # 1 engine GPU, bf16 (gpu_check.sh)

Per run: samples/s over the steps after the first (samples over the summed step times,
which include each step's wait for its rollouts; held-out evaluations are outside
them), the median step time, and the held-out reward at the end (the same 32 held-out
prompts x 4 samples, seeded alike in every run). Per setting: mean and spread over the
seeds, and the speed-up against max_staleness 0 with the same environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENV = ["rollout.environment=rlhf.core.tasks:OpeningEnv", "rollout.env_args={latency_s: 0.2}",
       "reward.functions=[]"]


GPU = ["cluster.use_gpu=true", "cluster.num_workers=1", "model.dtype=bf16",
       "rollout.kv_cache_fraction=0.3"]


def one_run(k: int, env: bool, seed: int, steps: int, tmp: str, gpu: bool = False) -> dict:
    from rlhf.config import PPOConfig, parse_args
    from rlhf.ppo import run

    args = [f"output.dir={tmp}", "train.eval_every=0", f"train.max_steps={steps}",
            f"train.seed={seed}", f"rollout.max_staleness={k}", *(ENV if env else []),
            *(GPU if gpu else [])]
    t0 = time.time()
    run_dir = run(parse_args(PPOConfig, args, "rlhf.ppo"))
    wall = time.time() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    s = json.loads((run_dir / "summary.json").read_text())
    train = [r for r in rows if "train/step_time_s" in r][1:]  # the first: engine warm-up
    samples = sum(r["train/samples"] - p["train/samples"] for p, r in
                  zip([r for r in rows if "train/samples" in r], train))
    return {"k": k, "env": env, "seed": seed, "steps": len(train) + 1,
            "samples_per_s": samples / sum(r["train/step_time_s"] for r in train),
            "step_s": statistics.median(r["train/step_time_s"] for r in train),
            "wait_s": statistics.median(r["train/rollout_wait_s"] for r in train),
            "staleness": statistics.mean(r["train/staleness_mean"] for r in train),
            "reward_before": s["start/eval/reward"], "reward_after": s["eval/reward"],
            "wall_s": wall}


def spread(xs: list[float]) -> str:
    m = statistics.mean(xs)
    return f"{m:.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting with the env")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    p.add_argument("--gpu", action="store_true",
                   help="one training worker and the engine on a GPU each, bf16")
    a = p.parse_args(argv)
    from tests.integration.conftest import shared_ray

    shared_ray()  # one local Ray for every run (as the tests share one)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for env, seeds in ((False, [42]), (True, [42 + i for i in range(a.seeds)])):
            for seed in seeds:
                for k in (0, 1, 2):
                    r = one_run(k, env, seed, a.steps, tmp, a.gpu)
                    print(json.dumps(r), flush=True)
                    results.append(r)
    lines = ["| environment | max_staleness | samples/s | speed-up | median step | "
             "mean staleness | held-out reward before -> after | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for env in (False, True):
        base = [r["samples_per_s"] for r in results if r["env"] == env and r["k"] == 0]
        for k in (0, 1, 2):
            rs = [r for r in results if r["env"] == env and r["k"] == k]
            sps = [r["samples_per_s"] for r in rs]
            speed = statistics.mean(sps) / statistics.mean(base)
            lines.append(
                f"| {'0.2 s step' if env else 'none'} | {k} | {spread(sps)} | {speed:.2f}x | "
                f"{statistics.median(r['step_s'] for r in rs):.2f} s | "
                f"{statistics.mean(r['staleness'] for r in rs):.2f} | "
                f"{spread([r['reward_before'] for r in rs])} -> "
                f"{spread([r['reward_after'] for r in rs])} | {len(rs)} |")
    print("\n".join(lines))
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - asynchronous rollouts (`bench/async_rollout.py`)"
                    f"\n\n`.venv/bin/python bench/async_rollout.py --seeds {a.seeds} "
                    f"--steps {a.steps}{' --gpu' if a.gpu else ''} --record` (GRPO on the "
                    "demo task, 16 prompts x 4 samples per step, "
                    f"{'1 GPU worker, 1 GPU engine' if a.gpu else '2 CPU workers, 1 engine'}"
                    ", this machine)\n\n"
                    + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
