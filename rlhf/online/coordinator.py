"""The rollout coordinator: a Ray actor the driver owns that runs online RL's data flow.

    prompts (Ray Data) -> engines (vLLM actors) -> episodes (environments, tools) ->
    rollout records (rlhf.core.rollouts) -> rewards -> filters -> a bounded queue of batches
    -> the Ray Train workers (rlhf.online.task's feed), who send new weights back

Batch s trains at step s, whose policy is weights version s - 1. It may be generated
once the trainers have published version s - 1 - k (k = rollout.max_staleness), with
the newest weights published when it starts, so no sample trains more than k versions
after the oldest weights that sampled it:
    k = 0   lock-step on-policy: batch s waits for step s - 1's weights (what rlhf.ppo
            always did; the same samples and losses);
    k = 1   one step off-policy: batch s + 1 is generated while step s trains;
    k >= 2  the coordinator runs up to k batches ahead.
Up to k + 1 batches are made at once (one generates while another waits for its
environments). With rollout.partial_rollouts a generation is cut into pieces of
rollout.chunk_tokens, the engines take new weights between pieces, and a response
carries the version of each token. A guard leaves out (and counts) any group staler
than k when it is handed out (by construction none is); the records' staleness is
reported per step as a histogram.

Prompts: the train split, one stream per training rank, as Ray Train splits a dataset
(rlhf/online/prompt_stream.py). Episodes: generated a round at a time with environments
between turns, scored and filtered (rlhf/online/episodes.py). The trainers take their share
of each batch through rlhf/online/feed.py.

Filters: a group whose rewards are all equal (algo.dynamic_sampling) or one with a
failed environment episode (rollout.env_errors=skip) is dropped, counted, and replaced
by the next prompts of its rank's split. Over-long responses are masked out
(algo.overlong=filter) or penalised (penalty).

Checkpoints (`snapshot`): the coordinator finishes the batches it has started and
hands over every batch of the checkpoint's epoch not yet trained; after a restore they
are trained first, exactly as they would have been, and their prompts are not read
again. Later batches (another epoch) are generated again. A trainer restart (Ray Train
restores the last checkpoint) or a resumed run `start`s the coordinator anew from
that state; whatever it was doing is abandoned.

Every batch handed out is written to `rollouts.jsonl` in the run directory: its step,
prompts, weights versions, staleness counts, dropped groups and a digest of its
samples (equal digests: the same samples trained).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from cluster.engine_client import EngineClient
from cluster.models import load_tokenizer
from rlhf.core.rollouts import RolloutRecord, digest, split_stale, staleness_counts
from rlhf.online.episodes import EpisodeRunner
from rlhf.online.prompt_stream import PromptStream

DROP_STALE = "dropped: staler than rollout.max_staleness"


@dataclass
class EpochEnd:
    """The end of an epoch's prompts; the prompt rows read since the last batch, all
    dropped (rank 0 commits them)."""

    epoch: int
    ids: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


@dataclass
class Batch:
    """What one training step gets: each rank's micro-batches of records."""

    step: int
    epoch: int
    micro_batches: list[list[list[RolloutRecord]]]  # [rank][micro-batch][record]
    ids: list[list[int]]  # per rank: every prompt id this batch read (trained or dropped)
    counts: Counter
    stats: dict = field(default_factory=dict)


class RolloutCoordinator:
    """The data flow of online RL (see the module docstring). A threaded Ray actor: a
    producer thread makes batches while the trainers' calls are served."""

    def __init__(self, cfg, engines: list, sync: str, weights_dir: str, store,
                 train_dataset, model_path: str, run_dir: str, total_steps: int,
                 reward_pools: list | None = None, gold_pool=None, judge_pool=None):
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.cfg, self.r, self.a = cfg, cfg.rollout, cfg.algo
        self.client = EngineClient(engines, sync, weights_dir, store)
        self.runner = EpisodeRunner(cfg, self.client, load_tokenizer(model_path),
                                    reward_pools, gold_pool, judge_pool)
        self.dataset, self.total_steps = train_dataset, total_steps
        self.ledger_path = f"{run_dir}/rollouts.jsonl"
        self.cond = threading.Condition()
        self.attempt = 0
        self.queue: deque = deque()
        self.error: str | None = None
        self.sync_needed = 0  # > 0: the broadcast path needs the trainers to re-sync
        self.busy = 0  # batches being made
        self.paused = False

    # ------------------------------------------------------------ the trainers' calls

    def start(self, world: int, micro: int, accum: int, step: int, epoch: int,
              skip: list[int], saved: list[dict] | None = None) -> int:
        """(Re)start from a training state: `step` steps done (the engines are being
        brought to that version by the trainers), the data position of `epoch` (`skip`:
        prompt ids trained) and the batches a checkpoint saved (`snapshot`)."""
        with self.cond:
            self.attempt += 1
            attempt = self.attempt
            self.world, self.micro, self.accum = world, micro, accum
            self.queue = deque(_rebalanced(_batch_from_json(b), world, micro, accum)
                               for b in (saved or []))
            self.taken: dict[int, set[int]] = {}
            self.head = 0  # index of self.queue[0] among this attempt's items
            self.made = step + len(self.queue)  # steps with a batch (trained or queued)
            self.error, self.sync_needed, self.busy, self.paused = None, 0, 0, False
            self.finished: dict[int, Batch] = {}  # made, waiting for an earlier step
            self.queued = self.made  # the last step whose batch is queued
            self.stream_lock = threading.Lock()
            self.client.forget()
            self.client.published(step)
            read = set(skip) | {i for b in self.queue for ids in b.ids for i in ids}
            self.stream_args = (epoch, read)
            self.cond.notify_all()
        threading.Thread(target=self._produce, args=(attempt,), daemon=True).start()
        return attempt

    def published(self, version: int, loaded: bool = False) -> None:
        """The trainers published weights `version` (loaded: they broadcast it into
        every engine themselves)."""
        with self.cond:
            self.client.published(version)
            if loaded:
                for i in range(len(self.client.engines)):
                    self.client.mark_loaded(i, version)
                self.sync_needed = 0
            self.cond.notify_all()

    def next_step(self, rank: int, index: int, timeout_s: float = 5.0) -> dict:
        """Rank `rank`'s share of this attempt's item `index`: {"micro_batches", "ids",
        "counts", "stats"}, {"epoch_end": epoch}, or, when nothing is ready within
        timeout_s, {"wait": ...} (the caller asks again; an answer within seconds keeps
        a failed producer or a needed re-sync from going unnoticed): {"error": message}
        and {"sync": n} (broadcast path: the trainers must re-sync the engines)."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                if self.error:
                    return {"error": self.error}
                if self.sync_needed:
                    return {"sync": self.sync_needed}
                at = index - self.head
                if 0 <= at < len(self.queue):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"wait": True}
                self.cond.wait(left)
            item = self.queue[at]
            if isinstance(item, EpochEnd):
                out = {"epoch_end": True, "ids": item.ids if rank == 0 else [],
                       "counts": dict(item.counts) if rank == 0 else {}}
            else:
                if at == 0 and index not in self.taken:
                    self._check_staleness(item)
                out = {"micro_batches": item.micro_batches[rank], "ids": item.ids[rank],
                       "counts": dict(item.counts) if rank == 0 else {},
                       "stats": item.stats if rank == 0 else {}}
            self.taken.setdefault(index, set()).add(rank)
            while self.queue and len(self.taken.get(self.head, ())) == self.world:
                done = self.queue.popleft()
                del self.taken[self.head]
                self.head += 1
                if isinstance(done, Batch):
                    self._log(done)
            self.cond.notify_all()
            return out

    def eval_rollouts(self, rank: int, rows: list[dict], version: int) -> dict:
        """Held-out rollouts of `rows` with weights `version` (the trainers' current):
        the same samples of a prompt at every evaluation (common random numbers), no
        filters: {"records": [record as a dict], "failed": episodes whose environment
        failed (left out)}."""
        runner = self.runner
        with runner.engine_lock:
            engine = rank % len(self.client.engines)
            self.client.bring_to(engine, version, exact=True)
            eps = runner.episodes(rank, rows, "eval")
            runner.run(eps, lambda ep: engine, "eval")
            scored, failed = runner.score(eps, train=False)
        # a response the remote endpoint left unscored is left out, as a failed episode
        kept = [rec for _, rec in scored if not math.isnan(rec.score)]
        return {"records": [rec.__dict__ for rec in kept],
                "failed": len(failed) + len(scored) - len(kept)}

    def snapshot(self) -> list[dict]:
        """For a checkpoint: the producer finishes the batches it is making and pauses;
        the batches of the current epoch not yet trained come back (JSON-able) and the
        producer goes on."""
        with self.cond:
            self.paused = True
            while self.busy and not self.error:
                self.cond.wait(1.0)
            out = []
            for item in self.queue:  # every rank took the trained ones: the rest are ahead
                if isinstance(item, EpochEnd):
                    break
                out.append(_batch_to_json(item))
            self.paused = False
            self.cond.notify_all()
            return out

    def close(self) -> None:
        with self.cond:
            self.attempt += 1
            self.cond.notify_all()

    # ------------------------------------------------------------ the producer

    def _produce(self, attempt: int) -> None:
        """The dispatcher: for each next step, once the staleness bound lets its batch
        start, take its prompts (in step order) and hand them to a maker thread. Up to
        max_staleness + 1 batches are made at once: while one waits for its
        environments, another generates. Finished batches are queued in step order; an
        epoch ends once its makers are done."""
        stream = None
        try:
            epoch, read = self.stream_args
            stream = PromptStream(self.dataset, self.world, epoch, read,
                                  read_ahead=4 * self.micro * self.accum,
                                  shuffle_buffer=self.cfg.data.shuffle_buffer,
                                  seed=self.cfg.train.seed)
            k = self.r.max_staleness
            while True:
                with self.cond:
                    step = self.made + 1
                    need = max(0, step - 1 - k)
                    while attempt == self.attempt and (
                            self.paused or self.client.latest < need or step > self.total_steps
                            or self.sync_needed or self.busy > k):
                        self.cond.wait(1.0)
                    if attempt != self.attempt:
                        return
                first = self._take(stream, [self.micro * self.accum] * self.world)
                if not any(first[0]):  # not one usable prompt left: the epoch is over
                    with self.cond:
                        while attempt == self.attempt and self.busy:
                            self.cond.wait(1.0)
                        if attempt != self.attempt:
                            return
                        self.queue.append(EpochEnd(stream.epoch, [i for r in first[1] for i in r],
                                                   first[2]))
                        self.cond.notify_all()
                    if stream.epoch + 1 >= self.cfg.train.epochs:
                        return
                    stream.next_epoch()
                    continue
                with self.cond:
                    self.made += 1
                    self.busy += 1
                threading.Thread(target=self._maker, args=(attempt, stream, step, first),
                                 daemon=True).start()
        except Exception as e:  # noqa: BLE001 - the trainers raise it with this message
            self._failed(attempt, e)
        finally:
            if stream is not None:
                stream.close()

    def _maker(self, attempt: int, stream: PromptStream, step: int, first: tuple) -> None:
        batch = None
        try:
            batch = self._make_batch(stream, step, attempt, first)
        except Exception as e:  # noqa: BLE001 - the trainers raise it with this message
            self._failed(attempt, e)
        finally:
            with self.cond:
                if attempt == self.attempt:
                    self.busy -= 1
                    if batch is not None:
                        self.finished[step] = batch
                        while self.queued + 1 in self.finished:  # in step order
                            self.queued += 1
                            self.queue.append(self.finished.pop(self.queued))
                self.cond.notify_all()

    def _failed(self, attempt: int, e: Exception) -> None:
        import traceback

        traceback.print_exc()
        with self.cond:
            if attempt == self.attempt:
                self.error = f"{type(e).__name__}: {e}"
                self.cond.notify_all()

    def _take(self, stream: PromptStream, wants: list[int]) -> tuple:
        """([rows] per rank, [ids read] per rank, dropped counts): the next prompts of
        each rank's split (makers running at once take them one at a time)."""
        rows, ids, counts = [], [], Counter()
        with self.stream_lock:
            for rank, want in enumerate(wants):
                got, seen, dropped = stream.take(rank, want) if want > 0 else ([], [], {})
                rows.append(got)
                ids.append(seen)
                counts.update(dropped)
        return rows, ids, counts

    def _wait_for_sync(self, attempt: int) -> None:
        """Broadcast path, an engine restarted: ask the trainers to broadcast the weights
        again (next_step answers {"sync": n}) and wait until they have."""
        with self.cond:
            self.sync_needed += 1
            self.cond.notify_all()
            while attempt == self.attempt and self.sync_needed:
                self.cond.wait(1.0)

    def _make_batch(self, stream: PromptStream, step: int, attempt: int, first: tuple
                    ) -> Batch | None:
        """Batch `step` from `first` (each rank's prompts, taken in step order) and, for
        groups dropped on the way, the next prompts of the rank's split; None if this
        attempt was abandoned meanwhile."""
        n_ranks, slots = self.world, self.micro * self.accum
        t0 = time.perf_counter()
        accepted: list[list[list[RolloutRecord]]] = [[] for _ in range(n_ranks)]
        rows, ids, counts = first
        ids = [list(x) for x in ids]
        counts = Counter(counts)
        stats: Counter = Counter()
        runner = self.runner
        while True:
            eps = [ep for rank in range(n_ranks) for ep in runner.episodes(rank, rows[rank],
                                                                           step - 1)]
            if not eps:
                break
            t1 = time.perf_counter()
            env_s = stats["env_s"]
            runner.run(eps, lambda ep: ep.rank % len(self.client.engines), step - 1,
                       alive=lambda: attempt == self.attempt, before_round=self._newest_weights,
                       refresh=self.r.partial_rollouts,
                       wait_for_sync=lambda: self._wait_for_sync(attempt), stats=stats)
            stats["generate_s"] += time.perf_counter() - t1 - (stats["env_s"] - env_s)
            if attempt != self.attempt:
                return None
            scored, failed = runner.score(eps, train=True)
            for rank, group in runner.filter(scored, failed, counts, stats):
                accepted[rank].append(group)
            rows, more, dropped = self._take(stream, [slots - len(a) for a in accepted])
            ids = [a + b for a, b in zip(ids, more)]
            counts.update(dropped)
        micro_batches = [[[r for g in groups[j * self.micro:(j + 1) * self.micro] for r in g]
                          for j in range(self.accum)] for groups in accepted]
        stats["batch_s"] = time.perf_counter() - t0
        return Batch(step, stream.epoch, micro_batches, ids, counts, dict(stats))

    def _newest_weights(self) -> int:
        """Bring every engine to the newest published weights (at a batch's start and,
        for partial rollouts, between pieces); returns the oldest version they hold."""
        return min(self.client.bring_to(i, self.client.latest)
                   for i in range(len(self.client.engines)))

    # ------------------------------------------------------------ hand-out

    def _check_staleness(self, batch: Batch) -> None:
        """The guard: a group staler than rollout.max_staleness at its step is left out
        and counted (by construction none should be)."""
        version = batch.step - 1
        for rank, mbs in enumerate(batch.micro_batches):
            for j, mb in enumerate(mbs):
                keep, drop = split_stale(mb, version, self.r.max_staleness)
                if drop:
                    batch.counts[DROP_STALE] += len({r.group for r in drop})
                    mbs[j] = keep

    def _log(self, batch: Batch) -> None:
        recs = [r for mbs in batch.micro_batches for mb in mbs for r in mb]
        version = batch.step - 1
        line = {"step": batch.step, "epoch": batch.epoch, "attempt": self.attempt,
                "prompts": sorted({r.group for r in recs}), "samples": len(recs),
                "digest": digest(recs),
                "versions": sorted({v for r in recs for v in r.model_versions}),
                "staleness": {str(k): v for k, v in
                              sorted(staleness_counts(recs, version).items())},
                "partial": sum(r.partial for r in recs),
                "dropped": {k: v for k, v in batch.counts.items() if k.startswith("dropped")},
                **{k: round(v, 4) for k, v in batch.stats.items()}}
        with open(self.ledger_path, "a") as f:
            f.write(json.dumps(line) + "\n")


# ------------------------------------------------------------ checkpoint form


def _batch_to_json(b: Batch) -> dict:
    return {"step": b.step, "epoch": b.epoch, "ids": b.ids, "counts": dict(b.counts),
            "stats": b.stats,
            "micro_batches": [[[r.__dict__ for r in mb] for mb in mbs]
                              for mbs in b.micro_batches]}


def _batch_from_json(d: dict) -> Batch:
    return Batch(d["step"], d["epoch"],
                 [[[RolloutRecord(**r) for r in mb] for mb in mbs] for mbs in d["micro_batches"]],
                 d["ids"], Counter(d["counts"]), d.get("stats", {}))


def _rebalanced(b: Batch, world: int, micro: int, accum: int) -> Batch:
    """A saved batch for another number of training workers (an elastic restart): its
    prompt groups, in order, dealt out again as each rank's `accum` micro-batches of
    `micro` prompts; every prompt id it read is committed by rank 0."""
    if len(b.micro_batches) == world and all(len(m) == accum for m in b.micro_batches):
        return b
    groups: list[list[RolloutRecord]] = []
    for mbs in b.micro_batches:
        for mb in mbs:
            for r in mb:
                if groups and groups[-1][0].group == r.group:
                    groups[-1].append(r)
                else:
                    groups.append([r])
    per_rank = micro * accum
    ranks = [groups[i * per_rank:(i + 1) * per_rank] for i in range(world)]
    mbs = [[[r for g in rg[j * micro:(j + 1) * micro] for r in g] for j in range(accum)]
           for rg in ranks]
    ids = [[i for r in b.ids for i in r]] + [[] for _ in range(world - 1)]
    return Batch(b.step, b.epoch, mbs, ids, b.counts, b.stats)


def coordinator_actor(*args, **kwargs):
    """A RolloutCoordinator on the driver's node (which lives as long as the run),
    threaded so the trainers' calls are served while it produces; restarted by Ray if
    its process dies (the trainers' next call fails, Ray Train restores the last
    checkpoint, and `start` rebuilds the coordinator's state from it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ray.remote(RolloutCoordinator).options(
        num_cpus=0, max_concurrency=16, max_restarts=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(*args, **kwargs)
