"""Held-out quality of the preference objectives on the same pairs: DPO, KTO (the pairs
split into unpaired rows), ORPO, CPO and SimPO, 3 seeds, on the demo and on hh-rlhf.

Each run trains the tiny model (python -m rlhf.dpo / rlhf.kto, their defaults, the same
pairs, steps and global batch in pairs) and is then scored the same way whatever its
objective: the held-out pairs' implicit-reward accuracy against the starting model,
beta (log pi - log pi_base), chosen above rejected (DPO's measure; for the
reference-free objectives the base is only the yardstick), through plain transformers.
The run's own held-out figure (each objective's implicit reward: SimPO's and ORPO's are
per-token means, CPO's sums, KTO's desirable-minus-undesirable margin) is shown beside it.
On hh-rlhf each seed trains on its own random sample of the pairs (a run's train.seed
alone changes nothing: the data is read in file order and the tiny model's starting
weights are fixed).

    .venv/bin/python bench/objectives_quality.py            # ~75 min on 2 cores
    .venv/bin/python bench/objectives_quality.py --hh-pairs 600 --datasets hh-rlhf \
        --record                                            # ~40 min; append to RESULTS.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

from rlhf.config import DataConfig  # noqa: E402
from rlhf.core.logprobs import pad_pairs, sequence_logprobs  # noqa: E402
from rlhf.data.demo import demo_pair, ensure_tiny_model  # noqa: E402
from rlhf.data.pipeline import detect_layout, normalise_row, tokenize_pair  # noqa: E402

# (name, entry point, overrides): the same pairs and steps for each
METHODS = [("DPO", "rlhf.dpo", []),
           ("KTO", "rlhf.kto", ["train.global_batch_size=16"]),  # 8 pairs, split in two
           ("ORPO", "rlhf.dpo", ["loss.type=orpo"]),
           ("CPO", "rlhf.dpo", ["loss.type=cpo"]),
           ("SimPO", "rlhf.dpo", ["loss.type=simpo", "loss.beta=2.0"])]  # SimPO's beta


def held_out_pairs(dataset: str, work: Path) -> list[dict]:
    if dataset == "demo":
        return [demo_pair(i, "eval") for i in range(256)]
    return [json.loads(x) for x in (work / "hh-eval.jsonl").read_text().splitlines()]


def implicit_accuracy(model_dir: str, base_dir: str, pairs: list[dict]) -> float:
    """Share of held-out pairs whose chosen response gains more log-probability from the
    base to the trained model than the rejected one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    d, wins = DataConfig(max_length=256, max_prompt_length=128), 0
    layout = detect_layout(pairs[0], d, "held-out")  # explicit (demo) or implicit (hh)
    for row in pairs:
        prompt, chosen, rejected, _, drop = normalise_row(row, layout)
        ids = tokenize_pair(tok, prompt, chosen, rejected, False, d.max_length,
                            d.max_prompt_length, d.truncation)
        if drop or ids[5]:
            continue
        b = pad_pairs([ids[0]], [ids[1]], [ids[2]], tok.pad_token_id)
        with torch.no_grad():
            lp = [sequence_logprobs(m(input_ids=b["input_ids"],
                                      attention_mask=b["attention_mask"]).logits,
                                    b["input_ids"], b["loss_mask"])[0] for m in (model, base)]
        ratio = lp[0] - lp[1]
        wins += float(ratio[0] > ratio[1])
    return wins / len(pairs)  # an unusable pair counts as a miss


def native(summary: dict) -> str:
    if "eval/rewards/accuracy" in summary:
        return f"acc {summary['eval/rewards/accuracy']:.3f}"
    return f"margin {summary['eval/rewards/margin']:+.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--demo-pairs", type=int, default=800)
    ap.add_argument("--hh-pairs", type=int, default=2000,
                    help="hh-rlhf pairs to train on, a random sample per seed of the first "
                         "2,000 (the last 312 are held out)")
    ap.add_argument("--datasets", default="demo,hh-rlhf", help="which: demo, hh-rlhf or both")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="objectives-"))
    rows = [x for x in gzip.open(HH, "rt")]
    (work / "hh-eval.jsonl").write_text("".join(rows[2000:]))  # the same 312 for every run
    # A run's train.seed does not change it (the trainer reads the data in file order and
    # the tiny model starts from the same weights), so each seed trains on its own random
    # --hh-pairs of the first 2,000: the spread is that of the training sample.
    for seed in range(1, a.seeds + 1):
        sample = random.Random(seed).sample(rows[:2000], min(a.hh_pairs, 2000))
        (work / f"hh-train-{seed}.jsonl").write_text("".join(sample))
    base = str(ensure_tiny_model())
    data = {"demo": [f"data.demo_pairs={a.demo_pairs}"],
            "hh-rlhf": [f"data.path={work / 'hh-train-{seed}.jsonl'}",
                        f"data.eval_path={work / 'hh-eval.jsonl'}",
                        "data.max_length=256", "data.max_prompt_length=128"]}
    data = {k: v for k, v in data.items() if k in a.datasets.split(",")}
    table = ["| data | objective | held-out implicit-reward accuracy vs the base, "
             f"{a.seeds} seeds (mean, min-max) | the run's own held-out figure |",
             "|---|---|---|---|"]
    for dataset, args in data.items():
        pairs = held_out_pairs(dataset, work)
        for name, module, extra in METHODS:
            accs, own = [], []
            for seed in range(1, a.seeds + 1):
                out = work / f"{dataset}-{name}-{seed}"
                cmd = [sys.executable, "-m", module,
                       *(x.replace("{seed}", str(seed)) for x in args), *extra,
                       f"train.seed={seed}",
                       "train.eval_every=0", "train.checkpoint_every=0",
                       f"output.dir={out}", "output.name=run"]
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
                if r.returncode:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
                s = json.loads((out / "run" / "summary.json").read_text())
                accs.append(implicit_accuracy(str(out / "run" / "model"), base, pairs))
                own.append(native(s))
                print(f"{dataset} {name} seed {seed}: {accs[-1]:.3f} ({own[-1]})", flush=True)
            table.append(f"| {dataset} ({len(pairs)} held-out pairs) | {name} | "
                         f"{statistics.mean(accs):.3f} ({min(accs):.3f}-{max(accs):.3f}) | "
                         f"{'; '.join(own)} |")
    text = "\n".join(table)
    print(text)
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - preference objectives on the same pairs "
                    f"(`bench/objectives_quality.py`)\n\n`.venv/bin/python "
                    f"bench/objectives_quality.py --seeds {a.seeds} --demo-pairs "
                    f"{a.demo_pairs} --hh-pairs {a.hh_pairs} --datasets {a.datasets} "
                    "--record`: the tiny model, each objective's defaults "
                    "(SimPO beta 2.0), 8 pairs a step.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
