"""What a Ray Train worker process has besides its model: its rank, collectives over the
training group (sums and maxima of metric vectors, gathered objects), quiet framework
logs, a timer of a step's phases, and `say`, the one way a Ray worker or actor puts a line
on the user's terminal.

    rank, world = rank_world()
    (pairs,) = all_sum([float(len(rows))])     # every worker must call, in the same order
    timer = StepTimer(cuda=False); ...; timer.mark("forward")
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

# Marks a worker's line for the user's terminal: the driver shows lines so marked and
# sends everything else Ray's workers print (vLLM, DeepSpeed, Ray Data) to the run's log
# (rlhf.runlog.console.route_worker_output).
SAY = "[rlhf] "


def say(text: str, err: bool = False) -> None:
    """Print `text` from a Ray worker or actor for the user's terminal (stderr with err)."""
    for line in str(text).splitlines() or [""]:
        print(SAY + line, file=sys.stderr if err else sys.stdout, flush=True)


def quiet_worker_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO; DeepSpeed logs its config."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # these two loggers are named after their file, not their module
        from ray.train.v2._internal.execution import context, storage

        for mod in (context, storage):
            logging.getLogger(mod.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: list[float]) -> list[float]:
    """Sum a vector of floats over all workers (float64, so counts stay exact)."""
    return _all_reduce(values, "sum")


def all_max(values: list[float]) -> list[float]:
    """The largest of each float over all workers."""
    return _all_reduce(values, "max")


def _all_reduce(values: list[float], op: str) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class StepTimer:
    """Seconds per phase of a training step, for the metrics: where a step's time goes.

    `mark(phase)` books the time since the previous mark to `phase`. On a GPU each mark
    synchronises first, so a phase holds its kernels' time, not just their launches.
    """

    def __init__(self, cuda: bool):
        import torch

        self._sync = torch.cuda.synchronize if cuda else None
        self.reset()

    def reset(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self._sync is not None:
            self._sync()
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - self._last
        self._last = now



def add_sums(into: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    """Sums `more` into `into`; keys named "max:..." keep the larger value instead."""
    for k, v in more.items():
        into[k] = max(into.get(k, v), v) if k.startswith("max:") else into.get(k, 0.0) + v
    return into


def all_reduce_sums(d: dict[str, float]) -> dict[str, float]:
    """Every value summed over the workers ("max:..." keys: the largest); every worker
    must hold the same keys."""
    keys = sorted(k for k in d if not k.startswith("max:"))
    out = dict(zip(keys, all_sum([float(d[k]) for k in keys])))
    maxes = sorted(k for k in d if k.startswith("max:"))
    if maxes:
        out.update(zip(maxes, all_max([float(d[k]) for k in maxes])))
    return out
