"""The worker side of a dataset shard: steps of micro-batches in lock-step with the other
workers (every worker runs the same number of forward passes, so ZeRO-3's collectives
never wait on a worker that ran out of data), rows trained before a resume passed over,
dropped rows counted.

    feed = RowFeed(ray.train.get_dataset_shard("train"), micro=2, accum=4, flags={...})
    for micro_batches, ids, counts in feed.steps(epoch):
        ...                                    # train; then
        feed.commit(ids, counts)               # the step's rows join the saved position
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

from cluster.worker import all_sum


def _rows_collate():
    """Collate that keeps numpy rows as they are: variable-length token lists are padded
    per micro-batch by the task, after bad rows are counted and left out."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class KeepNumpy(NumpyBatchCollateFn):
        def __call__(self, batch):
            return batch

    return KeepNumpy()


# Boolean columns of tokenised pair rows counted by the feed, with their labels.


def take_rows(next_row, n: int, skip: set[int], flags: dict[str, str] | None = None
              ) -> tuple[list[dict], list[int], Counter, bool]:
    """Up to n usable rows from `next_row()` (None when exhausted): (rows, ids seen,
    counts of dropped rows and flags, exhausted). Rows whose id is in `skip` (trained
    before a resume) are passed over uncounted; rows with a drop reason are counted and
    left out; `flags` ({boolean column: label}) are counted where true."""
    rows, ids, counts = [], [], Counter()
    while len(rows) < n:
        row = next_row()
        if row is None:
            return rows, ids, counts, True
        rid = int(row["id"])
        if rid in skip:
            continue
        ids.append(rid)
        if row["drop"]:
            counts[f"dropped: {row['drop']}"] += 1
            continue
        for column, label in (flags or {}).items():
            counts[label] += int(bool(row[column]))
        rows.append(row)
    return rows, ids, counts, False


class RowFeed:
    """One worker's shard as steps of micro-batches, in lock-step with the others.

    Each step every worker gets exactly `accum` micro-batches; a worker that has run
    out gets empty ones (the caller runs a zero-weight dummy forward for those, which
    ZeRO-3 needs to take part in the parameter gathers). Rows whose id is in `skip`
    (trained before a resume) are passed over uncounted; rows with a drop reason are
    counted and left out; `flags` ({boolean column: label}) are counted where true.
    A step is "committed" by the caller after the optimizer step, which moves its ids
    into the consumed set saved with checkpoints.
    """

    def __init__(self, shard, micro: int, accum: int, skip: set[int] | None = None,
                 shuffle_buffer: int = 0, seed: int = 0,
                 flags: dict[str, str] | None = None):
        self.shard, self.micro, self.accum = shard, micro, accum
        self.flags = flags or {}
        self.skip = skip or set()
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.consumed: list[int] = []
        self.counts: Counter = Counter()

    def _rows(self, epoch: int) -> Iterator[dict]:
        kwargs: dict[str, Any] = {}
        if self.shuffle_buffer:
            kwargs = {"local_shuffle_buffer_size": self.shuffle_buffer,
                      "local_shuffle_seed": self.seed + epoch}
        for batch in self.shard.iter_torch_batches(batch_size=self.micro * 4,
                                                   collate_fn=_rows_collate(), **kwargs):
            for i in range(len(batch["id"])):
                yield {k: batch[k][i] for k in batch}

    def steps(self, epoch: int = 0) -> Iterator[tuple[list[list[dict]], list[int], Counter]]:
        """Yields (micro-batches, ids used, counts) until every worker is out of rows."""
        rows = self._rows(epoch)
        exhausted = False
        while True:
            micro_batches, ids, counts = [], [], Counter()
            for _ in range(self.accum):
                mb: list[dict] = []
                if not exhausted:
                    mb, seen, found, exhausted = take_rows(lambda: next(rows, None),
                                                           self.micro, self.skip, self.flags)
                    ids += seen
                    counts.update(found)
                micro_batches.append(mb)
            local = sum(len(mb) for mb in micro_batches)
            (total,) = all_sum([float(local)])
            if total == 0:
                # Rows dropped in this last look still count.
                self.commit(ids, counts)
                return
            yield micro_batches, ids, counts

    def commit(self, ids: list[int], counts: Counter) -> None:
        self.consumed.extend(ids)
        self.counts.update(counts)

    def eval_steps(self) -> Iterator[list[list[dict]]]:
        """Whole held-out shard, in lock-step; only the counts are recorded."""
        for micro_batches, _, counts in self.steps():
            self.counts.update(counts)
            yield micro_batches

