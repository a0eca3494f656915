"""The train split of online RL's prompts as one stream per training rank, read by the
rollout coordinator (rlhf/online/coordinator.py).

`Dataset.streaming_split(world, equal=True)`, split r feeding rank r, exactly as Ray Train
splits a dataset for its workers: each step's prompts are those the workers would read
from their own shards (what rlhf.ppo did before the coordinator existed), and an elastic
restart at another world size re-splits, passing over the prompts already trained.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter

from cluster.feed import take_rows


class PromptStream:
    """The train split as `world` streams, one per training rank (see the module
    docstring), each read ahead by a thread of its own; one epoch at a time."""

    def __init__(self, dataset, world: int, epoch: int, skip: set[int], read_ahead: int,
                 shuffle_buffer: int = 0, seed: int = 0):
        self.world, self.epoch, self.skip = world, epoch, set(skip)
        # data.shuffle_buffer and train.seed: each epoch's prompts in an order of its own
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.closed = False
        self.splits = dataset.streaming_split(world, equal=True)
        self.read_ahead = read_ahead
        self.exhausted = [False] * world
        self._start()

    def _start(self) -> None:
        self.queues = [queue.Queue(maxsize=self.read_ahead) for _ in range(self.world)]
        self.exhausted = [False] * self.world
        for it, q in zip(self.splits, self.queues):
            threading.Thread(target=self._read, args=(it, q, self.epoch), daemon=True).start()

    def _read(self, it, q: queue.Queue, epoch: int) -> None:
        shuffle = ({"local_shuffle_buffer_size": self.shuffle_buffer,
                    "local_shuffle_seed": self.seed + epoch} if self.shuffle_buffer else {})
        try:
            for batch in it.iter_batches(batch_size=64, batch_format="numpy", **shuffle):
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
