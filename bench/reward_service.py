"""The reward service under load (cluster.reward_service): scored samples per second and
each request's latency (p50, p99) with 1 and 2 replicas, against the same model scored in
the caller's own process (what rlhf.ppo's trainers do today with reward.model).

The built-in demo reward model (rlhf.rm on the demo pairs; the tiny model, 27M
non-embedding parameters) on a local Ray. Requests as the rollout coordinator sends
them: a step's samples at once (--request samples each, demo prompts with their chosen
and rejected answers), from --clients threads at a time (its batch makers), --requests
in all per setting, after one warm-up request each.

    .venv/bin/python bench/reward_service.py               # ~2 min on 2 cores
    .venv/bin/python bench/reward_service.py --record      # also append to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.reward_service import start_reward_pool  # noqa: E402
from cluster.scoring import RewardScorer  # noqa: E402
from rlhf.builtin_models import builtin_reward_model  # noqa: E402
from rlhf.data.demo import demo_pair  # noqa: E402


def requests_of(n: int, size: int) -> list[tuple[list[str], list[str]]]:
    out = []
    for i in range(n):
        pairs = [demo_pair(i * size + j) for j in range(size // 2)]
        out.append(([p["prompt"] for p in pairs for _ in (0, 1)],
                     [p[k] for p in pairs for k in ("chosen", "rejected")]))
    return out


def load(score, reqs: list, clients: int) -> dict:
    """reqs scored by `clients` threads, each taking the next request when done."""
    lat: list[float] = []
    lock = threading.Lock()
    todo = list(reqs)

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                prompts, responses = todo.pop()
            t = time.perf_counter()
            score(prompts, responses)
            with lock:
                lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"samples_per_s": sum(len(p) for p, _ in reqs) / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1,
                                                              int(0.99 * len(lat)))]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--request", type=int, default=32, help="samples per request")
    p.add_argument("--clients", type=int, default=4, help="requests in flight at once")
    p.add_argument("--batch", type=int, default=16, help="samples per replica forward")
    p.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    a = p.parse_args(argv)
    import ray

    path = builtin_reward_model()
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    reqs = requests_of(a.requests, a.request)
    rows = []
    local = RewardScorer(path, batch_size=a.batch)  # in this process, as the trainers do
    local.score(*reqs[0])
    lock = threading.Lock()  # one model, one forward at a time

    def local_score(prompts, responses):
        with lock:
            return local.score(prompts, responses)

    rows.append(("in the caller's process (reward.model today)", load(local_score, reqs, 1)))
    del local
    for replicas in (1, 2):
        pool = start_reward_pool(path, replicas=replicas, num_cpus=1, batch_size=a.batch)
        pool.score(*reqs[0])
        rows.append((f"served, {replicas} replica{'s' if replicas > 1 else ''}",
                     load(pool.score, reqs, a.clients)))
        pool.close()
    ray.shutdown()
    base = rows[1][1]["samples_per_s"]
    lines = ["| reward model | samples/s | vs 1 replica | p50 request | p99 request |",
             "|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['samples_per_s']:.0f} | "
                     f"{r['samples_per_s'] / base:.2f}x | {r['p50_s'] * 1000:.0f} ms | "
                     f"{r['p99_s'] * 1000:.0f} ms |")
    print("\n".join(lines))
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - the reward service under load "
                    f"(`bench/reward_service.py`), {platform.machine()}\n\n"
                    f"`.venv/bin/python bench/reward_service.py --requests {a.requests} "
                    f"--request {a.request} --clients {a.clients} --batch {a.batch} --record`"
                    f": the built-in demo reward model, requests of {a.request} samples, "
                    f"{a.clients} in flight (in the caller's process: one at a time, as one "
                    "model serves one forward), each replica 1 CPU\n\n"
                    + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
