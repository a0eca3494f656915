"""What serving the reward models costs and frees: rlhf.ppo's step time and each training
worker's peak memory with the reward model on the trainers (the code before it was served,
run from a git worktree of --before), served (1 model), and served as an ensemble of 3.

The embedded GRPO default (the tiny model after the built-in SFT, the demo task) with a
reward model added to the task's reward at weight 0.1: the built-in demo reward model's
tokenizer and export, its body widened to --rm-hidden x --rm-layers (an untrained head:
its scores are noise at weight 0.1; what is measured is what holding and running it
costs; the built-in one, 2 MB, would vanish in the noise of a process's peak memory);
--steps steps, no evaluation, the served replicas
sharing the engine's and workers' CPUs (reward.cpus_per_replica=0). Step time: the mean
of train/step_time_s over the steps after the first (generation, scoring and training
together); memory: train/peak_rss_mb of training rank 0 at the last step.

    .venv/bin/python bench/reward_cost.py                 # ~8 min on 2 cores
    .venv/bin/python bench/reward_cost.py --record        # also append to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf.builtin_models import builtin_reward_model  # noqa: E402

BEFORE = "a12d7bf"  # the last commit whose trainers held reward.model


def run(code: Path, out: Path, name: str, steps: int, args: list[str]) -> dict:
    """rlhf.ppo from the source tree `code` (PYTHONPATH first, so Ray's workers import it
    too); the metrics of its steps."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "rlhf.ppo", f"output.dir={out}", f"output.name={name}",
           f"train.max_steps={steps}", "train.eval_every=0", *args]
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "train/step_time_s" in r]
    return {"step_s": statistics.mean(r["train/step_time_s"] for r in steps_rows[1:]),
            "rss_mb": steps_rows[-1]["train/peak_rss_mb"],
            "keys": sorted(k for k in steps_rows[-1] if k.startswith("train/reward["))}


def wide_reward_model(out: Path, hidden: int, layers: int) -> str:
    """The built-in demo reward model's tokenizer and rlhf_reward.json on a wider, deeper
    body of the same architecture (random weights, seeded)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    rm = Path(builtin_reward_model())
    config = AutoConfig.from_pretrained(rm)
    config.hidden_size, config.num_hidden_layers = hidden, layers
    config.intermediate_size, config.num_attention_heads = 3 * hidden, hidden // 64
    config.num_key_value_heads, config.head_dim = hidden // 64, 64
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    for f in rm.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return str(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rm-hidden", type=int, default=768)
    p.add_argument("--rm-layers", type=int, default=8)
    p.add_argument("--before", default=BEFORE, help="the commit with trainer-side scoring")
    p.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="reward-cost-"))
    rm = wide_reward_model(tmp / "rm", a.rm_hidden, a.rm_layers)
    rm_mb = (Path(rm) / "model.safetensors").stat().st_size / 2**20
    before = tmp / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(before), a.before], cwd=ROOT,
                   check=True, capture_output=True)
    try:
        copies = []
        for i in range(3):  # an ensemble of 3 (the same weights: the cost is the point)
            shutil.copytree(rm, tmp / f"rm{i}")
            copies.append(str(tmp / f"rm{i}"))
        common = ["reward.cpus_per_replica=0"]
        rows = [
            ("reward model on the trainers (before)", run(
                before, tmp / "runs", "trainers", a.steps,
                [f"reward.model={rm}", "reward.model_weight=0.1"])),
            ("served, 1 model", run(ROOT, tmp / "runs", "served1", a.steps,
                                    [f"reward.model={rm}", "reward.model_weight=0.1", *common])),
            ("served, 3 models (mean)", run(
                ROOT, tmp / "runs", "served3", a.steps,
                [f"reward.models=[{','.join(copies)}]", "reward.models_weight=0.1", *common])),
        ]
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT,
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    # the old code reports reward[model] (scored on the trainers), the new reward[rm0]
    assert "train/reward[model]" in rows[0][1]["keys"], rows[0][1]["keys"]
    assert "train/reward[rm0]" in rows[1][1]["keys"], rows[1][1]["keys"]
    one = rows[1][1]
    lines = ["| reward model | step time | vs served 1 | training worker peak RSS | vs served 1 |",
             "|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['step_s']:.2f} s | {r['step_s'] / one['step_s']:.2f}x | "
                     f"{r['rss_mb']:.0f} MB | {r['rss_mb'] - one['rss_mb']:+.0f} MB |")
    print("\n".join(lines))
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - what serving the reward models costs and frees "
                    f"(`bench/reward_cost.py`), {platform.machine()}, {os.cpu_count()} CPUs\n\n"
                    f"`.venv/bin/python bench/reward_cost.py --steps {a.steps} --record`: "
                    "rlhf.ppo's GRPO default (2 training workers, 1 engine) with a reward "
                    f"model of {a.rm_layers} layers x {a.rm_hidden} ({rm_mb:.0f} MB of fp32 "
                    "weights, the demo reward model's tokenizer, an untrained head) at "
                    f"weight 0.1; 'before' is commit {a.before} (the model a frozen "
                    "engine on each training worker)\n\n"
                    + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
