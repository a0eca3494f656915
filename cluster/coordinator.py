"""The rollout coordinator: a Ray actor the driver owns that runs online RL's data flow.

    prompts (Ray Data) -> engines (vLLM actors) -> episodes (environments, tools) ->
    rollout records (rlhf.rollouts) -> rewards -> filters -> a bounded queue of batches
    -> the Ray Train workers (rlhf.rl_task's feed), who send new weights back

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

Prompts: the train split is read through `streaming_split(world, equal=True)`, split
r feeding training rank r, exactly as Ray Train splits a dataset, so the step-by-step
batches are those the workers read themselves before this coordinator existed.

Episodes: a prompt's n samples start as one engine request (n samples from the
prompt's seed, as before); a multi-turn episode continues turn by turn (the
environment's observation appended token-in-token-out, rlhf.environments.ChatCodec);
a partial rollout piece by piece. All of a batch's live episodes go to the engines
together, one call per engine per round; environment steps run concurrently between
rounds, each under rollout.env_timeout_s.

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
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from cluster.engine_client import EngineClient, EngineNeedsSync
from cluster.train import take_rows
from rlhf.rollouts import OBSERVATION, RolloutRecord, digest, split_stale, staleness_counts

DROP_UNIFORM = "dropped: uniform rewards (algo.dynamic_sampling)"
DROP_STALE = "dropped: staler than rollout.max_staleness"


# ------------------------------------------------------------------------ the prompts


class PromptStream:
    """The train split as `world` streams, one per training rank (see the module
    docstring), each read ahead by a thread of its own; one epoch at a time."""

    def __init__(self, dataset, world: int, epoch: int, skip: set[int], read_ahead: int):
        self.world, self.epoch, self.skip = world, epoch, set(skip)
        self.closed = False
        self.splits = dataset.streaming_split(world, equal=True)
        self.read_ahead = read_ahead
        self.exhausted = [False] * world
        self._start()

    def _start(self) -> None:
        self.queues = [queue.Queue(maxsize=self.read_ahead) for _ in range(self.world)]
        self.exhausted = [False] * self.world
        for it, q in zip(self.splits, self.queues):
            threading.Thread(target=self._read, args=(it, q), daemon=True).start()

    def _read(self, it, q: queue.Queue) -> None:
        try:
            for batch in it.iter_batches(batch_size=64, batch_format="numpy"):
                for i in range(len(batch["id"])):
                    if not self._put(q, {k: batch[k][i] for k in batch}):
                        return
            self._put(q, None)
        except BaseException as e:  # noqa: BLE001 - raised where the rows are taken
            self._put(q, e)

    def _put(self, q: queue.Queue, item) -> bool:
        """Put, unless the stream is closed meanwhile (an abandoned attempt's reader
        must not wait for ever on a queue nobody reads)."""
        while not self.closed:
            try:
                q.put(item, timeout=1.0)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self.closed = True

    def next_row(self, rank: int):
        if self.exhausted[rank]:
            return None
        row = self.queues[rank].get()
        if isinstance(row, BaseException):
            raise row
        if row is None:
            self.exhausted[rank] = True
        return row

    def take(self, rank: int, n: int) -> tuple[list[dict], list[int], Counter]:
        rows, ids, counts, _ = take_rows(lambda: self.next_row(rank), n, self.skip)
        return rows, ids, counts

    @property
    def done(self) -> bool:
        return all(self.exhausted)

    def next_epoch(self) -> None:
        """Every split has been read to its end: start the next epoch (nothing skipped)."""
        self.epoch += 1
        self.skip = set()
        self._start()


# ------------------------------------------------------------------------ episodes


@dataclass
class Episode:
    """One sample in the making (a single turn, or a multi-turn episode)."""

    rank: int
    group: int
    sample: int
    prompt_ids: list[int]
    metadata: str
    env: Any = None
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    turn_start: int = 0
    turn_rewards: list[float] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)
    pieces: int = 0  # engine calls so far (seeds the next one)
    done: bool = False
    finish_reason: str = ""
    failure: Exception | None = None

    @property
    def turn_tokens(self) -> int:
        return len(self.response_ids) - self.turn_start


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
                 train_dataset, model_path: str, run_dir: str, total_steps: int):
        import os

        from cluster.models import load_tokenizer
        from rlhf.rewards import Rewards, function_source, reward_spec

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.cfg, self.r, self.a = cfg, cfg.rollout, cfg.algo
        self.client = EngineClient(engines, sync, weights_dir, store)
        self.tok = load_tokenizer(model_path)
        self.rewards = Rewards([function_source(*reward_spec(s)) for s in cfg.reward.functions])
        self.env_factory = None
        self.codec = None
        self.stop_ids = None  # the engines' default: the model's end-of-sequence tokens
        if self.r.environment:
            from rlhf.environments import load_environment

            self.env_factory = load_environment(self.r.environment, self.r.env_args)
            if self.r.max_turns > 1:
                from rlhf.environments import ChatCodec

                self.codec = ChatCodec(self.tok)
                self.stop_ids = self.codec.stop_ids
        self.dataset, self.total_steps = train_dataset, total_steps
        self.ledger_path = f"{run_dir}/rollouts.jsonl"
        self.cond = threading.Condition()
        self.engine_lock = threading.RLock()  # one round (or evaluation) at a time
        self.attempt = 0
        self.queue: deque = deque()
        self.error: str | None = None
        self.sync_needed = 0  # > 0: the broadcast path needs the trainers to re-sync
        self.busy = 0  # batches being made
        self.paused = False
        self.reward_lock = threading.Lock()  # reward functions need not be thread-safe

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
        with self.engine_lock:
            engine = rank % len(self.client.engines)
            self.client.bring_to(engine, version, exact=True)
            eps = self._episodes(rank, rows, "eval")
            self._run(eps, lambda ep: engine, "eval", None)
            scored, failed = self._score(eps, train=False)
        return {"records": [rec.__dict__ for _, rec in scored], "failed": len(failed)}

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
                                  read_ahead=4 * self.micro * self.accum)
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
        while True:
            eps = [ep for rank in range(n_ranks) for ep in self._episodes(rank, rows[rank],
                                                                          step - 1)]
            if not eps:
                break
            t1 = time.perf_counter()
            self._run(eps, lambda ep: ep.rank % len(self.client.engines), step - 1, attempt,
                      stats, refresh=self.r.partial_rollouts)
            stats["generate_s"] += time.perf_counter() - t1 - stats.pop("_env", 0.0)
            if attempt != self.attempt:
                return None
            scored, failed = self._score(eps, train=True)
            for rank, group in self._filter(scored, failed, counts, stats):
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

    def _episodes(self, rank: int, rows: list[dict], stage) -> list[Episode]:
        n = self.r.samples_per_prompt
        eps = []
        for row in rows:
            meta = str(row["metadata"])
            prompt = [int(t) for t in row["prompt_ids"]]
            for j in range(n):
                env = None
                if self.env_factory is not None:
                    env = self.env_factory()
                eps.append(Episode(rank, int(row["id"]), j, prompt, meta, env))
        if self.env_factory is not None:
            self._env_calls([(ep, lambda ep=ep: ep.env.reset(
                {"prompt": self.tok.decode(ep.prompt_ids), **json.loads(ep.metadata)}))
                for ep in eps])
        return eps

    # ------------------------------------------------------------ rounds

    def _run(self, eps: list[Episode], engine_of, stage, attempt: int | None,
             stats: Counter | None = None, refresh: bool = False) -> None:
        """Generate every episode to its end, a round at a time (one call per engine per
        round). The engines take the newest weights before the first round, and with
        `refresh` (partial rollouts) before every round."""
        first = True
        while True:
            live = [ep for ep in eps if not ep.done and ep.failure is None]
            if not live:
                return
            if attempt is not None and attempt != self.attempt:
                return
            try:
                with self.engine_lock:
                    if attempt is not None and (first or refresh):
                        self._newest_weights()
                    first = False
                    outs = self._generate_all(self._requests(live, engine_of, stage))
            except EngineNeedsSync:
                if attempt is None:  # an evaluation: the step fails, Ray Train resumes
                    raise
                self._wait_for_sync(attempt)  # then the same round again
                continue
            ended: list[Episode] = []
            for members, samples in outs:
                for ep, s in zip(members, samples):
                    ep.pieces += 1
                    ep.response_ids += s["token_ids"]
                    ep.logprobs += s["logprobs"]
                    ep.versions += [s["version"]] * len(s["token_ids"])
                    ep.loss_mask += [1] * len(s["token_ids"])
                    if self._turn_over(ep, s):
                        ended.append(ep)
            if self.env_factory is None:
                for ep in ended:
                    ep.done, ep.finish_reason = True, ep.finish_reason or "stop"
            else:
                t0 = time.perf_counter()
                self._env_steps(ended)
                if stats is not None:
                    stats["env_s"] += time.perf_counter() - t0
                    stats["_env"] += time.perf_counter() - t0

    def _requests(self, live: list[Episode], engine_of, stage) -> dict[int, list]:
        """This round's requests per engine: [(episodes, request)]. A prompt's samples
        that all start from the prompt go as one request of n samples from the prompt's
        seed (vLLM draws them from seed + 0..n-1), as rlhf.ppo always sampled; a sample
        that goes on (its next piece or turn) as a request of its own."""
        from cluster.rollout import sample_seed

        n, seed = self.r.samples_per_prompt, self.cfg.train.seed
        requests: dict[int, list[tuple[list[Episode], dict]]] = {}
        fresh: dict[tuple, list[Episode]] = {}
        for ep in live:
            if ep.pieces == 0:
                fresh.setdefault((ep.rank, ep.group), []).append(ep)
            else:
                requests.setdefault(engine_of(ep), []).append(([ep], self._request(
                    ep, 1, sample_seed(seed, f"{stage}/{ep.sample}/{ep.pieces}", ep.group, 1))))
        for (_, group), members in fresh.items():
            if len(members) == n:
                requests.setdefault(engine_of(members[0]), []).append(
                    (members, self._request(members[0], n, sample_seed(seed, stage, group, n))))
            else:
                for ep in members:
                    requests.setdefault(engine_of(ep), []).append(([ep], self._request(
                        ep, 1, sample_seed(seed, f"{stage}/{ep.sample}/0", ep.group, 1))))
        return requests

    def _request(self, ep: Episode, n: int, seed: int) -> dict:
        r = self.r
        left = r.max_new_tokens - ep.turn_tokens
        if r.partial_rollouts:
            left = min(left, r.chunk_tokens)
        return {"prompt_ids": ep.prompt_ids + ep.response_ids, "n": n, "max_tokens": left,
                "seed": seed, "stop_token_ids": self.stop_ids}

    def _turn_over(self, ep: Episode, s: dict) -> bool:
        """Whether the model's turn ended with this piece (a stop token, or its token
        budget); a piece cut by rollout.chunk_tokens goes on in the next round."""
        if s["finish_reason"] == "stop":
            return True
        if ep.turn_tokens >= self.r.max_new_tokens:
            ep.finish_reason = "length"
            return True
        return not self.r.partial_rollouts

    def _generate_all(self, requests: dict[int, list]) -> list:
        """One call per engine, all at once; [(members, samples per member)]."""
        results: dict[int, Any] = {}

        def call(i: int, reqs: list) -> None:
            try:
                results[i] = self.client.generate(
                    i, [q for _, q in reqs], temperature=self.r.temperature, top_p=self.r.top_p)
            except BaseException as e:  # noqa: BLE001 - raised below, in this thread
                results[i] = e

        threads = [threading.Thread(target=call, args=(i, reqs), daemon=True)
                   for i, reqs in requests.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out = []
        for i, reqs in requests.items():
            if isinstance(results[i], BaseException):
                raise results[i]
            for (members, _), samples in zip(reqs, results[i]):
                out.append((members, samples))
        return out

    # ------------------------------------------------------------ environments

    def _env_calls(self, calls: list[tuple[Episode, Any]]) -> list:
        from rlhf.environments import call_all

        res = call_all([(ep.env.name, fn) for ep, fn in calls], self.r.env_timeout_s)
        for (ep, _), (ok, value) in zip(calls, res):
            if not ok:
                self._env_failed(ep, value)
        return res

    def _env_failed(self, ep: Episode, failure: Exception) -> None:
        if self.r.env_errors == "stop":
            raise RuntimeError(f"{failure} (prompt {ep.group}, sample {ep.sample}, turn "
                               f"{len(ep.turn_ends) + 1}); rollout.env_errors=skip drops "
                               "such episodes (counted) instead of stopping") from failure
        ep.failure, ep.done = failure, True

    def _env_steps(self, ended: list[Episode]) -> None:
        """The environment's answer to each model turn that just ended: its reward, and
        either the end of the episode or the observation, appended token-in-token-out."""
        from rlhf.environments import checked_step

        if not ended:
            return
        calls = [(ep, lambda ep=ep: checked_step(ep.env.name, ep.env.step(self.tok.decode(
            ep.response_ids[ep.turn_start:], skip_special_tokens=True)))) for ep in ended]
        for (ep, _), (ok, step) in zip(calls, self._env_calls(calls)):
            if not ok:
                continue
            ep.turn_rewards.append(step.reward)
            ep.turn_ends.append(len(ep.response_ids) - 1)
            turns = len(ep.turn_ends)
            if step.done or ep.finish_reason == "length" and self.codec is None:
                ep.done = True
                ep.finish_reason = ep.finish_reason or "done"
                continue
            if turns >= self.r.max_turns:
                ep.done, ep.finish_reason = True, "max_turns"
                continue
            obs = self._observation(ep, step)
            ep.response_ids += obs
            ep.logprobs += [0.0] * len(obs)
            ep.versions += [OBSERVATION] * len(obs)
            ep.loss_mask += [0] * len(obs)
            ep.turn_start = len(ep.response_ids)
            ep.finish_reason = ""

    def _observation(self, ep: Episode, step) -> list[int]:
        """The observation's tokens, its content cut to rollout.max_observation_tokens."""
        turn = ep.response_ids[ep.turn_start:]
        content = step.observation
        ids = self.tok(content, add_special_tokens=False)["input_ids"]
        if len(ids) > self.r.max_observation_tokens:
            content = self.tok.decode(ids[:self.r.max_observation_tokens])
        return self.codec.observation_ids(turn, step.role, content)

    # ------------------------------------------------------------ rewards and filters

    def _score(self, eps: list[Episode], train: bool
               ) -> tuple[list[tuple[Episode, RolloutRecord]], list[Episode]]:
        """([(episode, record)] of the finished episodes, [failed episodes]), with the
        rollout-side reward: the functions' weighted sum, then the environment's turn
        rewards, then length shaping (training only)."""
        from rlhf.advantages import overlong_penalty

        good = [ep for ep in eps if ep.failure is None]
        texts = [self.tok.decode(ep.prompt_ids) for ep in good]
        resp = [self.tok.decode(ep.response_ids, skip_special_tokens=True) for ep in good]
        meta = [json.loads(ep.metadata) for ep in good]
        with self.reward_lock:
            total, parts = self.rewards(texts, resp, meta)
        recs = []
        a = self.a
        for i, ep in enumerate(good):
            score = total[i] + sum(ep.turn_rewards) if ep.turn_rewards else total[i]
            p = {name: parts[name][i] for name in parts}
            if self.env_factory is not None:
                p["environment"] = sum(ep.turn_rewards)
            mask = list(ep.loss_mask)
            if train and ep.finish_reason == "length" and a.overlong == "filter":
                mask = [0] * len(mask)
            if train and a.overlong == "penalty":
                import torch

                pen = float(overlong_penalty(torch.tensor([sum(ep.loss_mask)]),
                                             self.r.max_new_tokens * self.r.max_turns,
                                             a.overlong_buffer, a.overlong_penalty)[0])
                score += pen
                p["overlong"] = pen
            recs.append(RolloutRecord(
                group=ep.group, sample=ep.sample, prompt_ids=ep.prompt_ids,
                response_ids=ep.response_ids, logprobs=ep.logprobs, versions=ep.versions,
                loss_mask=mask, score=score, parts=p, turn_rewards=ep.turn_rewards,
                turn_ends=ep.turn_ends, finish_reason=ep.finish_reason or "stop",
                tool_calls=getattr(ep.env, "calls", 0) if ep.env is not None else 0,
                metadata=ep.metadata))
        return list(zip(good, recs)), [ep for ep in eps if ep.failure is not None]

    def _filter(self, scored: list[tuple[Episode, RolloutRecord]], failed: list[Episode],
                counts: Counter, stats: Counter) -> list[tuple[int, list[RolloutRecord]]]:
        """[(rank, the group's records)] of the groups kept, in the order their prompts
        were read; the others counted as dropped: a group with a failed episode
        (rollout.env_errors=skip) and, with algo.dynamic_sampling, one whose rewards
        are all equal."""
        import torch

        from rlhf.advantages import uniform_groups

        groups: dict[tuple[int, int], list[RolloutRecord]] = {}
        for ep, rec in scored:
            groups.setdefault((ep.rank, ep.group), []).append(rec)
        failures = {}
        for ep in failed:
            failures.setdefault((ep.rank, ep.group), ep.failure)
            groups.setdefault((ep.rank, ep.group), [])
        out = []
        for key, group in groups.items():
            if key in failures:
                f = failures[key]
                counts[f"dropped: environment {f.env} {f.kind}"] += 1
                stats["env_failures"] += 1
                continue
            if self.a.dynamic_sampling and bool(uniform_groups(
                    torch.tensor([x.score for x in group]), len(group))[0]):
                counts[DROP_UNIFORM] += 1
                continue
            out.append((key[0], sorted(group, key=lambda x: x.sample)))
        return out

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
