"""Reward-model held-out accuracy on real preference data: ../shared/data/hh-rlhf.

Trains `python -m rlhf.rm` on the project's tiny model (random init, byte-level BPE) with
~1,800 of the 2,312 Anthropic hh-rlhf (harmless-base) pairs and holds out the rest (a
stable hash of the row id), then prints the held-out pairwise accuracy with its 95%
Wilson interval and what the pipeline dropped. A quality figure, not a speed one: a
0.6M-parameter model trained from scratch is not expected to beat chance by much.

    .venv/bin/python bench/rm_hh_rlhf.py            # ~5 min on 2 cores
    .venv/bin/python bench/rm_hh_rlhf.py --record   # also append to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="rm-hh-"))
    overrides = [f"data.path={HH}", "data.eval_fraction=0.22", "data.max_length=512",
                 "data.max_prompt_length=384", f"train.epochs={a.epochs}",
                 "train.eval_every=0", "train.checkpoint_every=0", "train.learning_rate=3e-4",
                 "loss.center_coefficient=0.01", f"output.dir={runs}", "output.name=hh"]
    cmd = [sys.executable, "-m", "rlhf.rm", *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"rlhf.rm failed:\n{out.stderr[-3000:]}")
    s = json.loads((runs / "hh" / "summary.json").read_text())
    n = s["eval/pairs"]
    k = round(s["eval/accuracy"] * n)
    lo, hi = wilson(k, n)
    d = s["data"]
    line = (f"held-out accuracy {k}/{n} = {k / n:.3f} (95% Wilson interval {lo:.3f}-{hi:.3f}); "
            f"train pairs {d['train']['usable']} of {d['train']['rows']} "
            f"(dropped {d['train']['dropped'] or 'none'}), held-out {d['eval']['usable']} of "
            f"{d['eval']['rows']} (dropped {d['eval']['dropped'] or 'none'}); truncated: "
            f"{s['counts']}; {s['steps']} steps in {s['wall_time_s']:.0f} s")
    print(line)
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - reward model on hh-rlhf (`bench/rm_hh_rlhf.py`)\n\n"
                    f"`.venv/bin/python bench/rm_hh_rlhf.py --epochs {a.epochs} --record`: "
                    f"builtin:tiny-llama from random init, `{' '.join(overrides[1:-2])}`.\n\n"
                    f"{line}.\n")


if __name__ == "__main__":
    main()
