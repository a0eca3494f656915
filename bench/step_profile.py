"""Where a DPO (or KTO) training step's time goes, by operator: torch.profiler over the
step's model work, as rlhf.dpo's worker runs it, on bench/dpo_vs_trl.py's model and pairs.

One process, no Ray or DeepSpeed (their share is measured by dpo_vs_trl.py's s/step
against this one's): the packed policy (rlhf_varlen kernel) and a frozen reference, a
micro-batch of 8 hh-rlhf pairs (max_length 256), rlhf.core.losses.dpo_loss, backward,
torch AdamW. Reports each operator class's share of the step (matrix multiplies,
attention, the log-prob gather, elementwise, copies, the optimizer) and the time in no
operator at all (Python), against a matmul of the model's own shapes measured in the
same process.

    .venv/bin/python bench/step_profile.py               # DPO, ~1 min on 2 cores
    .venv/bin/python bench/step_profile.py --kto         # KTO's step (the KL pass too)
    .venv/bin/python bench/step_profile.py --record      # also append to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dpo_vs_trl import HH, MODEL, build_model  # noqa: E402
from cluster.models import load_causal_lm  # noqa: E402
from rlhf.config import DataConfig, ModelConfig  # noqa: E402
from rlhf.core.logprobs import (UNPAIRED_SIDES, batch_logprobs, model_inputs,  # noqa: E402
                                rows_pair_batch, rows_response_batch, split_pairs)
from rlhf.core.losses import dpo_loss, kto_loss  # noqa: E402
from rlhf.data.pipeline import detect_layout, normalise_row, tokenize_pair  # noqa: E402

# operator name fragments -> class, first match wins (aten names, CPU)
CLASSES = [("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
           ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
           ("log-probs", ("log_softmax", "gather", "logsumexp", "_log_softmax")),
           ("optimizer", ("_foreach", "adam", "lerp", "addcdiv")),
           ("copies", ("aten::cat", "aten::copy_", "aten::split", "aten::contiguous",
                       "aten::index", "aten::clone", "aten::repeat", "aten::stack",
                       "aten::to", "aten::_to_copy", "aten::fill_", "aten::zero")),
           ("elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::rsqrt",
                            "aten::pow", "aten::mean", "aten::neg", "aten::sub",
                            "aten::div", "aten::exp", "aten::sigmoid", "aten::sum",
                            "aten::where", "aten::embedding", "aten::cos", "aten::sin",
                            "silu_backward", "aten::threshold", "aten::tanh"))]


def classify(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k.lower() in low for k in keys):
            return cls
    return "other operators"


def rows_of(tok, n: int) -> list[dict]:
    d = DataConfig(max_length=256, max_prompt_length=128)
    raw = [json.loads(x) for x in gzip.open(HH, "rt")][:n * 2]
    layout = detect_layout(raw[0], d, "bench")
    rows = []
    for row in raw:
        prompt, chosen, rejected, _, drop = normalise_row(row, layout)
        p, c, r, _, _, drop = tokenize_pair(tok, prompt, chosen, rejected, False,
                                            d.max_length, d.max_prompt_length, d.truncation)
        if not drop:
            rows.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r,
                         # KTO: each pair's two responses, the next pair's as the KL point
                         "completion_ids": c, "kl_completion_ids": r, "label": True})
    return rows[:n]


def matmul_rate(tokens: int, hidden: int, inner: int, reps: int = 10) -> float:
    """FLOP/s of the model's own MLP-shaped matmul (tokens x hidden) @ (hidden x inner)."""
    a, b = torch.randn(tokens, hidden), torch.randn(hidden, inner)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * tokens * hidden * inner * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kto", action="store_true", help="KTO's step instead of DPO's")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up)")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="step-profile-"))
    build_model(work / "model")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "model")
    rows = rows_of(tok, a.pairs)
    if a.kto:  # the pairs split in two, as bench/dpo_vs_trl.py's KTO rows
        rows = [{**r, "completion_ids": r[side], "label": side == "chosen_ids",
                 "kl_completion_ids": rows[(i + 1) % len(rows)][side]}
                for i, r in enumerate(rows) for side in ("chosen_ids", "rejected_ids")]
    cfg = ModelConfig()
    policy = load_causal_lm(str(work / "model"), cfg, trainable=True, use_gpu=False,
                            packing=True)
    ref = load_causal_lm(str(work / "model"), cfg, trainable=False, use_gpu=False,
                         packing=True)
    opt = torch.optim.AdamW(policy.parameters(), lr=5e-7)
    kw = dict(pad_id=tok.pad_token_id, packing=True)

    def logps(model, batch):
        return batch_logprobs(model(**model_inputs(batch, "cpu")).logits, batch)[0]

    def step() -> None:
        if a.kto:
            with torch.no_grad():
                pair = rows_pair_batch(rows, sides=UNPAIRED_SIDES, **kw)
                ref_c, ref_kl = split_pairs(logps(ref, pair))
                kl = float((logps(policy, rows_response_batch(
                    rows, response="kl_completion_ids", **kw)) - ref_kl).mean().clamp(min=0))
            pol = logps(policy, rows_response_batch(rows, **kw))
            labels = torch.tensor([r["label"] for r in rows])
            loss = kto_loss(pol, ref_c, labels, kl).losses.mean()
        else:
            batch = rows_pair_batch(rows, **kw)
            pc, pr = split_pairs(logps(policy, batch))
            with torch.no_grad():
                rc, rr = split_pairs(logps(ref, batch))
            loss = dpo_loss(pc, pr, rc, rr).losses.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: the kernel plan caches, allocator
    walls = []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(a.steps):
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
    wall = sum(walls)
    # self time of every operator, summed by class (self: each microsecond counted once)
    by, mm_flops = defaultdict(float), 0.0
    for e in prof.key_averages():
        by[classify(e.key)] += e.self_cpu_time_total / 1e6
        if classify(e.key) == "matmul":
            mm_flops += e.flops or 0
    ops = sum(by.values())
    tokens = sum(len(r["prompt_ids"]) + len(r.get("completion_ids", [])) for r in rows)
    rate = matmul_rate(tokens, MODEL["hidden_size"], MODEL["intermediate_size"])
    what = "KTO" if a.kto else "DPO"
    n = len(rows)
    lines = [f"| {what} step, {n} {'examples' if a.kto else 'pairs'} | seconds a step | share |",
             "|---|---|---|"]
    for cls, secs in sorted(by.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cls} | {secs / a.steps:.3f} | {secs / wall:.0%} |")
    lines.append(f"| outside any operator (Python, autograd bookkeeping) | "
                 f"{(wall - ops) / a.steps:.3f} | {(wall - ops) / wall:.0%} |")
    lines.append(f"| **the step** | **{wall / a.steps:.3f}** | |")
    table = "\n".join(lines)
    print(table)
    achieved = mm_flops / max(by["matmul"], 1e-9)
    rates = (f"the step's matrix multiplies ran at {achieved / 1e9:.0f} GFLOP/s (torch's "
             f"FLOP count over their time); one matmul of the model's MLP shape ({tokens} x "
             f"{MODEL['hidden_size']} x {MODEL['intermediate_size']}) alone at "
             f"{rate / 1e9:.0f} GFLOP/s")
    print(rates, flush=True)
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - {platform.node() or 'machine'}: where a {what} "
                    f"step's time goes (`bench/step_profile.py`)\n\n`.venv/bin/python "
                    f"bench/step_profile.py {'--kto ' if a.kto else ''}--record`: "
                    f"bench/dpo_vs_trl.py's model, {n} {'examples' if a.kto else 'pairs'} "
                    f"of hh-rlhf, packed, one process, {a.steps} steps profiled; "
                    f"{rates}.\n\n{table}\n")


if __name__ == "__main__":
    main()
