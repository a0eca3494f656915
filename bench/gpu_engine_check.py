"""The DPO training engine on one GPU without Ray: the project's own pieces, in the
order rlhf/train/loop.py's train_loop calls them, in one process (world size 1, NCCL).

    python bench/gpu_engine_check.py                        # zero2, zero3, lora, qlora, orpo
    python bench/gpu_engine_check.py --variants zero2 --steps 30
    python bench/gpu_engine_check.py --cpu --variants zero2,zero3,lora,orpo  # smoke run, gloo

Per variant: DPOTask.trainable (cluster.models.load_causal_lm: bf16, packing, LoRA /
4-bit), rlhf.train.loop.build_engine (DeepSpeed config and engine), DPOTask.prepare (the frozen
reference engine, or the policy with adapters off under LoRA), then steps of
DPOTask.micro_step + engine.backward + engine.step on demo pairs tokenised by the Ray
pipeline's own body (rlhf.data.pipeline.tokenize_batch), held-out metrics, and the export
(cluster.checkpoints.gather_state_dict + DPOTask.export) reloaded with transformers. Prints a
line per step (loss, accuracy, seconds, tokens/s) and fails unless the loss falls.
What it leaves to tests/gpu/test_dpo_gpu.py: Ray Train, Ray Data, checkpoints.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMON = ["cluster.num_workers=1", "model.dtype=bf16",
          "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_ratio=0",
          "train.lr_scheduler=constant"]
VARIANTS = {
    "zero2": ["cluster.zero_stage=2", "train.learning_rate=1e-3"],
    "zero3": ["cluster.zero_stage=3", "model.gradient_checkpointing=true",
              "train.learning_rate=1e-3"],
    "lora": ["cluster.zero_stage=2", "model.lora.enabled=true", "train.learning_rate=3e-3"],
    "qlora": ["cluster.zero_stage=2", "model.lora.enabled=true",
              "model.lora.load_in_4bit=true", "train.learning_rate=3e-3"],
    # reference-free: no frozen engine is built (the script prints which reference)
    "orpo": ["cluster.zero_stage=2", "loss.type=orpo", "train.learning_rate=1e-3"],
}


def demo_rows(n: int, split: str, cfg, model_path: str) -> list[dict]:
    """Demo pairs through the pipeline's tokenising body, as the workers receive them."""
    import numpy as np

    from rlhf.data.pipeline import tokenize_batch
    from rlhf.data.demo import demo_pair

    pairs = [demo_pair(i, split) for i in range(n)]
    batch = {"id": np.arange(n), "drop": np.array([""] * n, dtype=object),
             "chat": np.zeros(n, dtype=bool), "margin": np.zeros(n),
             **{k: np.array([p[k] for p in pairs], dtype=object)
                for k in ("prompt", "chosen", "rejected")}}
    d = cfg.data
    rows = tokenize_batch(batch, model_path, d.max_length, d.max_prompt_length,
                          d.truncation).to_pylist()
    return [r for r in rows if not r["drop"]]


def run_variant(name: str, steps: int, cuda: bool) -> None:
    import torch

    from cluster.checkpoints import gather_state_dict
    from cluster.models import resolve_model_path
    from cluster.worker import StepTimer, add_sums, all_reduce_sums
    from rlhf.config import DPOConfig, parse_args, resolved_learning_rate
    from rlhf.train.loop import build_engine
    from rlhf.train.tasks.dpo import DPOTask

    cfg = parse_args(DPOConfig, [f"cluster.use_gpu={str(cuda).lower()}", *COMMON,
                                 *VARIANTS[name]], "rlhf.dpo")
    t, c = cfg.train, cfg.cluster
    torch.manual_seed(t.seed)
    path = resolve_model_path(cfg.model.name_or_path)
    # warmup_ratio is 0 in COMMON, as the step count here is not the config's
    lc = {"model_path": path, "ref_path": path, "total_steps": steps,
          "learning_rate": resolved_learning_rate(cfg)}
    task = DPOTask(cfg)
    engine = build_engine(task, lc, world=1, accum=t.global_batch_size // t.micro_batch_size)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in engine.module.parameters()})
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()
                  if p.requires_grad)
    print(f"[{name}] device {engine.device}, ZeRO-{c.zero_stage}, param dtypes {dtypes}, "
          f"{n_train:,} trained, reference: "
          f"{'frozen engine' if task.ref_engine else 'none' if cfg.loss.reference_free else 'adapters off'}",
          flush=True)

    train = demo_rows(steps * t.global_batch_size, "train", cfg, path)
    held = demo_rows(64, "eval", cfg, path)
    engine.train()
    losses = []
    timer = StepTimer(cuda=cuda)
    for step in range(steps):
        t0 = time.perf_counter()
        rows = train[step * t.global_batch_size:(step + 1) * t.global_batch_size]
        mbs = [rows[i:i + t.micro_batch_size] for i in range(0, len(rows), t.micro_batch_size)]
        totals = all_reduce_sums(task.step_counts(mbs))
        sums: dict[str, float] = {}
        timer.reset()
        for mb in mbs:
            loss, s = task.micro_step(engine, mb, totals, grad=True, timer=timer)
            engine.backward(loss)
            timer.mark("backward")
            engine.step()
            timer.mark("optimizer")
            add_sums(sums, s)
        m = task.metrics(all_reduce_sums(sums), totals, "train")
        dt = time.perf_counter() - t0
        losses.append(m["train/loss"])
        phases = " ".join(f"{k} {v * 1e3:.0f}" for k, v in timer.times.items())
        print(f"[{name}] step {step + 1:2d}/{steps} loss {m['train/loss']:.4f} acc "
              f"{m['train/rewards/accuracy']:.2f} margin {m['train/rewards/margin']:+.3f} "
              f"grad_norm {float(engine.get_global_grad_norm() or 0):.3f} {dt * 1e3:.0f} ms "
              f"({phases} ms) {totals['tokens'] / dt:,.0f} tok/s", flush=True)

    engine.eval()
    sums = {}
    with torch.no_grad():
        for i in range(0, len(held), t.micro_batch_size):
            add_sums(sums, task.micro_step(engine, held[i:i + t.micro_batch_size], None,
                                       grad=False, timer=None)[1])
    ev = task.metrics(all_reduce_sums(sums), None, "eval")
    print(f"[{name}] held-out: loss {ev['eval/loss']:.4f} acc {ev['eval/rewards/accuracy']:.3f} "
          f"margin {ev['eval/rewards/margin']:+.3f} over {ev['eval/pairs']} pairs; peak GPU "
          f"memory {torch.cuda.max_memory_allocated() / 2**20 if cuda else 0:.0f} MiB",
          flush=True)

    # The export, reloaded by transformers (padded batch, SDPA), scores held-out pairs as
    # the trained engine does (packed); the untrained base is far from both.
    from transformers import AutoModelForCausalLM

    from rlhf.train.tasks.base import response_logps
    from rlhf.core.logprobs import batch_logprobs, model_inputs, rows_pair_batch

    rows = held[:t.micro_batch_size]
    with torch.no_grad():
        packed = rows_pair_batch(rows, pad_id=task.pad_id, packing=cfg.data.packing)
        ours = response_logps(engine, packed, engine.device)[0].float()
        padded = rows_pair_batch(rows, pad_id=task.pad_id, packing=False)

        def hf_logps(folder):
            m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(engine.device)
            return batch_logprobs(m(**model_inputs(padded, engine.device)).logits, padded)[0]

        full = gather_state_dict(engine, c.zero_stage)
        with tempfile.TemporaryDirectory() as d:
            task.export(full, Path(d) / "model")
            exported = hf_logps(Path(d) / "model")
        base = hf_logps(path)
    off, moved = (exported - ours).abs().max().item(), (base - ours).abs().max().item()
    print(f"[{name}] export: {len(full)} tensors; reloaded, its sequence log-probs are within "
          f"{off:.3f} of the engine's (the base model's: {moved:.3f})", flush=True)
    if not off < min(1.0, moved / 4):
        raise AssertionError("the exported model does not score as the trained engine does")

    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    if not (last < first - 0.05 and all(map(lambda x: x == x, losses))):
        raise AssertionError(f"loss did not fall: first 3 steps {first:.4f}, last 3 {last:.4f}")
    del engine, task
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU (no qlora): a smoke run")
    args = ap.parse_args(argv)
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import deepspeed
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --cpu)", file=sys.stderr)
        return 2
    if not args.cpu:
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="gloo" if args.cpu else "nccl")
    failed = []
    for name in args.variants.split(","):
        t0 = time.time()
        try:
            run_variant(name, args.steps, cuda=not args.cpu)
            print(f"[{name}] PASS in {time.time() - t0:.1f} s", flush=True)
        except Exception:  # report and go on to the next variant
            traceback.print_exc()
            print(f"[{name}] FAIL in {time.time() - t0:.1f} s", flush=True)
            failed.append(name)
    print(f"engine check: {len(failed)} failed ({', '.join(failed) or 'none'}), "
          f"{len(args.variants.split(',')) - len(failed)} passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
