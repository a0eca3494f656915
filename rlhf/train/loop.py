"""The Ray Train worker loop every trained model shares (DPO, reward model, SFT, online
RL), around the task's own computation (rlhf.train.tasks.base.Task). Its phases, in the
order `train_loop` runs them:

    restore     seeds; the task's model in a DeepSpeed engine, fresh or from the latest
                checkpoint (at another number of workers too: an elastic restart)
    feed        the task's steps of micro-batches, in lock-step across workers (a shard
                of rows, or online RL's rollouts)
    step        the task's updates: micro-steps, backward, optimizer; the step's counts
                summed over workers first, so the loss is the global-batch mean however
                the batch was split; per-phase timings
    evaluate    held-out metrics every train.eval_every steps (and before step 1 for a
                task that asks), metrics to the run log, a NaN stop
    checkpoint  the engine's state and the data position every train.checkpoint_every
    export      the final evaluation, and one last checkpoint that holds the model

The driver half (Ray, pipelines, the trainer, the run directory) is rlhf/train/driver.py.
"""

from __future__ import annotations

import math
import os
import random
import resource
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cluster.checkpoints import (gather_state_dict, load_checkpoint, save_checkpoint,
                                 saved_world_size)
from cluster.deepspeed import training_engine
from cluster.feed import RowFeed
from cluster.worker import (StepTimer, add_sums, all_gather_objects, all_reduce_sums,
                            quiet_worker_logs, rank_world, say)
from rlhf.config import build
from rlhf.train.tasks.base import Feed, Task


def train_loop(lc: dict) -> None:
    """Runs on every Ray Train worker. Everything it needs comes in `lc` (the loop
    config the driver built: lc["task"] is the Task class, lc["config"] its config)."""
    task_cls: type[Task] = lc["task"]
    loop = WorkerLoop(lc, task_cls(build(task_cls.config_cls, lc["config"])))
    loop.restore()
    loop.evaluate_at_start()
    while not loop.done and loop.epoch < loop.t.epochs:
        loop.run_epoch()
    loop.export()


class WorkerLoop:
    """One worker's training run; each phase a method (see the module docstring)."""

    def __init__(self, lc: dict, task: Task):
        self.lc, self.task, self.cfg = lc, task, task.cfg
        self.t, self.c = self.cfg.train, self.cfg.cluster
        self.rank, self.world = rank_world()
        self.accum = self.t.global_batch_size // (self.t.micro_batch_size * self.world)
        self.total = lc["total_steps"]
        self.run_log = lc["run_log"]
        # the resumable state: what a checkpoint saves and `restore` reads back
        self.step = self.epoch = self.samples = self.tokens = 0
        self.start_eval: dict = {}  # task.eval_at_start: held-out metrics before step 1
        self.skip: set[int] = set()  # ids of this epoch's rows trained before a resume
        self.counts: Counter = Counter()  # dropped rows and flags of the finished epochs
        self.resumed = False
        self.done = self.epoch_finished = False
        self.evaluations: list[dict] = []  # rank 0: the metrics rows with held-out figures

    # -------------------------------------------------------------------------- restore

    def restore(self) -> None:
        """Seeds, the engine, and the latest checkpoint's state where Ray Train has one."""
        import ray.train

        quiet_worker_logs()
        random.seed(self.t.seed + self.rank)
        np.random.seed(self.t.seed + self.rank)
        torch.manual_seed(self.t.seed)  # same LoRA / head init on every rank
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            self.engine = build_engine(self.task, self.lc, self.world, self.accum)
        else:
            with ckpt.as_directory() as d:
                self._restore_from(d)
        self.train_shard = (ray.train.get_dataset_shard("train") if self.task.train_from_shard
                            else None)
        self.eval_shard = ray.train.get_dataset_shard("eval")
        self.engine.train()
        self.feed = self.new_feed()
        self.done = self.step >= self.total

    def _restore_from(self, folder: str) -> None:
        # An elastic run restarted at another size: ZeRO's shards are re-partitioned on
        # load (the global batch is kept by `accum`, the data position by row ids).
        saved = saved_world_size(folder)
        lc = {**self.lc, "universal": saved != self.world and self.c.zero_stage > 0}
        if self.rank == 0 and saved != self.world:
            say(f"resuming with {self.world} workers from a checkpoint of {saved}; "
                f"{self.accum} micro-batch(es) per worker per step")
        self.engine = build_engine(self.task, lc, self.world, self.accum)
        restored = load_checkpoint(self.engine, folder, lc["universal"])
        self.task.load_state(Path(folder))
        head = restored["states"][0]
        self.step, self.epoch = head["step"], head["epoch"]
        self.samples, self.tokens = head["samples"], head["tokens"]
        self.start_eval = head.get("start_eval", {})
        self.skip = restored["consumed"] if not head.get("epoch_done") else set()
        self.epoch += int(bool(head.get("epoch_done")))
        self.resumed = True
        if self.rank == 0:
            for s in restored["states"]:
                self.counts.update(s["counts"])
            say(f"resumed at step {self.step} (epoch {self.epoch + 1}, {len(self.skip)} "
                f"{self.task.name} of this epoch already trained)")
        # The restored weights are those of the end of step `step`: whatever follows
        # each step (online RL: the engines' weights) must follow them too.
        self.task.end_step(self.engine, self.step, None)

    # ----------------------------------------------------------------------------- feed

    def new_feed(self, skip: set[int] | None = None) -> Feed:
        return self.task.feed(self.train_shard, self.t.micro_batch_size, self.accum,
                              skip=skip)

    def run_epoch(self) -> None:
        """One pass over the train split (online RL: the coordinator's epoch), step by
        step; it ends early at the run's last step."""
        resuming = bool(self.skip)  # in this epoch: its rows trained before are passed over
        self.epoch_finished = False
        self.feed = self.new_feed(self.skip if resuming else None)
        self.t0 = time.time()  # a step's time includes waiting for data: tokens/s is end to end
        self.timer = StepTimer(cuda=str(self.engine.device).startswith("cuda"))
        for micro_batches, ids, counts in self.feed.steps(self.epoch):
            self.timer.mark("data")
            sums, totals = self.train_step(micro_batches)
            self.feed.commit(ids, counts)
            self.step += 1
            self.task.end_step(self.engine, self.step, self.timer)
            self._crash_if_asked()
            if self.after_step(sums, totals):
                self.done = True
                return
            self.t0 = time.time()
            self.timer.reset()
        self.epoch_finished = True
        self.epoch += 1
        self.counts.update(self.feed.counts)  # this epoch's; the next feed starts at 0
        self.skip = set()  # passed over in the epoch just ended, not in the next one
        self.feed = self.new_feed()

    # ----------------------------------------------------------------------------- step

    def train_step(self, micro_batches: list[list]) -> tuple[dict, dict]:
        """The task's updates over one step's micro-batches -> (summed sums of this
        worker, the step's counts summed over workers)."""
        task, engine, timer = self.task, self.engine, self.timer
        task.begin_step(micro_batches, timer)
        totals = all_reduce_sums(task.step_counts(micro_batches))
        sums: dict[str, float] = {}
        updates = task.updates(micro_batches)
        for group in updates:
            # each update is normalised over its own share of the global batch
            norm = totals if len(updates) == 1 else all_reduce_sums(task.step_counts(group))
            for mb in group:
                loss, s = task.micro_step(engine, mb, norm, grad=True, timer=timer)
                engine.backward(loss)  # with the gradient all-reduce at the boundary
                timer.mark("backward")
                engine.step()
                timer.mark("optimizer")
                add_sums(sums, s)
        return sums, totals

    def _crash_if_asked(self) -> None:
        """Fault injection for tests: the last worker dies hard once, after the step the
        driver named (crash_once_at_step), as when a node is lost."""
        fault = self.lc.get("crash_once_at_step")
        if not fault or self.step != fault["step"] or self.rank != self.world - 1:
            return
        marker = Path(fault["marker"])
        if not marker.exists():
            marker.write_text(str(self.step))
            # Ray Train's controller collects reported checkpoints on its health-check
            # poll (2 s unless RAY_TRAIN_HEALTH_CHECK_INTERVAL_S says otherwise); in a real
            # run minutes pass between a checkpoint and a crash, so let it see the last
            # one first: two polls and more.
            time.sleep(2.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
            os._exit(1)

    # ------------------------------------------------------------ evaluate, checkpoint

    def after_step(self, sums: dict, totals: dict) -> bool:
        """The step's metrics (a NaN stop), held-out metrics when due, the record to the
        run log, a checkpoint when due. True at the run's last step."""
        t, engine, timer = self.t, self.engine, self.timer
        self.samples += int(totals["samples"])
        self.tokens += int(totals["tokens"])
        metrics = self.task.metrics(all_reduce_sums(sums), totals, "train")
        if not math.isfinite(metrics["train/loss"]):
            raise FloatingPointError(f"The loss became {metrics['train/loss']} at step "
                                     f"{self.step}. {self.task.nan_advice}")
        grad_norm = engine.get_global_grad_norm()
        timer.mark("other")
        elapsed = max(time.time() - self.t0, 1e-9)
        metrics.update({
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/learning_rate": engine.get_lr()[0],
            "train/tokens_per_s": totals["tokens"] / elapsed,
            "train/unique_tokens_per_s": totals["unique_tokens"] / elapsed,
            "train/samples": self.samples, "train/epoch": self.epoch + 1,
            "train/workers": self.world, "train/step_time_s": elapsed,
            # Peak resident memory of this worker process (rank 0 reports its own).
            "train/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **{f"time/{k}_s": v for k, v in timer.times.items()}})
        last = self.step >= self.total
        evaluated = bool(t.eval_every and self.step % t.eval_every == 0 and not last)
        if evaluated:
            metrics.update(self.held_out())
        if self.rank == 0 and (self.step % t.log_every == 0 or last or evaluated):
            self.run_log.log.remote({"step": self.step, **metrics})
        if self.rank == 0 and evaluated:
            self.evaluations.append({"step": self.step, **metrics})
            for warning in self.task.watch(self.evaluations):
                say(f"warning: {warning}", err=True)
        if t.checkpoint_every and self.step % t.checkpoint_every == 0 and not last:
            save_checkpoint(engine, self.worker_state(False), {"step": self.step, **metrics},
                            self.step, extra=self.task.save_state)
        return last

    def held_out(self) -> dict:
        """Held-out metrics of the engine now (`evaluate` over this worker's eval shard)."""
        return evaluate(self.task, self.engine, self.eval_shard, self.lc.get("eval_rows", 0))

    def evaluate_at_start(self) -> None:
        """For a task that asks (eval_at_start), held-out metrics before the first step,
        logged as step 0 (not again after a resume)."""
        if not self.task.eval_at_start or self.resumed:
            return
        ev = self.held_out()
        self.start_eval = {f"start/{k}": v for k, v in ev.items()}
        if self.rank == 0:
            self.run_log.log.remote({"step": 0, **ev})
            self.evaluations.append({"step": 0, **ev})

    def merged_counts(self) -> dict:
        out = Counter(self.counts)
        out.update(self.feed.counts)  # update keeps zero counts; `+` would drop them
        return dict(out)

    def worker_state(self, epoch_done: bool) -> dict:
        """This rank's part of a checkpoint (cluster.checkpoints.save_checkpoint)."""
        return {"step": self.step, "epoch": self.epoch, "samples": self.samples,
                "tokens": self.tokens, "epoch_done": epoch_done,
                "counts": self.merged_counts(), "start_eval": self.start_eval,
                "consumed": ([] if epoch_done else
                             (sorted(self.skip) if self.rank == 0 else []) + self.feed.consumed)}

    # --------------------------------------------------------------------------- export

    def export(self) -> None:
        """The final evaluation and summary, then one checkpoint holding the resumable
        state and the exported model (the driver copies it to the run directory)."""
        import ray

        final_eval = self.held_out()
        counts: Counter = Counter({label: 0 for label in self.task.flags.values()})
        for part in all_gather_objects(self.merged_counts()):
            counts.update(part)
        full = gather_state_dict(self.engine, self.c.zero_stage)
        if self.rank == 0:
            self.run_log.log.remote({"step": self.step, **final_eval})
            ray.get(self.run_log.set_summary.remote({
                "steps": self.step, "samples": self.samples, "tokens": self.tokens,
                "counts": dict(counts), **self.start_eval, **final_eval}))

        def write(folder: Path) -> None:
            self.task.save_state(folder)
            if self.rank == 0:
                self.task.export(full, folder / "model")

        if self.epoch_finished:
            self.epoch -= 1  # the state names the epoch that just ended, marked done
        save_checkpoint(self.engine, self.worker_state(self.epoch_finished),
                        {"step": self.step, **final_eval}, self.step, extra=write)


def build_engine(task: Task, lc: dict, world: int, accum: int):
    """The task's model in a DeepSpeed training engine (lc's learning_rate and
    total_steps), then task.prepare. `accum` is the micro-batches per worker per step;
    a task with several updates per step (task.updates) accumulates over fewer."""
    updates = task.updates([[] for _ in range(accum)])
    per_update, total = len(updates[0]), lc["total_steps"] * len(updates)
    engine = training_engine(task.cfg, task.trainable(lc), world, per_update,
                             lc["learning_rate"], total, lc.get("universal", False))
    task.prepare(engine, lc, world, per_update)
    return engine


EVAL_QUIET_S = 5.0  # an evaluation shorter than this prints no progress; then every 15 s


def evaluate(task: Task, engine, shard, total: int = 0) -> dict:
    """Held-out metrics over the whole eval shard, in lock-step across workers. One that
    takes a while says how far it is (rank 0, its rows times the workers, of `total`)."""
    engine.eval()
    sums: dict[str, float] = {}
    feed = RowFeed(shard, task.cfg.train.micro_batch_size, 1, flags=task.flags)
    rank, world = rank_world()
    t0 = last = time.time()
    seen = 0
    with torch.no_grad():
        for micro_batches in feed.eval_steps():
            for mb in micro_batches:
                _, s = task.micro_step(engine, mb, None, grad=False, timer=None)
                add_sums(sums, s)
                seen += len(mb)
            now = time.time()
            if rank == 0 and now - t0 > EVAL_QUIET_S and now - last > 15.0:
                last = now
                of = f" of {total}" if total else ""
                say(f"evaluating: ~{seen * world}{of} held-out {task.name}, "
                    f"{now - t0:.0f} s")
    engine.train()
    # Held-out rows the tokeniser dropped (e.g. too long) are reported, not silently lost.
    sums["__dropped"] = sum(v for k, v in feed.counts.items() if k.startswith("dropped"))
    sums = all_reduce_sums(sums)
    dropped = int(sums.pop("__dropped"))
    return {**task.metrics(sums, None, "eval"), "eval/dropped": dropped}
