"""A reward model served by a pool of Ray actors: replicas on CPUs or GPUs, each request
cut into batches spread over the replicas, a replica that dies restarted by Ray (its
model reloaded) and its batch sent again, a batch that takes too long given up on that
replica (restarted) and sent again, and a clear error once the retries are spent. Every
batch's scores are taken exactly once: none lost, none counted twice.

    pool = start_reward_pool("runs/rm-.../model", replicas=2, num_gpus=0, timeout_s=60)
    scores = pool.score(prompts, responses)        # one float per response, in order
    pool.stats                                     # batches, retried, timeouts
    pool.close()

The pool object is a client: it holds the replicas' handles and pickles, so it can be
handed to the rollout coordinator (an actor), which scores samples when they are made.
Scoring is the exported model's own (cluster.scoring.RewardScorer: the tokenisation and
truncation training used, the head's output at the last token).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from cluster.judge_service import PairwiseJudge
from cluster.scoring import RewardScorer
from cluster.vllm_engines import ROLLOUT_LABEL
from rlhf.core.rewards import RewardError


class Replica:
    """What a served model's actor adds: its process id, for the pool's report."""

    def pid(self) -> int:
        return os.getpid()


class ServedScorer(RewardScorer, Replica):
    """A reward model's replica."""


class ServedJudge(PairwiseJudge, Replica):
    """A pairwise judge's replica (score(prompts, [(response, baseline)]))."""


class RewardPool:
    """Client of `replicas` actors (ServedScorer, or ServedJudge) serving the model
    `name`."""

    def __init__(self, name: str, replicas: list, batch_size: int, timeout_s: float,
                 retries: int):
        self.name, self.replicas = name, replicas
        self.batch_size, self.timeout_s, self.retries = batch_size, timeout_s, retries
        self.stats: Counter = Counter()

    def score(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[float]:
        """One float per (prompt, response), in the order given. Batches of batch_size
        go to the replicas in turn, all in flight at once."""
        import ray

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        batches = [(at, list(prompts[at:at + self.batch_size]),
                    list(responses[at:at + self.batch_size]))
                   for at in range(0, len(prompts), self.batch_size)]
        out: list[float] = [0.0] * len(prompts)
        pending: dict[Any, tuple[int, int, float]] = {}  # ref -> (batch, replica, try began)
        later: list[tuple[float, int, int, float]] = []  # (when, batch, replica, try began)
        tries = Counter()

        def send(b: int, replica: int, began: float | None = None) -> None:
            """A try of batch b begins now, unless `began` says it is one going on (a
            replica found restarting is asked again until it is back, within the
            timeout, without spending a retry)."""
            _, p, r = batches[b]
            ref = self.replicas[replica].score.remote(p, r)
            pending[ref] = (b, replica, began if began is not None else time.monotonic())

        for b in range(len(batches)):
            send(b, b % len(self.replicas))
        self.stats["requests"] += 1
        self.stats["batches"] += len(batches)
        while pending or later:
            if pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            else:
                ready = []
                time.sleep(0.5)
            now = time.monotonic()
            for item in [x for x in later if x[0] <= now]:
                later.remove(item)
                send(item[1], item[2], began=item[3])
            for ref in ready:
                b, replica, began = pending.pop(ref)
                try:
                    scores = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:
                    # restarting (reloading its model): asked again in 0.5 s while the
                    # try's timeout runs (then a retry, as for a replica that hangs)
                    if now - began > self.timeout_s:
                        self._retry(b, len(batches[b][1]), replica, tries,
                                    f"its replica not back in {self.timeout_s:g} s", send)
                    else:  # the next replica (with one: the same, once it is back)
                        later.append((now + 0.5, b, (replica + 1) % len(self.replicas),
                                      began))
                    continue
                except ray.exceptions.RayActorError as e:  # it died: the batch again
                    self._retry(b, len(batches[b][1]), replica, tries,
                                f"its replica died ({type(e).__name__})", send)
                    continue
                except ray.exceptions.RayTaskError as e:  # the scorer itself failed
                    raise RewardError(f"reward model {self.name}: {e.cause}") from None
                at = batches[b][0]
                out[at:at + len(scores)] = scores
            for ref, (b, replica, sent) in list(pending.items()):
                if now - sent > self.timeout_s:
                    pending.pop(ref)
                    self.stats["timeouts"] += 1
                    # a replica that hangs is restarted; its late answer is never read
                    ray.kill(self.replicas[replica], no_restart=False)
                    self._retry(b, len(batches[b][1]), replica, tries,
                                f"no answer in {self.timeout_s:g} s", send)
        return out

    def _retry(self, b: int, n: int, replica: int, tries: Counter, why: str, send) -> None:
        """Batch b (n samples) again, on the next replica first; RewardError once it has
        failed more than `retries` times."""
        tries[b] += 1
        if tries[b] > self.retries:
            raise RewardError(
                f"reward model {self.name}: a batch of {n} samples failed {tries[b]} times "
                f"({why}). Check the replicas' logs (Ray dashboard, or "
                "/tmp/ray/session_latest/logs); if the model is only slow, raise "
                "reward.timeout_s or give it more replicas or a GPU.")
        self.stats["retried"] += 1
        send(b, (replica + tries[b]) % len(self.replicas))

    def pids(self, timeout_s: float = 300.0) -> list[int]:
        """Each replica's process id, once every one is up (a restarting replica is
        waited for: it reloads its model); a RewardError after `timeout_s` (replicas
        the cluster has no room for would otherwise be waited for for ever)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get([r.pid.remote() for r in self.replicas],
                               timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            except ray.exceptions.GetTimeoutError:
                raise RewardError(
                    f"reward model {self.name}: its {len(self.replicas)} replica(s) were not "
                    f"up after {timeout_s:g} s. The cluster may have no room for them: lower "
                    "reward.replicas, reward.cpus_per_replica or reward.gpus_per_replica, "
                    "or add nodes.") from None

    def close(self) -> None:
        import ray

        for r in self.replicas:
            ray.kill(r, no_restart=True)


def start_reward_pool(path: str, *, replicas: int = 1, num_cpus: float = 1,
                      num_gpus: float = 0, dtype: str = "fp32", batch_size: int = 16,
                      timeout_s: float = 120.0, retries: int = 2,
                      separate: bool = False, actor: type = ServedScorer) -> RewardPool:
    """`replicas` actors each holding the reward model at `path` (a reward model, or with
    actor=ServedJudge a causal LM as a pairwise judge), up and loaded when this returns.
    Ray restarts a replica that dies (max_restarts=-1); the pool sends its batch again
    (at most `retries` times per batch). separate: only on nodes labelled for rollouts,
    beside the engines (rollout.placement=separate)."""
    import ray

    extra = {"label_selector": ROLLOUT_LABEL} if separate else {}
    cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1,
                     max_task_retries=0, **extra)(actor)
    handles = [cls.remote(path, dtype=dtype, batch_size=batch_size) for _ in range(replicas)]
    pool = RewardPool(path, handles, batch_size, timeout_s, retries)
    pool.pids()  # loaded (a bad path fails here, with the scorer's own message)
    return pool
