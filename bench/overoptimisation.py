"""Reward over-optimisation in miniature (Gao et al. 2022; Coste et al. 2023): GRPO
against one proxy reward model, and against an ensemble of proxies (mean, worst case,
uncertainty-weighted), scored all along by a gold reward kept out of training.

Gold (--gold): the demo task's rule (rule: 1 for a response opening "Of course", the
demo GRPO task's own reward) or the built-in demo reward model (rm: rlhf.rm on 800 demo
pairs, held-out accuracy 1.0). Proxies: --proxies reward models trained from the tiny
model on --pairs disjoint demo pairs each, --label-noise of them swapped (Coste et al.
2023's 25%): they learn "polite beats rude" from every polite opening alike, so pushing
one of them hard may settle on an opening the rule does not pay. The policy: the
built-in SFT model on the demo prompts at learning rate --lr, rewarded by the proxies
alone (reward.functions=[]), a KL coefficient of 0.001 (small enough not to
hold it back, there so the KL to the reference is measured), --steps steps, held-out
evaluation every --eval-every; --seeds seeds per setting. Reported: the gold and proxy
reward at each evaluation against the KL from the reference, the gold reward at the end
(mean and spread over the seeds), and overoptimisation.png.

    .venv/bin/python bench/overoptimisation.py              # ~40 min on 2 cores
    .venv/bin/python bench/overoptimisation.py --record     # also append to bench/RESULTS.md
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

from rlhf.builtin_models import builtin_reward_model  # noqa: E402
from rlhf.data.demo import demo_pair  # noqa: E402

SETTINGS = [  # (name, the reward section's overrides given the proxies' paths)
    ("single proxy", lambda ps: [f"reward.model={ps[0]}"]),
    ("mean", lambda ps: [f"reward.models=[{','.join(ps)}]", "reward.ensemble=mean"]),
    ("min (WCO)", lambda ps: [f"reward.models=[{','.join(ps)}]", "reward.ensemble=min"]),
    ("uwo", lambda ps: [f"reward.models=[{','.join(ps)}]", "reward.ensemble=uwo",
                        "reward.ensemble_coef=1.0"]),
]


def python(*args: str, timeout: int = 1800) -> None:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")


def train_proxies(tmp: Path, n: int, pairs: int, epochs: int, noise: float
                  ) -> tuple[list[str], list[float]]:
    """n reward models, each on its own `pairs` demo pairs (disjoint), a `noise` share of
    them with chosen and rejected swapped (Coste et al. 2023's 25% label noise: the demo
    preference is too easy to learn wrongly otherwise), evaluated on the demo's held-out
    pairs; their paths and held-out accuracies."""
    import random

    paths, accs = [], []
    held_out = tmp / "held_out.jsonl"  # the demo's held-out topics, unseen by any proxy
    held_out.write_text("".join(json.dumps(demo_pair(i, "eval")) + "\n" for i in range(64)))
    for k in range(n):
        data = tmp / f"proxy{k}.jsonl"
        rng = random.Random(k)
        rows = [demo_pair(k * pairs + i) for i in range(pairs)]
        for i in rng.sample(range(pairs), round(noise * pairs)):
            rows[i] = {**rows[i], "chosen": rows[i]["rejected"], "rejected": rows[i]["chosen"]}
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        python("-m", "rlhf.rm", f"data.path={data}", f"data.eval_path={held_out}",
               f"train.epochs={epochs}", f"output.dir={tmp}", f"output.name=proxy{k}",
               "train.eval_every=0")
        paths.append(str(tmp / f"proxy{k}" / "model"))
        accs.append(json.loads((tmp / f"proxy{k}" / "summary.json").read_text())
                    ["eval/accuracy"])
    return paths, accs


def evaluations(run_dir: Path) -> list[dict]:
    """The held-out rows (step 0 and every evaluation, the final one included)."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "eval/reward" in r:
            rows.setdefault(r["step"], {}).update(r)
    return [rows[s] for s in sorted(rows)]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--proxies", type=int, default=4)
    p.add_argument("--pairs", type=int, default=24, help="demo pairs per proxy")
    p.add_argument("--proxy-epochs", type=int, default=2)
    p.add_argument("--label-noise", type=float, default=0.25)
    p.add_argument("--gold", choices=("rule", "rm"), default="rule")
    p.add_argument("--lr", type=float, default=1e-3, help="the policy's learning rate")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    a = p.parse_args(argv)
    gold = "rlhf.core.tasks:demo_opening" if a.gold == "rule" else builtin_reward_model()
    tmp = Path(tempfile.mkdtemp(prefix="overopt-"))
    proxies, accs = train_proxies(tmp, a.proxies, a.pairs, a.proxy_epochs, a.label_noise)
    print(f"proxies' held-out accuracy: {', '.join(f'{x:.2f}' for x in accs)}", flush=True)
    curves: dict[str, list[list[dict]]] = {}
    for name, reward in SETTINGS:
        for seed in range(1, a.seeds + 1):
            run = f"{name.split()[0]}-{seed}"
            python("-m", "rlhf.ppo", f"output.dir={tmp}", f"output.name={run}",
                   "reward.functions=[]", *reward(proxies), f"reward.gold={gold}",
                   "reward.cpus_per_replica=0", "algo.kl_coef=0.001",
                   f"train.max_steps={a.steps}", f"train.eval_every={a.eval_every}",
                   f"train.learning_rate={a.lr}",
                   f"train.seed={seed}")
            curves.setdefault(name, []).append(evaluations(tmp / run))
            last = curves[name][-1][-1]
            print(f"{run}: gold {curves[name][-1][0]['eval/reward[gold]']:.3f} -> "
                  f"{last['eval/reward[gold]']:.3f}, proxy {last['eval/reward']:.3f}, "
                  f"KL {last['eval/kl']:.3f}", flush=True)
    lines = ["| training reward | gold at start | gold, best evaluation | gold at the end "
             "| proxy at the end | KL at the end | gold falling at the end while proxy rises |",
             "|---|---|---|---|---|---|---|"]

    def ms(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    for name, runs in curves.items():
        start = [r[0]["eval/reward[gold]"] for r in runs]
        best = [max(x["eval/reward[gold]"] for x in r) for r in runs]
        end = [r[-1]["eval/reward[gold]"] for r in runs]
        proxy = [r[-1]["eval/reward"] for r in runs]
        kl = [r[-1]["eval/kl"] for r in runs]
        hacked = sum(r[-1]["eval/reward[gold]"] < r[-2]["eval/reward[gold]"]
                     and r[-1]["eval/reward"] > r[-2]["eval/reward"] for r in runs)
        lines.append(f"| {name} | {ms(start)} | {ms(best)} | {ms(end)} | {ms(proxy)} | "
                     f"{ms(kl)} | {hacked} of {len(runs)} seeds |")
    print("\n".join(lines))
    plot(curves, ROOT / "bench" / "overoptimisation.png")
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - reward over-optimisation in miniature "
                    f"(`bench/overoptimisation.py`), {platform.machine()}, {os.cpu_count()} "
                    f"CPUs\n\n`.venv/bin/python bench/overoptimisation.py --proxies "
                    f"{a.proxies} --pairs {a.pairs} --proxy-epochs {a.proxy_epochs} "
                    f"--label-noise {a.label_noise} --gold {a.gold} --lr {a.lr} --steps "
                    f"{a.steps} --eval-every {a.eval_every} --seeds {a.seeds} --record`: "
                    f"{a.proxies} proxy reward models on {a.pairs} disjoint demo pairs each, "
                    f"{a.label_noise:.0%} of their labels swapped (held-out accuracy "
                    f"{', '.join(f'{x:.2f}' for x in accs)}), gold = "
                    + ("the demo task's rule" if a.gold == "rule" else
                       "the built-in demo reward model (800 pairs)")
                    + f"; GRPO from the built-in SFT model against the proxies only, lr "
                    f"{a.lr:g}, kl_coef 0.001; {a.seeds} seeds; mean ± std over the seeds; "
                    "curves in bench/overoptimisation.png\n\n"
                    + "\n".join(lines) + "\n")
    return 0


def plot(curves: dict, out: Path) -> None:
    """Gold (solid) and proxy (dashed) reward against sqrt(KL), each seed a thin line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.6), sharey=True)
    for ax, (name, runs) in zip(axes, curves.items()):
        for r in runs:
            x = [max(e["eval/kl"], 0.0) ** 0.5 for e in r]
            ax.plot(x, [e["eval/reward[gold]"] for e in r], "-o", color="tab:green",
                    ms=3, lw=1, label="gold")
            ax.plot(x, [e["eval/reward"] for e in r], "--", color="tab:red", lw=1,
                    label="proxy (training reward)")
        ax.set_title(name)
        ax.set_xlabel("sqrt(KL to the reference)")
    axes[0].set_ylabel("reward (held-out)")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].legend(handles[:2], labels[:2], fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
