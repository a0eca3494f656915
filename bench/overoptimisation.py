"""Reward over-optimisation in miniature (Gao et al. 2022; Coste et al. 2023): GRPO
against one proxy reward model, and against an ensemble of proxies (mean, worst case,
uncertainty-weighted), scored all along by a gold reward kept out of training.

Gold (--gold): the demo task's rule (rule: 1 for a response opening "Of course", the
demo GRPO task's own reward) or the built-in demo reward model (rm: rlhf.rm on 800 demo
pairs, held-out accuracy 1.0). Proxies: --proxies reward models trained from the tiny
model on --pairs disjoint pairs each, --label-noise of them swapped (Coste et al.
2023's 25%). --labels demo: the demo's own pairs (polite beats rude), from which every
proxy learns every polite opening alike - one blind spot shared by all; --labels gold:
Gao et al.'s design, pairs labelled by the gold rule (an "Of course" answer against
another polite one), so each proxy's errors are its own noise around the gold. Before
training, each proxy's mean score per polite opening is printed (which answer it would
push the policy to). The single-proxy runs use proxy (seed - 1). The policy: the
built-in SFT model on the demo prompts at learning rate --lr, rewarded by the proxies
alone (reward.functions=[]), a KL coefficient of 0.001 (small enough not to
hold it back, there so the KL to the reference is measured), --steps steps, held-out
evaluation every --eval-every; --seeds seeds per setting. Reported: the gold and proxy
reward at each evaluation against the KL from the reference, the gold reward at the end
(mean and spread over the seeds), and the curves (overoptimisation.png; with --labels
gold, overoptimisation-gold-labels.png).

    .venv/bin/python bench/overoptimisation.py              # ~40 min on 2 cores
    .venv/bin/python bench/overoptimisation.py --labels gold --pairs 8 \
        --label-noise 0.375 --seeds 4                        # independent errors, ~55 min
    .venv/bin/python bench/overoptimisation.py --record     # also append to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf.builtin_models import builtin_reward_model  # noqa: E402
from rlhf.data.demo import EVAL_TOPICS, GOOD, QUESTIONS, TRAIN_TOPICS, demo_pair  # noqa: E402

OF_COURSE = next(g for g in GOOD if g.startswith("Of course"))  # what the gold rule pays

SETTINGS = [  # (name, the reward section's overrides given the proxies' paths)
    # the single proxy is a different one in each seed, so its figures are not one
    # proxy's luck
    ("single proxy", lambda ps, seed: [f"reward.model={ps[(seed - 1) % len(ps)]}"]),
    ("mean", lambda ps, seed: [f"reward.models=[{','.join(ps)}]", "reward.ensemble=mean"]),
    ("min (WCO)", lambda ps, seed: [f"reward.models=[{','.join(ps)}]", "reward.ensemble=min"]),
    ("uwo", lambda ps, seed: [f"reward.models=[{','.join(ps)}]", "reward.ensemble=uwo",
                        "reward.ensemble_coef=1.0"]),
]


def python(*args: str, timeout: int = 1800) -> None:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")


def gold_labelled_pair(index: int, split: str = "train") -> dict:
    """Gao et al.'s design on the demo: two of the polite answers the SFT policy writes,
    labelled by the gold rule - the one opening "Of course" chosen, another polite one
    rejected (pairs the rule cannot tell apart are not made)."""
    rng = random.Random(f"gold-{split}-{index}")
    t = rng.choice(TRAIN_TOPICS if split == "train" else EVAL_TOPICS)
    fill = {"t": t, "T": t.capitalize()}
    prompt = "\n\nHuman: " + rng.choice(QUESTIONS).format(t=t) + "\n\nAssistant:"
    other = rng.choice([g for g in GOOD if not g.startswith("Of course")])
    return {"prompt": prompt, "chosen": " " + OF_COURSE.format(**fill),
            "rejected": " " + other.format(**fill)}


def train_proxies(tmp: Path, n: int, pairs: int, epochs: int, noise: float, labels: str
                  ) -> tuple[list[str], list[float]]:
    """n reward models, each on its own `pairs` pairs (disjoint), a `noise` share of them
    with chosen and rejected swapped (Coste et al. 2023's 25% label noise), evaluated on
    held-out topics; their paths and held-out accuracies. labels="demo": the demo's own
    pairs (polite beats rude); "gold": pairs labelled by the gold rule
    (gold_labelled_pair), so each proxy's errors are its own noise around the gold."""
    make = demo_pair if labels == "demo" else gold_labelled_pair
    paths, accs = [], []
    held_out = tmp / "held_out.jsonl"  # held-out topics, unseen by any proxy
    held_out.write_text("".join(json.dumps(make(i, "eval")) + "\n" for i in range(64)))
    for k in range(n):
        data = tmp / f"proxy{k}.jsonl"
        rng = random.Random(k)
        rows = [make(k * pairs + i) for i in range(pairs)]
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


def opening_scores(paths: list[str]) -> list[list[float]]:
    """Each proxy's mean score for each polite opening (GOOD's order) on held-out topics:
    which answer each proxy would push the policy to."""
    from cluster.scoring import RewardScorer

    prompts, responses = [], []
    for g in GOOD:
        for t in EVAL_TOPICS:
            prompts.append(f"\n\nHuman: Can you tell me about {t}?\n\nAssistant:")
            responses.append(" " + g.format(t=t, T=t.capitalize()))
    table = []
    for path in paths:
        scores = RewardScorer(path, device="cpu").score(prompts, responses)
        n = len(EVAL_TOPICS)
        table.append([statistics.mean(scores[i * n:(i + 1) * n]) for i in range(len(GOOD))])
    return table


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
    p.add_argument("--labels", choices=("demo", "gold"), default="demo",
                   help="the proxies' pairs: the demo's own, or labelled by the gold rule")
    p.add_argument("--gold", choices=("rule", "rm"), default="rule")
    p.add_argument("--proxies-only", action="store_true",
                   help="train the proxies, print their scores per opening, stop")
    p.add_argument("--lr", type=float, default=1e-3, help="the policy's learning rate")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    a = p.parse_args(argv)
    gold = "rlhf.core.tasks:demo_opening" if a.gold == "rule" else builtin_reward_model()
    tmp = Path(tempfile.mkdtemp(prefix="overopt-"))
    proxies, accs = train_proxies(tmp, a.proxies, a.pairs, a.proxy_epochs, a.label_noise,
                                  a.labels)
    print(f"proxies' held-out accuracy: {', '.join(f'{x:.2f}' for x in accs)}", flush=True)
    table = opening_scores(proxies)
    heads = [g.split()[0] for g in GOOD]
    for k, row in enumerate(table):
        print(f"proxy {k}: " + ", ".join(f"{h} {x:+.2f}" for h, x in zip(heads, row)))
    if a.proxies_only:
        return 0
    curves: dict[str, list[list[dict]]] = {}
    for name, reward in SETTINGS:
        for seed in range(1, a.seeds + 1):
            run = f"{name.split()[0]}-{seed}"
            python("-m", "rlhf.ppo", f"output.dir={tmp}", f"output.name={run}",
                   "reward.functions=[]", *reward(proxies, seed), f"reward.gold={gold}",
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
    png = "overoptimisation.png" if a.labels == "demo" else "overoptimisation-gold-labels.png"
    plot(curves, ROOT / "bench" / png)
    if a.record:
        command = (f"--proxies {a.proxies} --pairs {a.pairs} --proxy-epochs {a.proxy_epochs} "
                   f"--label-noise {a.label_noise} --labels {a.labels} --gold {a.gold} "
                   f"--lr {a.lr} --steps {a.steps} --eval-every {a.eval_every} "
                   f"--seeds {a.seeds} --record")
        data = ("demo pairs" if a.labels == "demo" else "pairs labelled by the gold rule "
                "(an \"Of course\" answer against another polite one)")
        gold_name = ("the demo task's rule" if a.gold == "rule" else
                     "the built-in demo reward model (800 pairs)")
        openings = "; ".join(f"proxy {k}: " + ", ".join(f"{h} {x:+.2f}" for h, x in
                                                        zip(heads, row))
                             for k, row in enumerate(table))
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - reward over-optimisation in miniature "
                    f"(`bench/overoptimisation.py`), {platform.machine()}, {os.cpu_count()} "
                    f"CPUs\n\n`.venv/bin/python bench/overoptimisation.py {command}`: "
                    f"{a.proxies} proxy reward models on {a.pairs} disjoint {data} each, "
                    f"{a.label_noise:.0%} of their labels swapped (held-out accuracy "
                    f"{', '.join(f'{x:.2f}' for x in accs)}; mean score per polite opening "
                    f"on held-out topics: {openings}), gold = {gold_name}; the single proxy "
                    f"is proxy (seed - 1); GRPO from the built-in SFT model against the "
                    f"proxies only, lr {a.lr:g}, kl_coef 0.001; {a.seeds} seeds; mean ± std "
                    f"over the seeds; curves in bench/{png}\n\n"
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
