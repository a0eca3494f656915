"""The training workers' side of the rollout coordinator (rlhf/online/coordinator.py): its
batches as rlhf.train.loop's feed, what cluster.feed.RowFeed is for rows of a shard."""

from __future__ import annotations

import time
from collections import Counter

from rlhf.core.rollouts import RolloutRecord


class RolloutFeed:
    """The coordinator's batches as rlhf.train.loop's feed (what RowFeed is for rows): steps
    of this rank's micro-batches of records, until the coordinator ends the epoch."""

    def __init__(self, task, skip: set[int] | None):
        """task: rlhf.online.task.RLTask (its coordinator handle, rank, the next item to take,
        `attach` once per attempt, `resync` on the broadcast path)."""
        self.task, self.skip = task, skip
        self.consumed: list[int] = []
        self.counts: Counter = Counter()

    def steps(self, epoch: int = 0):
        import ray

        task = self.task
        task.attach(epoch, self.skip)
        while True:
            t0 = time.perf_counter()
            while True:
                got = ray.get(task.coordinator.next_step.remote(task.rank, task.item))
                if "error" in got:
                    raise RuntimeError(f"rollouts failed: {got['error']}")
                if "sync" in got:
                    task.resync(got["sync"])
                    continue
                if "wait" not in got:
                    break
            task.item += 1
            task.wait_s = time.perf_counter() - t0
            if got.get("epoch_end"):
                self.commit(got["ids"], Counter(got["counts"]))
                return
            task.batch_stats = got["stats"]
            mbs = [[_record(r) for r in mb] for mb in got["micro_batches"]]
            yield mbs, got["ids"], Counter(got["counts"])

    def commit(self, ids: list[int], counts: Counter) -> None:
        self.consumed.extend(ids)
        self.counts.update(counts)


def _record(r):
    return r if isinstance(r, RolloutRecord) else RolloutRecord(**r)
