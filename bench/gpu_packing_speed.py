"""Tokens/s of a DPO-like step, padded vs packed layouts, on one GPU (a timing, not a test).

    python bench/gpu_packing_speed.py                  # ~120M-param random Llama, bf16, CUDA
    python bench/gpu_packing_speed.py --small --steps 2 --device cpu --dtype fp32   # smoke run

A step is what a DPO micro-batch costs without DeepSpeed: the policy's forward and
backward over the pair batch and a no-grad reference forward (the same model), the
loss from rlhf.core.losses.dpo_loss. Models come from cluster.models.load_causal_lm (padded:
transformers' SDPA with a padding mask; packed: the project's rlhf_varlen kernel), batches
from rlhf.core.logprobs.pad_pairs / pack_pairs (with and without the shared prompt). Pairs are
random token ids with hh-rlhf-like lengths (prompt 32-384, responses 16-256 tokens).
tokens/s counts prompt+chosen and prompt+rejected tokens, as the trainer's metric does.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
           num_attention_heads=12, num_key_value_heads=4)
SMALL = dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--pairs", type=int, default=16, help="pairs per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up)")
    ap.add_argument("--small", action="store_true", help="the tiny model's shape")
    args = ap.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cluster.models import load_causal_lm
    from rlhf.config import ModelConfig
    from rlhf.core.logprobs import (batch_logprobs, model_inputs, pack_pairs, pad_pairs,
                               split_pairs)
    from rlhf.core.losses import dpo_loss

    shape = SMALL if args.small else BIG
    rng = random.Random(0)
    v = shape["vocab_size"]

    def ids(lo, hi):
        return [rng.randrange(3, v) for _ in range(rng.randint(lo, hi))]

    batches = [[(ids(32, 384), ids(16, 256), ids(16, 256)) for _ in range(args.pairs)]
               for _ in range(4)]
    tmp = tempfile.mkdtemp(prefix="rlhf-speed-")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=2048,
                                         tie_word_embeddings=False, pad_token_id=0))
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp)
    del model
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    print(f"model: random Llama {n_params / 1e6:.0f}M params {shape}, {args.dtype}, "
          f"{args.pairs} pairs/step, device {torch.cuda.get_device_name() if cuda else 'cpu'}")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    from rlhf.core import attention

    for layout in ("padded", "packed", "packed-loop-kernel", "packed-no-shared-prompt"):
        packing = layout != "padded"
        # packed-loop-kernel: the per-block SDPA loop instead of one flash varlen call
        attention.GPU_VARLEN = layout != "packed-loop-kernel"
        model = load_causal_lm(tmp, ModelConfig(dtype=args.dtype), trainable=True,
                               use_gpu=cuda, packing=packing).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step(pairs):
            P, C, R = zip(*pairs)
            b = (pack_pairs(P, C, R, share_prompt=layout != "packed-no-shared-prompt") if packing
                 else pad_pairs(P, C, R, 0))
            with torch.no_grad():
                ref_c, ref_r = split_pairs(batch_logprobs(model(**model_inputs(b, dev)).logits, b)[0])
            pc, pr = split_pairs(batch_logprobs(model(**model_inputs(b, dev)).logits, b)[0])
            dpo_loss(pc, pr, ref_c, ref_r).losses.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs), b["input_ids"].numel()

        for i in range(3):
            step(batches[i % len(batches)])
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        tokens = slots = 0
        t0 = time.perf_counter()
        for i in range(args.steps):
            n, s = step(batches[i % len(batches)])
            tokens, slots = tokens + n, slots + s
        sync()
        dt = time.perf_counter() - t0
        mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
        print(f"{layout:>24}: {tokens / dt:10,.0f} tokens/s  {dt / args.steps * 1e3:7.1f} ms/step"
              f"  {slots / args.steps:8,.0f} positions/step (real tokens {tokens / args.steps:,.0f})"
              f"{mem}", flush=True)
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
