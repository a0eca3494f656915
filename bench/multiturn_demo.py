"""The multi-turn tool demo, measured: `python -m rlhf.ppo --config
launch/demos/ppo-tool-demo.yaml` (the tiny model after SFT on builtin:tools, GRPO, the
BoxLookupEnv whose reward only a tool call can earn), held-out reward and tool-call
share before and after training, per seed.

    .venv/bin/python bench/multiturn_demo.py                       # 1 seed, 32 steps
    .venv/bin/python bench/multiturn_demo.py --seeds 3 --record     # + bench/RESULTS.md
    .venv/bin/python bench/multiturn_demo.py rollout.max_staleness=1   # any override

The held-out split is 32 prompts x 4 samples, drawn with the same seeds before and
after (only the policy differs).
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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    from rlhf.config import PPOConfig, parse_args
    from rlhf.ppo import run
    from tests.integration.conftest import shared_ray

    shared_ray()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(42, 42 + a.seeds):
            args = ["--config", str(ROOT / "launch/demos/ppo-tool-demo.yaml"),
                    f"output.dir={tmp}", "train.eval_every=0", f"train.seed={seed}",
                    f"data.demo_pairs={16 * a.steps}", f"train.max_steps={a.steps}",
                    *a.overrides]
            t0 = time.time()
            run_dir = run(parse_args(PPOConfig, args, "rlhf.ppo"))
            s = json.loads((run_dir / "summary.json").read_text())
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in rows if "train/step_time_s" in r][1:]
            r = {"seed": seed, "reward": (s["start/eval/reward"], s["eval/reward"]),
                 "tool_share": (s["start/eval/tool_call_share"], s["eval/tool_call_share"]),
                 "turns": (s["start/eval/turns"], s["eval/turns"]),
                 "step_s": statistics.median(x["train/step_time_s"] for x in steps),
                 "wall_s": time.time() - t0}
            print(json.dumps(r), flush=True)
            out.append(r)

    def pair(key: str, i: int) -> str:
        xs = [r[key][i] for r in out]
        return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}"
                                                if len(xs) > 1 else "")

    lines = [f"held-out reward {pair('reward', 0)} -> {pair('reward', 1)}",
             f"held-out episodes that call the tool {pair('tool_share', 0)} -> "
             f"{pair('tool_share', 1)}",
             f"model turns per episode {pair('turns', 0)} -> {pair('turns', 1)}",
             f"median step {statistics.median(r['step_s'] for r in out):.2f} s, "
             f"{a.steps} steps of 16 prompts x 4 samples, {len(out)} seed(s)"]
    print("\n".join(lines))
    if a.record:
        cmd = " ".join(["bench/multiturn_demo.py", f"--seeds {a.seeds}", f"--steps {a.steps}",
                        *a.overrides, "--record"])
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - multi-turn tool demo (`bench/multiturn_demo.py`)"
                    f"\n\n`.venv/bin/python {cmd}`\n\n" + "\n".join(f"- {x}" for x in lines)
                    + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
