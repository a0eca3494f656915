"""Online DPO against offline DPO on the same prompts, prompt budget and reward (issue:
online preference learning).

Both start from the built-in SFT policy on the demo's 256 training prompts, 4 samples per
prompt, best against worst by the demo rule (1 for an answer opening "Of course"), DPO's
sigmoid loss with beta 0.1, learning rate 2e-4, 16 prompts per step, one pass:
    online    python -m rlhf.ppo algo.algorithm=online_dpo: each step's pairs sampled by
              the policy being trained (lock-step on-policy)
    offline   python -m rlhf.sample from the starting policy (all 256 prompts at once),
              then python -m rlhf.dpo on its pairs
Each final model against the starting policy with python -m rlhf.evaluate on the demo's
held-out prompts (unseen topics, 1 sample each, the same seeds for both): the gold reward
(the rule) of its samples and its win rate by gold (launch.iterate.gold_of), and the
evaluation's own judge's win rate. --seeds seeds (sampling and training seeds).

    .venv/bin/python bench/online_dpo.py              # ~15 min on 2 cores
    .venv/bin/python bench/online_dpo.py --record     # also append to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.iterate import gold_of  # noqa: E402
from rlhf.builtin_models import builtin_sft_model  # noqa: E402

GOLD = "rlhf.core.tasks:demo_opening"


def python(*args: str) -> None:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")


def evaluate(tmp: Path, name: str, model: str, base: str) -> dict:
    python("-m", "rlhf.evaluate", f"model={model}", f"base={base}", f"output.dir={tmp}",
           f"output.name={name}")
    res = json.loads((tmp / name / "results.json").read_text())
    return {**gold_of(tmp / name, GOLD), "judge_win_rate": res["win_rate"]["rate"]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--record", action="store_true")
    a = p.parse_args(argv)
    base = builtin_sft_model("builtin:demo")
    tmp = Path(tempfile.mkdtemp(prefix="online-dpo-"))
    common = ["train.learning_rate=2e-4", "train.global_batch_size=16"]
    got: dict[str, list[dict]] = {"online DPO (rlhf.ppo)": [],
                                  "offline DPO (rlhf.sample + rlhf.dpo)": []}
    for seed in range(1, a.seeds + 1):
        python("-m", "rlhf.ppo", "algo.algorithm=online_dpo", f"model.name_or_path={base}",
               *common, "train.micro_batch_size=8", "train.max_steps=16",
               "train.eval_every=0", f"train.seed={seed}", f"output.dir={tmp}",
               f"output.name=online-{seed}")
        got["online DPO (rlhf.ppo)"].append(
            evaluate(tmp, f"eval-online-{seed}", str(tmp / f"online-{seed}" / "model"), base))
        python("-m", "rlhf.sample", f"model.name_or_path={base}", f"sample.seed={seed}",
               "sample.write=[pairs]", f"output.dir={tmp}", f"output.name=sample-{seed}")
        python("-m", "rlhf.dpo", f"model.name_or_path={base}",
               f"data.path={tmp / f'sample-{seed}' / 'pairs'}", *common,
               "train.micro_batch_size=4", f"train.seed={seed}", f"output.dir={tmp}",
               f"output.name=offline-{seed}")
        got["offline DPO (rlhf.sample + rlhf.dpo)"].append(
            evaluate(tmp, f"eval-offline-{seed}", str(tmp / f"offline-{seed}" / "model"), base))
        for name, runs in got.items():
            print(f"seed {seed} {name}: {runs[-1]}", flush=True)

    def ms(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    base_gold = got["online DPO (rlhf.ppo)"][0]["gold_base"]
    lines = ["| training | held-out gold reward | win rate vs start, by gold | win rate vs "
             "start, by the built-in reward model | per seed (gold) |", "|---|---|---|---|---|",
             f"| the starting policy | {base_gold:.3f} | - | - | - |"]
    for name, runs in got.items():
        lines.append(f"| {name} | {ms([r['gold'] for r in runs])} | "
                     f"{ms([r['gold_win_rate'] for r in runs])} | "
                     f"{ms([r['judge_win_rate'] for r in runs])} | "
                     f"{', '.join(format(r['gold'], '.3f') for r in runs)} |")
    print("\n".join(lines))
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - online against offline DPO (`bench/online_dpo.py`), "
                    f"{platform.machine()}, {os.cpu_count()} CPUs\n\n`.venv/bin/python "
                    f"bench/online_dpo.py --seeds {a.seeds} --record`: from the built-in SFT "
                    "policy, the demo's 256 training prompts once, 4 samples each, best "
                    "against worst by the demo rule, sigmoid DPO beta 0.1, lr 2e-4, 16 "
                    "prompts a step; evaluated by rlhf.evaluate on the 256 held-out prompts "
                    f"(unseen topics) against the starting policy; {a.seeds} seeds, mean ± "
                    "std\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
