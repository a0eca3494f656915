"""The parity table: every preference loss of rlhf.core.losses against TRL 1.16's, on the
same strings and the same tiny model (policy = reference + noise), fp32: our loss and
rewards against TRL's, the largest absolute difference of each. The harness is
tests/unit/test_trl_parity.py's (which asserts the same within 1e-5).

    .venv/bin/python bench/trl_parity_table.py            # ~20 s
    .venv/bin/python bench/trl_parity_table.py --record   # also append to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf.data.demo import ensure_tiny_model  # noqa: E402
from tests.unit import test_trl_parity as h  # noqa: E402

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")


def models():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=torch.float32)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    from cluster.models import load_tokenizer

    policy, ref = models()
    tok = load_tokenizer(str(ensure_tiny_model()))
    lines = ["| loss (TRL's settings) | loss, ours | loss, TRL | largest difference, loss and "
             "rewards |", "|---|---|---|---|"]
    for types, weights, kw in h.CASES:
        trl_loss, trl_m = h.trl_metrics(policy, ref, tok, types, weights, **kw)
        our_loss, our_m = h.ours(policy, ref, tok, types, weights=weights,
                                 **{h.OUR_NAMES.get(k, k): v for k, v in kw.items()})
        diff = max([abs(our_loss - trl_loss)] + [abs(our_m[k] - trl_m[k]) for k in REWARDS])
        name = ",".join(types) + (f" x {weights}" if weights else "") + "".join(
            f", {k}={v}" for k, v in kw.items())
        lines.append(f"| {name} | {our_loss:.6f} | {trl_loss:.6f} | {diff:.1e} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - the DPO loss family against TRL 1.16 "
                    "(`bench/trl_parity_table.py`)\n\n`.venv/bin/python "
                    "bench/trl_parity_table.py --record`: 5 pairs (the demo's and a short "
                    "one), the tiny model in fp32, policy = reference + noise; "
                    "`tests/unit/test_trl_parity.py` also checks CPO, AlphaPO, ORPO and KTO "
                    "(loss, KL point, rewards) within 1e-5.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
