"""DPO on Ray Train + DeepSpeed ZeRO, with preference pairs streamed by Ray Data.

    python -m rlhf.dpo                          # laptop: local Ray, CPU, tiny model, demo data
    python -m rlhf.dpo train.max_steps=20 cluster.zero_stage=3
    python -m rlhf.dpo --config launch/recipes/dpo-llama3-8b.yaml
    ray job submit --working-dir . -- python -m rlhf.dpo --config launch/recipes/dpo-llama3-8b.yaml
    python -m rlhf.dpo --help                   # every field, its default and meaning

Reads top to bottom: parse config -> Ray -> model and data -> trainer -> fit -> export
-> print where the results are. What DPO computes per micro-batch is `DPOTask`; the
loop around it (engines, resume, checkpoints, evaluation) is cluster/loop.py, shared
with rlhf.rm and rlhf.sft.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rlhf.config import (ConfigError, DPOConfig, _build, parse_args, resolved_learning_rate,
                         to_dict)

NAN_ADVICE = ("Likely causes: a learning rate too high for this model (try half), a beta "
              "too small, or fp16 overflow (use bf16 or fp32). The last good checkpoint is "
              "kept; fix the setting and rerun with train.resume=true.")


# ============================================================================ worker


def _pair_batch(rows: list[dict], pad_id: int, cfg: DPOConfig):
    """Token rows -> model input, padded or packed (cfg.data.packing)."""
    from rlhf.logprobs import pair_batch

    return pair_batch([r["prompt_ids"].tolist() for r in rows],
                      [r["chosen_ids"].tolist() for r in rows],
                      [r["rejected_ids"].tolist() for r in rows], pad_id=pad_id,
                      packing=cfg.data.packing,
                      attn_implementation=cfg.model.attn_implementation)


def _dummy_rows(tok) -> list[dict]:
    import numpy as np

    one = np.array([tok.eos_token_id], dtype=np.int32)
    return [{"prompt_ids": one, "chosen_ids": one, "rejected_ids": one,
             "ref_chosen": 0.0, "ref_rejected": 0.0}]


def _logps(engine, batch: dict, device, adapters_off: bool = False):
    """(2B,) summed response log-probs and token counts of a `pair_batch` (either layout)."""
    import contextlib

    from rlhf.logprobs import model_inputs, pair_logprobs

    ctx = engine.module.disable_adapter() if adapters_off else contextlib.nullcontext()
    with ctx:
        out = engine(**model_inputs(batch, device))
    return pair_logprobs(out.logits, batch)


def _pair_forward(engine, ref_engine, batch, cfg, device, grad: bool, rows: list[dict],
                  timer=None):
    """Policy (and reference) forward on one micro-batch -> losses and rewards (B,)."""
    import torch

    from rlhf.logprobs import split_pairs
    from rlhf.losses import dpo_loss

    with torch.set_grad_enabled(grad):
        logps, ntok = _logps(engine, batch, device)
    if timer:
        timer.mark("forward")
    ref_c = ref_r = None
    if cfg.loss.precompute_reference:  # streamed in with the pairs: no forward here
        ref_c = torch.tensor([float(r["ref_chosen"]) for r in rows], device=logps.device)
        ref_r = torch.tensor([float(r["ref_rejected"]) for r in rows], device=logps.device)
    elif cfg.loss.type != "simpo":
        with torch.no_grad():
            if ref_engine is not None:
                ref_logps, _ = _logps(ref_engine, batch, device)
            else:  # LoRA: the base model is the policy with its adapters off
                ref_logps, _ = _logps(engine, batch, device, adapters_off=True)
        ref_c, ref_r = split_pairs(ref_logps)
        if timer:
            timer.mark("reference")
    pc, pr = split_pairs(logps)
    nc, nr = split_pairs(ntok)
    out = dpo_loss(pc, pr, ref_c, ref_r, loss_type=cfg.loss.type, beta=cfg.loss.beta,
                   label_smoothing=cfg.loss.label_smoothing, chosen_lengths=nc,
                   rejected_lengths=nr, simpo_gamma=cfg.loss.simpo_gamma)
    return out, pc, pr, nc


METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
               "rewards/margin", "logps/chosen", "logps/rejected", "nll")


def _sums(out, pc, pr, nc, weight: float) -> list[float]:
    """Per-micro-batch sums of the metrics (divided by the pair count later)."""
    cr, rr = out.chosen_rewards, out.rejected_rewards
    return [weight * float(v) for v in (
        out.losses.detach().sum(), cr.sum(), rr.sum(), (cr > rr).float().sum(),
        (cr - rr).sum(), pc.detach().sum(), pr.detach().sum(), -pc.detach().sum())]


class DPOTask:
    """What cluster.loop.train_loop needs to train DPO (see its docstring)."""

    name = "pairs"
    nan_advice = NAN_ADVICE

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg

    def trainable(self, lc: dict):
        from cluster.models import load_causal_lm, load_tokenizer

        self.tok = load_tokenizer(lc["model_path"])
        self.pad_id, self.dummy = self.tok.pad_token_id, _dummy_rows(self.tok)
        self.model_path = lc["model_path"]
        return load_causal_lm(lc["model_path"], self.cfg.model, trainable=True,
                              use_gpu=self.cfg.cluster.use_gpu, packing=self.cfg.data.packing)

    def prepare(self, engine, lc: dict, world: int, accum: int) -> None:
        from cluster import deepspeed as dsc
        from cluster.models import load_causal_lm

        cfg, c = self.cfg, self.cfg.cluster
        self.world, self.accum, self.ref_engine = world, accum, None
        if (cfg.loss.type != "simpo" and not cfg.model.lora.enabled
                and not cfg.loss.precompute_reference):
            ref = load_causal_lm(lc["ref_path"], cfg.model, trainable=False,
                                 use_gpu=c.use_gpu, packing=cfg.data.packing)
            self.ref_engine = dsc.frozen_engine(ref, dsc.frozen_config(
                zero_stage=c.zero_stage, dtype=cfg.model.dtype,
                micro_batch_size=cfg.train.micro_batch_size, world_size=world,
                offload_params=c.offload_params))

    def step_counts(self, micro_batches: list[list[dict]]) -> dict[str, float]:
        rows = [r for mb in micro_batches for r in mb]
        p = sum(len(r["prompt_ids"]) for r in rows)
        c = sum(len(r["chosen_ids"]) for r in rows)
        r = sum(len(r["rejected_ids"]) for r in rows)
        # tokens: prompt+chosen and prompt+rejected (what a padded trainer runs, less its
        # padding); unique_tokens: each prompt once (the work data.packing does).
        return {"samples": len(rows), "tokens": 2 * p + c + r, "unique_tokens": p + c + r,
                "chosen_tokens": c}

    def micro_step(self, engine, rows: list[dict], totals: dict | None, grad: bool, timer):
        cfg = self.cfg
        batch = _pair_batch(rows or self.dummy, self.pad_id, cfg)
        if timer:
            timer.mark("batching")
        out, pc, pr, nc = _pair_forward(engine, self.ref_engine, batch, cfg, engine.device,
                                        grad=grad, rows=rows or self.dummy, timer=timer)
        w = 1.0 if rows else 0.0
        sums = dict(zip(METRIC_KEYS, _sums(out, pc, pr, nc, w)))
        sums.update(pairs=w * len(rows), scored_chosen_tokens=w * float(nc.sum()))
        if totals is None:
            return None, sums
        # DeepSpeed divides by accum and averages over workers; scaling by
        # world * accum / n_global makes the update the mean over the global batch
        # however it was split.
        k = self.world * self.accum
        loss = out.losses.sum() * (k / totals["samples"])
        if cfg.loss.rpo_alpha:
            nll = -pc.sum() * (k / max(totals["chosen_tokens"], 1))
            loss = loss + cfg.loss.rpo_alpha * nll
        return loss * w, sums

    def metrics(self, sums: dict, totals: dict | None, split: str) -> dict:
        n = sums["pairs"]
        out = {f"{split}/{k}": sums[k] / max(n, 1) for k in METRIC_KEYS}
        tokens = totals["chosen_tokens"] if totals else sums["scored_chosen_tokens"]
        out[f"{split}/nll"] = sums["nll"] / max(tokens, 1)
        if split == "eval":
            out["eval/pairs"] = int(n)
        return out

    def export(self, full_state: dict, out_dir: Path) -> None:
        from cluster.models import export_hf

        export_hf(full_state, self.model_path, out_dir, self.cfg.model, self.tok)


def train_loop_per_worker(lc: dict) -> None:
    """Runs on every Ray Train worker. Everything it needs comes in `lc`."""
    from cluster.loop import train_loop

    train_loop(lc, DPOTask(_build(DPOConfig, lc["config"])))


# ============================================================================ driver


def run(cfg: DPOConfig, dataset: Any = None, eval_dataset: Any = None, *,
        crash_once_at_step: int | None = None) -> Path:
    """Train; returns the run directory. `dataset` may be an in-memory
    datasets.Dataset or ray.data.Dataset (then data.path is ignored).

    crash_once_at_step: fault-injection for tests: the last worker process exits hard
    after that step, once, to exercise Ray Train's restart from the last checkpoint.
    """
    import ray
    import ray.data
    import yaml

    from cluster.models import check_reference, load_tokenizer, resolve_model_path
    from cluster.train import (check_resources, connect, fit, make_run_dir, make_trainer,
                               plot_curves, quiet_ray_data, start_run_log)
    from rlhf import data

    t_start = time.time()
    model_path = resolve_model_path(cfg.model.name_or_path)
    ref_path = model_path
    notes: list[str] = []
    if cfg.model.ref_name_or_path:
        ref_path = resolve_model_path(cfg.model.ref_name_or_path, "model.ref_name_or_path")
        notes = check_reference(model_path, ref_path)
        for n in notes:
            print(f"warning: {n}", file=sys.stderr)
    pad_id = load_tokenizer(model_path).pad_token_id  # fails here, not in a worker
    plan = data.inspect(cfg.data, dataset, eval_dataset)
    run_dir = make_run_dir(cfg.output, cfg.train.resume, "dpo")

    started_ray = not ray.is_initialized()
    connect(cfg.cluster)
    quiet_ray_data()
    # Ray Train carries the driver's ordering choice into each worker's shard.
    ray.data.DataContext.get_current().execution_options.preserve_order = \
        cfg.data.preserve_order
    try:
        check_resources(cfg.cluster)
        print(f"reading pairs from {cfg.data.path if dataset is None else 'memory'} ...",
              flush=True)
        pipes = data.build(plan, cfg.data, model_path, cfg.train.seed)
        if cfg.loss.precompute_reference:
            from rlhf.reference import add_reference_logps

            kw = dict(model_path=ref_path, model_cfg=cfg.model, pad_id=pad_id,
                      micro_batch_size=cfg.train.micro_batch_size, packing=cfg.data.packing,
                      actors=cfg.cluster.reference_actors,
                      gpus_per_actor=cfg.cluster.reference_gpus_per_actor)
            pipes.train = add_reference_logps(pipes.train, **kw)
            pipes.eval = add_reference_logps(pipes.eval, **kw)
        print(f"train: {data.describe_counts(pipes.train_counts)}\n"
              f"held-out: {data.describe_counts(pipes.eval_counts)}", flush=True)
        t, c = cfg.train, cfg.cluster
        steps_per_epoch = math.ceil(pipes.train_counts[""] / t.global_batch_size)
        total = steps_per_epoch * t.epochs
        if t.max_steps > 0:
            total = min(total, t.max_steps)
        resolved = to_dict(cfg)
        resolved["train"]["learning_rate"] = resolved_learning_rate(cfg)
        if not cfg.train.resume:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        run_log = start_run_log(run_dir, total)
        storage = c.storage_path or str(run_dir)
        trainer = make_trainer(
            train_loop_per_worker,
            {"config": to_dict(cfg), "model_path": model_path, "ref_path": ref_path,
             "total_steps": total, "run_log": run_log,
             "learning_rate": resolved["train"]["learning_rate"],
             "crash_once_at_step": crash_once_at_step and {
                 "step": crash_once_at_step, "marker": str(run_dir / ".crash-injected")}},
            c, {"train": pipes.train, "eval": pipes.eval},
            name="checkpoints" if not c.storage_path else run_dir.name,
            storage_path=storage, keep_checkpoints=t.keep_checkpoints)
        print(f"training: {c.num_workers} workers, ZeRO-{c.zero_stage}, {total} steps of "
              f"{t.global_batch_size} pairs, lr {resolved['train']['learning_rate']:g}, "
              f"run directory {run_dir}", flush=True)
        result, summary = fit(trainer, run_log, run_dir)
        summary.update({
            "wall_time_s": round(time.time() - t_start, 1),
            "tokens_per_s_overall": summary["tokens"] / max(time.time() - t_start, 1e-9),
            "data": {split: {"rows": sum(cnt.values()), "usable": cnt[""],
                             "dropped": {k: v for k, v in cnt.items() if k}}
                     for split, cnt in (("train", pipes.train_counts),
                                        ("eval", pipes.eval_counts))},
            "warnings": notes, "model": str(run_dir / "model"),
            "checkpoint": result.checkpoint.path})
        if cfg.train.max_steps <= 0 or summary["steps"] < cfg.train.max_steps:
            # Whole epochs ran: every usable pair was trained on, dropped by a worker
            # (counted), or left out by the equal split across workers (< num_workers).
            worker_drops = sum(v for k, v in summary["counts"].items() if k.startswith("dropped"))
            summary["pairs_left_out_by_split"] = (
                pipes.train_counts[""] * cfg.train.epochs - summary["samples"] - worker_drops)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(run_dir, ("loss", "rewards/accuracy"))
        return run_dir
    finally:
        if started_ray:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    from cluster.train import TrainingError
    from rlhf.data import DataError

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(DPOConfig, argv, prog="rlhf.dpo")
        run_dir = run(cfg)
    except (ConfigError, DataError) as e:
        # A DataError raised inside a Ray Data task arrives wrapped with its traceback.
        inner = getattr(e, "cause", None)
        print(f"error: {inner if isinstance(inner, DataError) else e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: training failed: {e}", file=sys.stderr)
        return 1
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"\ndone in {summary['wall_time_s']:.0f} s: held-out reward accuracy "
          f"{summary['eval/rewards/accuracy']:.3f}, margin {summary['eval/rewards/margin']:+.3f}"
          f" over {summary['eval/pairs']} pairs")
    print(f"run directory: {run_dir}\n  model: {run_dir / 'model'}\n  metrics: "
          f"{run_dir / 'metrics.jsonl'}\n  summary: {run_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
