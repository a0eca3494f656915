"""The Ray Train worker loop that every trained model shares (DPO, reward model, SFT).

An entry point supplies a task object; this module owns what is the same for all:
seeds, the DeepSpeed training engine, resume from a Ray Train checkpoint, the lock-step
feed of micro-batches, exact global-batch normalisation inputs, per-phase timings,
metrics to the run log, held-out evaluation, checkpoints with the data position, a NaN
stop, fault injection for tests, and the final export.

A task (derived from `Task` below; DPO's and the reward model's from `PairTask`; see
rlhf/dpo.py's DPOTask and rlhf/sft.py's SFTTask) provides:
    cfg                      the entry point's config (train, cluster, model sections)
    name                     what a row is called in messages ("pairs", "examples")
    flags                    {boolean row column: label} counted by the feed
    feed(shard, micro, accum, skip)  the steps' source (default: a RowFeed over the
                             worker's shard; online RL: its rollout coordinator)
    eval_at_start            evaluate before the first step too (logged as step 0, and
                             in the summary as "start/eval/...")
    nan_advice               what to try when the loss stops being finite
    trainable(lc)            the model to train (before DeepSpeed wraps it)
    prepare(engine, lc, world, accum)   anything else (frozen models, tokenizer)
    begin_step(micro_batches, timer), end_step(engine, step, timer)
                             around each step (online RL: generation, weight sync)
    updates(micro_batches)   the step's optimizer updates, each a list of micro-batches
                             (default: one over all; PPO: epochs x mini-batches), all
                             of one length
    save_state(folder), load_state(folder)   more state in checkpoints (every rank;
                             PPO: the critic's engine, the adaptive KL coefficient)
    step_counts(micro_batches) -> dict  local per-step counts; "samples", "tokens" and
                             "unique_tokens" are read by the loop, all are summed over
                             workers and handed to micro_step and metrics (every worker
                             reports the same keys; "max:..." keys of micro_step's sums
                             are reduced to their largest value instead)
    micro_step(engine, rows, totals, grad, timer) -> (loss or None, sums dict)
                             one micro-batch; rows == [] means a zero-weight dummy forward
                             (ZeRO-3 needs every rank in every gather); the loss must be
                             normalised so that the update is the global-batch mean
    metrics(sums, totals, split) -> dict   "{split}/..." values from summed sums
    export(full_state_dict, out_dir)        write the final model (rank 0)
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from pathlib import Path

from cluster.train import PAIR_FLAGS


class Task:
    """What every task shares: the config, the tokenizer, the dummy row for zero-weight
    forwards (`dummy_rows`), and loading the trained model (`reward_head` picks the
    scalar-head variant)."""

    name = "rows"
    flags: dict[str, str] = {}
    eval_at_start = False
    reward_head = False
    train_from_shard = True  # online RL's rollouts come from its coordinator instead

    def __init__(self, cfg):
        self.cfg = cfg

    def dummy_rows(self, token_id: int) -> list[dict]:
        raise NotImplementedError

    def batch_builder(self):
        """The rlhf.core.logprobs function that turns tokenised rows into a model input."""
        raise NotImplementedError

    def batch(self, rows: list[dict]) -> dict:
        """The model input of a micro-batch; the dummy row when `rows` is empty."""
        cfg = self.cfg
        return self.batch_builder()(rows or self.dummy, pad_id=self.pad_id,
                                    packing=cfg.data.packing,
                                    attn_implementation=cfg.model.attn_implementation)

    def trainable(self, lc: dict):
        from cluster.models import load_causal_lm, load_tokenizer

        self.tok = load_tokenizer(lc["model_path"])
        self.pad_id, self.dummy = self.tok.pad_token_id, self.dummy_rows(self.tok.eos_token_id)
        self.model_path = lc["model_path"]
        return load_causal_lm(lc["model_path"], self.cfg.model, trainable=True,
                              use_gpu=self.cfg.cluster.use_gpu, packing=self.cfg.data.packing,
                              reward_head=self.reward_head)

    def frozen_reference(self, path: str, world: int):
        """A frozen DeepSpeed inference engine of the model at `path` (the reference):
        sharded like the policy under ZeRO-3, in CPU memory with cluster.offload_frozen."""
        from cluster.deepspeed import frozen_config_for, frozen_engine
        from cluster.models import load_causal_lm

        cfg = self.cfg
        ref = load_causal_lm(path, cfg.model, trainable=False, use_gpu=cfg.cluster.use_gpu,
                             packing=cfg.data.packing)
        return frozen_engine(ref, frozen_config_for(cfg, world))

    def updates(self, micro_batches: list[list[dict]]) -> list[list[list[dict]]]:
        """The optimizer updates of a step, each over a list of micro-batches."""
        return [micro_batches]

    def feed(self, shard, micro: int, accum: int, skip: set[int] | None = None):
        """Where the steps' micro-batches come from: this worker's shard of the train
        split (online RL: its rollout coordinator, cluster.rollout_feed.RolloutFeed)."""
        from cluster.train import RowFeed

        return RowFeed(shard, micro, accum, skip=skip, flags=self.flags)

    def save_state(self, folder: Path) -> None:
        """Called on every rank when a checkpoint is written into `folder`."""

    def load_state(self, folder: Path) -> None:
        """Called on every rank after the engine is restored from `folder`."""

    def begin_step(self, micro_batches: list[list[dict]], timer) -> None:
        """Before a step's counts and micro-steps (online RL: generate and score)."""

    def end_step(self, engine, step: int, timer) -> None:
        """After a step's optimizer update (online RL: sync the engines' weights)."""

    def export(self, full_state: dict, out_dir: Path) -> None:
        """A causal LM (merged LoRA, or the adapter alone) with its tokenizer."""
        from cluster.models import export_hf

        export_hf(full_state, self.model_path, out_dir, self.cfg.model, self.tok)


class PairTask(Task):
    """What DPO and the reward model share: the dummy pair and the per-step token
    counts of a pair batch."""

    name = "pairs"
    flags = PAIR_FLAGS

    def dummy_rows(self, token_id: int) -> list[dict]:
        from rlhf.core.logprobs import dummy_pair_rows

        return dummy_pair_rows(token_id)

    def batch_builder(self):
        from rlhf.core.logprobs import rows_pair_batch

        return rows_pair_batch

    def step_counts(self, micro_batches: list[list[dict]]) -> dict[str, float]:
        rows = [r for mb in micro_batches for r in mb]
        p = sum(len(r["prompt_ids"]) for r in rows)
        c = sum(len(r["chosen_ids"]) for r in rows)
        r = sum(len(r["rejected_ids"]) for r in rows)
        # tokens: prompt+chosen and prompt+rejected (what a padded trainer runs, less its
        # padding); unique_tokens: each prompt once (the work data.packing does);
        # chosen_tokens: DPO's RPO term is normalised by it.
        return {"samples": len(rows), "tokens": 2 * p + c + r, "unique_tokens": p + c + r,
                "chosen_tokens": c}


def _add(into: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    """Sums `more` into `into`; keys named "max:..." keep the larger value instead."""
    for k, v in more.items():
        into[k] = max(into.get(k, v), v) if k.startswith("max:") else into.get(k, 0.0) + v
    return into


def _all_sum_dict(d: dict[str, float]) -> dict[str, float]:
    """Every value summed over the workers ("max:..." keys: the largest); every worker
    must hold the same keys."""
    from cluster.train import all_max, all_sum

    keys = sorted(k for k in d if not k.startswith("max:"))
    out = dict(zip(keys, all_sum([float(d[k]) for k in keys])))
    maxes = sorted(k for k in d if k.startswith("max:"))
    if maxes:
        out.update(zip(maxes, all_max([float(d[k]) for k in maxes])))
    return out


def evaluate(task, engine, shard) -> dict:
    """Held-out metrics over the whole eval shard, in lock-step across workers."""
    import torch

    from cluster.train import RowFeed

    engine.eval()
    sums: dict[str, float] = {}
    feed = RowFeed(shard, task.cfg.train.micro_batch_size, 1, flags=task.flags)
    with torch.no_grad():
        for micro_batches in feed.eval_steps():
            for mb in micro_batches:
                _, s = task.micro_step(engine, mb, None, grad=False, timer=None)
                _add(sums, s)
    engine.train()
    # Held-out rows the tokeniser dropped (e.g. too long) are reported, not silently lost.
    sums["__dropped"] = sum(v for k, v in feed.counts.items() if k.startswith("dropped"))
    sums = _all_sum_dict(sums)
    dropped = int(sums.pop("__dropped"))
    return {**task.metrics(sums, None, "eval"), "eval/dropped": dropped}


def training_engine(cfg, model, world: int, accum: int, learning_rate: float,
                    total_updates: int, universal: bool = False):
    """`model` in a DeepSpeed training engine: optimizer, schedule and ZeRO stage from
    cfg's train and cluster sections; `accum` micro-batches per optimizer update.
    universal: it will load a checkpoint saved at another world size (see
    cluster.train.load_engine_state)."""
    from cluster import deepspeed as dsc

    t, c = cfg.train, cfg.cluster
    ds_cfg = dsc.train_config(
        zero_stage=c.zero_stage, dtype=cfg.model.dtype, micro_batch_size=t.micro_batch_size,
        grad_accum=accum, world_size=world, max_grad_norm=t.max_grad_norm,
        offload_optimizer=c.offload_optimizer, offload_params=c.offload_params,
        learning_rate=learning_rate, weight_decay=t.weight_decay)
    if universal:
        ds_cfg["checkpoint"] = {"load_universal": True}
    engine, _ = dsc.train_engine(model, ds_cfg, learning_rate=learning_rate,
                                 weight_decay=t.weight_decay, total_steps=total_updates,
                                 warmup_steps=int(t.warmup_ratio * total_updates),
                                 schedule=t.lr_scheduler)
    return engine


def build_engine(task, lc: dict, world: int, accum: int):
    """The task's model in a DeepSpeed training engine (lc's learning_rate and
    total_steps), then task.prepare. `accum` is the micro-batches per worker per step;
    a task with several updates per step (task.updates) accumulates over fewer."""
    updates = task.updates([[] for _ in range(accum)])
    per_update, total = len(updates[0]), lc["total_steps"] * len(updates)
    engine = training_engine(task.cfg, task.trainable(lc), world, per_update,
                             lc["learning_rate"], total, lc.get("universal", False))
    task.prepare(engine, lc, world, per_update)
    return engine


def train_loop(lc: dict, task) -> None:
    """Runs on every Ray Train worker. Everything it needs comes in `lc` and `task`."""
    import random
    import resource

    import numpy as np
    import ray.train
    import torch

    from cluster.train import (RowFeed, StepTimer, all_gather_objects, gather_state_dict,
                               load_checkpoint, quiet_worker_logs, rank_world,
                               save_checkpoint, saved_world_size)

    cfg = task.cfg
    t, c = cfg.train, cfg.cluster
    quiet_worker_logs()
    rank, world = rank_world()
    random.seed(t.seed + rank)
    np.random.seed(t.seed + rank)
    torch.manual_seed(t.seed)  # same LoRA / head init on every rank
    accum = t.global_batch_size // (t.micro_batch_size * world)
    total = lc["total_steps"]
    step, epoch0, samples, tokens_seen = 0, 0, 0, 0
    start_eval: dict = {}  # task.eval_at_start: held-out metrics before training
    skip: set[int] = set()
    counts: Counter = Counter()
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        engine = build_engine(task, lc, world, accum)
    else:
        with ckpt.as_directory() as d:
            # An elastic run restarted at another size: ZeRO's shards are re-partitioned
            # on load (the global batch is kept by `accum`, the data position by ids).
            saved = saved_world_size(d)
            lc = {**lc, "universal": saved != world and c.zero_stage > 0}
            if rank == 0 and saved != world:
                print(f"resuming with {world} workers from a checkpoint of {saved}; "
                      f"{accum} micro-batch(es) per worker per step", flush=True)
            engine = build_engine(task, lc, world, accum)
            restored = load_checkpoint(engine, d, lc["universal"])
            task.load_state(Path(d))
        head = restored["states"][0]
        step, epoch0 = head["step"], head["epoch"]
        samples, tokens_seen = head["samples"], head["tokens"]
        start_eval = head.get("start_eval", {})
        skip = restored["consumed"] if not head.get("epoch_done") else set()
        epoch0 += int(bool(head.get("epoch_done")))
        if rank == 0:
            for s in restored["states"]:
                counts.update(s["counts"])
            print(f"resumed at step {step} (epoch {epoch0 + 1}, {len(skip)} {task.name} of "
                  "this epoch already trained)", flush=True)
        # The restored weights are those of the end of step `step`: whatever follows
        # each step (online RL: the engines' weights) must follow them too.
        task.end_step(engine, step, None)
    device = engine.device

    run_log = lc["run_log"]
    train_shard = ray.train.get_dataset_shard("train") if task.train_from_shard else None
    eval_shard = ray.train.get_dataset_shard("eval")
    engine.train()

    def merged(feed: RowFeed) -> dict:
        out = Counter(counts)
        out.update(feed.counts)  # update keeps zero counts; `+` would drop them
        return dict(out)

    def worker_state(feed: RowFeed, epoch_done: bool) -> dict:
        return {"step": step, "epoch": epoch, "samples": samples, "tokens": tokens_seen,
                "epoch_done": epoch_done, "counts": merged(feed), "start_eval": start_eval,
                "consumed": ([] if epoch_done else
                             (sorted(skip) if rank == 0 else []) + feed.consumed)}

    def total_counts(feed: RowFeed) -> dict:
        total_: Counter = Counter({label: 0 for label in task.flags.values()})
        for part in all_gather_objects(merged(feed)):
            total_.update(part)
        return dict(total_)

    def new_feed(skip_ids: set[int] | None = None) -> RowFeed:
        return task.feed(train_shard, t.micro_batch_size, accum, skip=skip_ids)

    if task.eval_at_start and ckpt is None:
        start_eval = {f"start/{k}": v for k, v in evaluate(task, engine, eval_shard).items()}
        if rank == 0:
            run_log.log.remote({"step": 0, **{k[len("start/"):]: v
                                              for k, v in start_eval.items()}})

    feed = new_feed()
    epoch = epoch0
    done = step >= total
    epoch_finished = False
    while not done and epoch < t.epochs:
        epoch_finished = False
        feed = new_feed(skip if epoch == epoch0 else None)
        t0 = time.time()  # step time includes waiting for data: tokens/s is end to end
        timer = StepTimer(cuda=str(device).startswith("cuda"))
        for micro_batches, ids, step_counts in feed.steps(epoch):
            timer.mark("data")
            task.begin_step(micro_batches, timer)
            totals = _all_sum_dict(task.step_counts(micro_batches))
            sums: dict[str, float] = {}
            updates = task.updates(micro_batches)
            for group in updates:
                # each update is normalised over its own share of the global batch
                norm = totals if len(updates) == 1 else _all_sum_dict(task.step_counts(group))
                for mb in group:
                    loss, s = task.micro_step(engine, mb, norm, grad=True, timer=timer)
                    engine.backward(loss)  # with the gradient all-reduce at the boundary
                    timer.mark("backward")
                    engine.step()
                    timer.mark("optimizer")
                    _add(sums, s)
            feed.commit(ids, step_counts)
            step += 1
            task.end_step(engine, step, timer)
            fault = lc.get("crash_once_at_step")
            if fault and step == fault["step"] and rank == world - 1:
                marker = Path(fault["marker"])
                if not marker.exists():  # a hard death, as when a node is lost
                    marker.write_text(str(step))
                    # Ray Train's controller collects reported checkpoints on its
                    # health-check poll (2 s unless RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
                    # says otherwise); in a real run minutes pass between a checkpoint
                    # and a crash, so let it see the last one first: two polls and more.
                    time.sleep(2.5 * float(os.environ.get(
                        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
                    os._exit(1)
            samples += int(totals["samples"])
            tokens_seen += int(totals["tokens"])
            metrics = task.metrics(_all_sum_dict(sums), totals, "train")
            if not math.isfinite(metrics["train/loss"]):
                raise FloatingPointError(
                    f"The loss became {metrics['train/loss']} at step {step}. "
                    f"{task.nan_advice}")
            grad_norm = engine.get_global_grad_norm()
            timer.mark("other")
            elapsed = max(time.time() - t0, 1e-9)
            metrics.update({
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "train/learning_rate": engine.get_lr()[0],
                "train/tokens_per_s": totals["tokens"] / elapsed,
                "train/unique_tokens_per_s": totals["unique_tokens"] / elapsed,
                "train/samples": samples, "train/epoch": epoch + 1, "train/workers": world,
                "train/step_time_s": elapsed,
                # Peak resident memory of this worker process (rank 0 reports its own).
                "train/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                **{f"time/{k}_s": v for k, v in timer.times.items()}})
            last = step >= total
            evaluated = bool(t.eval_every and step % t.eval_every == 0 and not last)
            if evaluated:
                metrics.update(evaluate(task, engine, eval_shard))
            if rank == 0 and (step % t.log_every == 0 or last or evaluated):
                run_log.log.remote({"step": step, **metrics})
            if t.checkpoint_every and step % t.checkpoint_every == 0 and not last:
                save_checkpoint(engine, worker_state(feed, False),
                                {"step": step, **metrics}, step, extra=task.save_state)
            if last:
                done = True
                break
            t0 = time.time()
            timer.reset()
        else:
            epoch_finished = True
            epoch += 1
            counts.update(feed.counts)  # keep this epoch's counts; the next feed starts at 0
            feed = new_feed()

    # Final: evaluate, then one checkpoint holding the resumable state and the export.
    final_eval = evaluate(task, engine, eval_shard)
    counts_all = total_counts(feed)
    full = gather_state_dict(engine, c.zero_stage)
    if rank == 0:
        import ray

        run_log.log.remote({"step": step, **final_eval})
        ray.get(run_log.set_summary.remote({"steps": step, "samples": samples,
                                            "tokens": tokens_seen, "counts": counts_all,
                                            **start_eval, **final_eval}))

    def export(tmp: Path) -> None:
        task.save_state(tmp)
        if rank == 0:
            task.export(full, tmp / "model")

    if epoch_finished:
        epoch -= 1  # the state names the epoch that just ended, marked done
    save_checkpoint(engine, worker_state(feed, epoch_finished), {"step": step, **final_eval},
                    step, extra=export)
