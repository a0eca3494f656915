"""Iterative DPO (RLHFlow's recipe; Xiong et al. 2024): R rounds of sample -> DPO, each
round's policy the next round's generator, and a table of gold reward and win rate
against the base after every round.

    python -m launch.iterate                     # 3 rounds on the demo (built-in SFT policy,
                                                 # the demo rule as reward and gold)
    python -m launch.iterate --rounds 3 --model runs/sft-.../model \\
        --sample data.path=prompts.jsonl reward.models=[runs/rm-.../model] \\
        --dpo train.learning_rate=5e-7 --evaluate judge.reward_model=runs/rm-gold/model \\
        --gold my_rewards:gold --reference moved

Round r (1..R), in --out (default runs/iterate-<time>/):
    round<r>-sample   python -m rlhf.sample with the round's policy (sample.seed=r: fresh
                      samples each round) -> its pairs (best against worst by default)
    round<r>-dpo      python -m rlhf.dpo on those pairs, from the round's policy; the
                      reference is the base in every round (--reference fixed) or the
                      round's own starting policy (moved)
    round<r>-eval     python -m rlhf.evaluate: the new policy against the base (win rate,
                      by rlhf.evaluate's judge), and --gold (a reward function) on the
                      held-out samples of both
rounds.md and rounds.json hold the table. Arguments after --sample / --dpo / --evaluate
go to that entry point as key=value overrides (the policy, data and output paths are
set here). A round that fails stops the loop with its error; the rounds before it stay.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from rlhf.builtin_models import builtin_sft_model
from rlhf.config import BUILTIN_MODEL, DPOConfig, EvalConfig, SampleConfig, parse_args
from rlhf.core.rewards import call_function, load_function
from rlhf.dpo import run as run_dpo
from rlhf.evaluate import run as run_evaluate
from rlhf.sample import run as run_sample


def gold_of(eval_dir: Path, gold: str) -> dict[str, float]:
    """From rlhf.evaluate's samples.jsonl: the mean gold reward of the aligned model's
    held-out samples and of the base's, and the aligned model's win rate by gold (each
    aligned sample against the base's sample of the same prompt and seed; a tie counts
    half)."""
    fn = load_function(gold)
    rows = [json.loads(x) for x in (eval_dir / "samples.jsonl").read_text().splitlines()]
    scores = {}
    for side in ("aligned", "base"):
        prompts = [r["prompt"] for r in rows for _ in r[side]]
        texts = [t for r in rows for t in r[side]]
        scores[side] = call_function(fn, gold, prompts, texts, [{} for _ in texts])
    n = max(len(scores["aligned"]), 1)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0
               for a, b in zip(scores["aligned"], scores["base"]))
    return {"gold": sum(scores["aligned"]) / n, "gold_base": sum(scores["base"]) / n,
            "gold_win_rate": wins / n}


def iterate(a: argparse.Namespace) -> list[dict]:
    out = Path(a.out or f"runs/iterate-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = builtin_sft_model("builtin:demo") if a.model == BUILTIN_MODEL else a.model
    dpo_extra = list(a.dpo)
    if a.model == BUILTIN_MODEL and not any(x.startswith("train.learning_rate=") for x in a.dpo):
        dpo_extra.insert(0, "train.learning_rate=2e-4")  # the trained tiny model's rate
    where = ["output.dir=" + str(out)]
    policy, table = base, []
    for r in range(1, a.rounds + 1):
        print(f"\n=== round {r}/{a.rounds}: sampling from {policy}", flush=True)
        sampled = run_sample(parse_args(SampleConfig, [
            f"model.name_or_path={policy}", f"sample.seed={r}", *a.sample, *where,
            f"output.name=round{r}-sample"], "rlhf.sample"))
        summary = json.loads((sampled / "summary.json").read_text())
        ref = [f"model.ref_name_or_path={base}"] if a.reference == "fixed" and r > 1 else []
        trained = run_dpo(parse_args(DPOConfig, [
            f"model.name_or_path={policy}", f"data.path={sampled / 'pairs'}", *ref,
            *dpo_extra, *where, f"output.name=round{r}-dpo"], "rlhf.dpo"))
        policy = str(trained / "model")
        evaluated = run_evaluate(parse_args(EvalConfig, [
            f"model={policy}", f"base={base}", *a.evaluate, *where,
            f"output.name=round{r}-eval"], "rlhf.evaluate"))
        res = json.loads((evaluated / "results.json").read_text())
        row = {"round": r, "pairs": summary.get("pairs", 0),
               "sample_reward": summary.get("reward_sum", 0.0) / max(summary.get("samples", 1), 1),
               "win_rate": res["win_rate"]["rate"], "ci95": res["win_rate"]["ci95"],
               "kl_per_token": res["kl"]["per_token"], "model": policy}
        if a.gold:
            row.update(gold_of(evaluated, a.gold))
        table.append(row)
        write_table(out, table, a)
    return table


def write_table(out: Path, table: list[dict], a: argparse.Namespace) -> None:
    lines = ["| round | pairs | reward of its samples | held-out gold (base's) | win rate vs "
             "base by gold | win rate vs base by rlhf.evaluate's judge (95% CI) | KL/token |",
             "|---|---|---|---|---|---|---|"]
    for t in table:
        gold = (f"{t['gold']:.3f} ({t['gold_base']:.3f}) | {t['gold_win_rate']:.3f}"
                if "gold" in t else "- | -")
        lo, hi = t["ci95"]
        lines.append(f"| {t['round']} | {t['pairs']} | {t['sample_reward']:.3f} | {gold} | "
                     f"{t['win_rate']:.3f} ({lo:.3f}-{hi:.3f}) | {t['kl_per_token']:.4f} |")
    text = "\n".join(lines)
    (out / "rounds.md").write_text(f"reference {a.reference}, gold {a.gold or '-'}\n\n{text}\n")
    (out / "rounds.json").write_text(json.dumps(table, indent=2))
    print("\n" + text, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.iterate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default=BUILTIN_MODEL, help="the base policy (round 1's)")
    p.add_argument("--reference", choices=("fixed", "moved"), default="fixed",
                   help="DPO's reference: the base in every round, or the round's policy")
    p.add_argument("--gold", default="rlhf.core.tasks:demo_opening",
                   help="a reward function (module:function) scored on the held-out samples")
    p.add_argument("--out", default="", help="the folder of the rounds' runs")
    p.add_argument("--sample", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--dpo", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--evaluate", nargs="*", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    iterate(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
