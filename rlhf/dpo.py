"""DPO on Ray Train + DeepSpeed ZeRO, with preference pairs streamed by Ray Data.

    python -m rlhf.dpo                          # laptop: local Ray, CPU, tiny model, demo data
    python -m rlhf.dpo train.max_steps=20 cluster.zero_stage=3
    python -m rlhf.dpo --config launch/recipes/dpo-llama3-8b.yaml
    ray job submit --working-dir . -- python -m rlhf.dpo --config launch/recipes/dpo-llama3-8b.yaml
    python -m rlhf.dpo --help                   # every field, its default and meaning

Reads top to bottom: parse config -> Ray -> model and data -> trainer -> fit -> export
-> print where the results are. The per-worker loop is `train_loop_per_worker`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from datetime import datetime
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


def _evaluate(engine, ref_engine, shard, cfg, device, pad_id, dummy, micro) -> dict:
    import torch

    from cluster.train import PairFeed, all_sum

    engine.eval()
    totals = [0.0] * (len(METRIC_KEYS) + 2)
    with torch.no_grad():
        for micro_batches in PairFeed(shard, micro, 1).eval_steps():
            for mb in micro_batches:
                out, pc, pr, nc = _pair_forward(engine, ref_engine,
                                                _pair_batch(mb or dummy, pad_id, cfg), cfg,
                                                device, grad=False, rows=mb or dummy)
                w = 1.0 if mb else 0.0
                s = _sums(out, pc, pr, nc, w) + [w * len(mb), w * float(nc.sum())]
                totals = [a + b for a, b in zip(totals, s)]
    engine.train()
    totals = all_sum(totals)
    n, tokens = totals[-2], totals[-1]
    res = {f"eval/{k}": v / max(n, 1) for k, v in zip(METRIC_KEYS, totals)}
    res["eval/nll"] = totals[METRIC_KEYS.index("nll")] / max(tokens, 1)
    res["eval/pairs"] = int(n)
    return res


def train_loop_per_worker(lc: dict) -> None:
    """Runs on every Ray Train worker. Everything it needs comes in `lc`."""
    import random
    import resource

    import numpy as np
    import ray.train
    import torch

    from cluster import deepspeed as dsc
    from cluster.models import load_causal_lm, load_tokenizer
    from cluster.train import (PairFeed, StepTimer, all_gather_objects, all_sum,
                               gather_state_dict, load_checkpoint, quiet_worker_logs,
                               rank_world, save_checkpoint)

    cfg: DPOConfig = _build(DPOConfig, lc["config"])
    t, c = cfg.train, cfg.cluster
    quiet_worker_logs()
    rank, world = rank_world()
    random.seed(t.seed + rank)
    np.random.seed(t.seed + rank)
    torch.manual_seed(t.seed)  # same LoRA init on every rank
    accum = t.global_batch_size // (t.micro_batch_size * world)
    lr = resolved_learning_rate(cfg)

    tok = load_tokenizer(lc["model_path"])
    pad_id, dummy = tok.pad_token_id, _dummy_rows(tok)
    packing = cfg.data.packing
    policy = load_causal_lm(lc["model_path"], cfg.model, trainable=True, use_gpu=c.use_gpu,
                            packing=packing)
    ds_cfg = dsc.train_config(
        zero_stage=c.zero_stage, dtype=cfg.model.dtype, micro_batch_size=t.micro_batch_size,
        grad_accum=accum, world_size=world, max_grad_norm=t.max_grad_norm,
        offload_optimizer=c.offload_optimizer, offload_params=c.offload_params,
        learning_rate=lr, weight_decay=t.weight_decay)
    total = lc["total_steps"]
    engine, _ = dsc.train_engine(policy, ds_cfg, learning_rate=lr,
                                 weight_decay=t.weight_decay, total_steps=total,
                                 warmup_steps=int(t.warmup_ratio * total),
                                 schedule=t.lr_scheduler)
    ref_engine = None
    if (cfg.loss.type != "simpo" and not cfg.model.lora.enabled
            and not cfg.loss.precompute_reference):
        ref = load_causal_lm(lc["ref_path"], cfg.model, trainable=False, use_gpu=c.use_gpu,
                             packing=packing)
        ref_engine = dsc.frozen_engine(ref, dsc.frozen_config(
            zero_stage=c.zero_stage, dtype=cfg.model.dtype,
            micro_batch_size=t.micro_batch_size, world_size=world,
            offload_params=c.offload_params))
    device = engine.device

    step, epoch0, samples, tokens_seen = 0, 0, 0, 0
    skip: set[int] = set()
    counts: Counter = Counter()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restored = load_checkpoint(engine, d)
        head = restored["states"][0]
        step, epoch0 = head["step"], head["epoch"]
        samples, tokens_seen = head["samples"], head["tokens"]
        skip = restored["consumed"] if not head.get("epoch_done") else set()
        epoch0 += int(bool(head.get("epoch_done")))
        if rank == 0:
            for s in restored["states"]:
                counts.update(s["counts"])
        if rank == 0:
            print(f"resumed at step {step} (epoch {epoch0 + 1}, {len(skip)} pairs of this "
                  "epoch already trained)", flush=True)

    run_log = lc["run_log"]
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    engine.train()

    def merged(feed: PairFeed) -> dict:
        out = Counter(counts)
        out.update(feed.counts)  # update keeps zero counts; `+` would drop them
        return dict(out)

    def worker_state(feed: PairFeed, epoch_done: bool) -> dict:
        return {"step": step, "epoch": epoch, "samples": samples, "tokens": tokens_seen,
                "epoch_done": epoch_done, "counts": merged(feed),
                "consumed": ([] if epoch_done else
                             (sorted(skip) if rank == 0 else []) + feed.consumed)}

    def total_counts(feed: PairFeed) -> dict:
        total: Counter = Counter({"prompt truncated": 0, "response truncated": 0})
        for part in all_gather_objects(merged(feed)):
            total.update(part)
        return dict(total)

    feed = PairFeed(train_shard, t.micro_batch_size, accum)
    epoch = epoch0
    done = step >= total
    epoch_finished = False
    while not done and epoch < t.epochs:
        epoch_finished = False
        feed = PairFeed(train_shard, t.micro_batch_size, accum,
                        skip=skip if epoch == epoch0 else None)
        t0 = time.time()  # step time includes waiting for data: tokens/s is end to end
        timer = StepTimer(cuda=str(device).startswith("cuda"))
        for micro_batches, ids, step_counts in feed.steps(epoch):
            timer.mark("data")
            n_local = sum(len(mb) for mb in micro_batches)
            tok_local = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) +
                            len(r["rejected_ids"]) for mb in micro_batches for r in mb)
            ctok_local = sum(len(r["chosen_ids"]) for mb in micro_batches for r in mb)
            ptok_local = sum(len(r["prompt_ids"]) for mb in micro_batches for r in mb)
            n_global, tok_global, ctok_global, ptok_global = all_sum(
                [n_local, tok_local, ctok_local, ptok_local])
            # DeepSpeed divides by accum and averages over workers; scaling by
            # world * accum / n_global makes the update the mean over the global batch
            # however it was split.
            scale = world * accum / n_global
            sums = [0.0] * len(METRIC_KEYS)
            for mb in micro_batches:
                batch = _pair_batch(mb or dummy, pad_id, cfg)
                timer.mark("batching")
                out, pc, pr, nc = _pair_forward(engine, ref_engine, batch, cfg, device,
                                                grad=True, rows=mb or dummy, timer=timer)
                w = 1.0 if mb else 0.0
                loss = out.losses.sum() * scale
                if cfg.loss.rpo_alpha:
                    nll = -pc.sum() * (world * accum / max(ctok_global, 1))
                    loss = loss + cfg.loss.rpo_alpha * nll
                engine.backward(loss * w)  # with the gradient all-reduce at the boundary
                timer.mark("backward")
                engine.step()
                timer.mark("optimizer")
                sums = [a + b for a, b in zip(sums, _sums(out, pc, pr, nc, w))]
            feed.commit(ids, step_counts)
            step += 1
            fault = lc.get("crash_once_at_step")
            if fault and step == fault["step"] and rank == world - 1:
                marker = Path(fault["marker"])
                if not marker.exists():  # a hard death, as when a node is lost
                    marker.write_text(str(step))
                    # Ray Train's controller collects reported checkpoints on its 2 s
                    # health-check poll; in a real run minutes pass between a checkpoint
                    # and a crash, so let it see the last one first.
                    time.sleep(5)
                    os._exit(1)
            samples += int(n_global)
            tokens_seen += int(tok_global)
            g = all_sum(sums)
            metrics = {f"train/{k}": v / n_global for k, v in zip(METRIC_KEYS, g)}
            metrics["train/nll"] = g[METRIC_KEYS.index("nll")] / max(ctok_global, 1)
            if not math.isfinite(metrics["train/loss"]):
                raise FloatingPointError(
                    f"DPO loss became {metrics['train/loss']} at step {step}. {NAN_ADVICE}")
            grad_norm = engine.get_global_grad_norm()
            timer.mark("other")
            elapsed = max(time.time() - t0, 1e-9)
            metrics.update({
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "train/learning_rate": engine.get_lr()[0],
                # Tokens of prompt+chosen and prompt+rejected (what a padded trainer
                # runs, less its padding), and of prompt+chosen+rejected: the work a
                # pair needs when the prompt is run once (data.packing shares it).
                "train/tokens_per_s": tok_global / elapsed,
                "train/unique_tokens_per_s": (tok_global - ptok_global) / elapsed,
                "train/samples": samples, "train/epoch": epoch + 1,
                "train/step_time_s": elapsed,
                # Peak resident memory of this worker process (rank 0 reports its own).
                "train/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                **{f"time/{k}_s": v for k, v in timer.times.items()}})
            last = step >= total
            evaluated = bool(t.eval_every and step % t.eval_every == 0 and not last)
            if evaluated:
                metrics.update(_evaluate(engine, ref_engine, eval_shard, cfg, device, pad_id,
                                         dummy, t.micro_batch_size))
            if rank == 0 and (step % t.log_every == 0 or last or evaluated):
                run_log.log.remote({"step": step, **metrics})
            if t.checkpoint_every and step % t.checkpoint_every == 0 and not last:
                save_checkpoint(engine, worker_state(feed, False),
                                {"step": step, **metrics}, step)
            if last:
                done = True
                break
            t0 = time.time()
            timer.reset()
        else:
            epoch_finished = True
            epoch += 1
            counts.update(feed.counts)  # keep this epoch's counts; the next feed starts at 0
            feed = PairFeed(train_shard, t.micro_batch_size, accum)

    # Final: evaluate, then one checkpoint holding the resumable state and the export.
    final_eval = _evaluate(engine, ref_engine, eval_shard, cfg, device, pad_id, dummy,
                           t.micro_batch_size)
    counts_all = total_counts(feed)
    full = gather_state_dict(engine, c.zero_stage)
    if rank == 0:
        run_log.log.remote({"step": step, **final_eval})
        run_log_summary = {"steps": step, "samples": samples, "tokens": tokens_seen,
                           "counts": counts_all, **final_eval}
        ray.get(run_log.set_summary.remote(run_log_summary))

    def export(tmp: Path) -> None:
        from cluster.models import export_hf

        if rank == 0:
            export_hf(full, lc["model_path"], tmp / "model", cfg.model, tok)

    if epoch_finished:
        epoch -= 1  # the state names the epoch that just ended, marked done
    save_checkpoint(engine, worker_state(feed, epoch_finished), {"step": step, **final_eval},
                    step, extra=export)


# ============================================================================ driver


def _run_dir(cfg: DPOConfig) -> Path:
    root = Path(cfg.output.dir).expanduser().resolve()
    if cfg.train.resume:
        if cfg.output.name:
            run = root / cfg.output.name
        else:
            runs = sorted((p for p in root.glob("dpo-*") if (p / "config.yaml").is_file()),
                          key=lambda p: p.stat().st_mtime)
            if not runs:
                raise ConfigError(f"train.resume=true but {root} holds no earlier dpo run; "
                                  "set output.name to the run to continue.")
            run = runs[-1]
        if not run.is_dir():
            raise ConfigError(f"train.resume=true but {run} does not exist.")
        return run
    name = cfg.output.name or datetime.now().strftime("dpo-%Y%m%d-%H%M%S")
    run = root / name
    if run.exists() and any(run.iterdir()):
        raise ConfigError(f"{run} already holds a run: pick another output.name, or set "
                          "train.resume=true to continue it.")
    run.mkdir(parents=True, exist_ok=True)
    return run


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
    from cluster.train import (check_resources, connect, make_trainer, quiet_ray_data,
                               root_cause, start_run_log)
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
    run_dir = _run_dir(cfg)

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
             "crash_once_at_step": crash_once_at_step and {
                 "step": crash_once_at_step, "marker": str(run_dir / ".crash-injected")}},
            c, {"train": pipes.train, "eval": pipes.eval},
            name="checkpoints" if not c.storage_path else run_dir.name,
            storage_path=storage, keep_checkpoints=t.keep_checkpoints)
        print(f"training: {c.num_workers} workers, ZeRO-{c.zero_stage}, {total} steps of "
              f"{t.global_batch_size} pairs, lr {resolved['train']['learning_rate']:g}, "
              f"run directory {run_dir}", flush=True)
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - report the worker's own error
            cause = root_cause(e)
            raise TrainingError(f"{type(cause).__name__}: {cause}") from None
        summary = ray.get(run_log.summary.remote())
        ray.get(run_log.close.remote())
        with result.checkpoint.as_directory() as d:
            if (run_dir / "model").exists():
                shutil.rmtree(run_dir / "model")
            shutil.copytree(Path(d) / "model", run_dir / "model")
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
        _plot(run_dir)
        return run_dir
    finally:
        if started_ray:
            ray.shutdown()


class TrainingError(RuntimeError):
    """Training failed in a worker; the message is the worker's error."""


def _plot(run_dir: Path) -> None:
    """loss.png / accuracy.png from metrics.jsonl (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ("loss", "rewards/accuracy")):
        for split, style in (("train", "-"), ("eval", "o-")):
            pts = [(r["step"], r[f"{split}/{key}"]) for r in rows if f"{split}/{key}" in r]
            if pts:
                ax.plot(*zip(*pts), style, label=split)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
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
