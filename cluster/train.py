"""Ray Train plumbing shared by the training entry points.

Driver side: start or join Ray, build the TorchTrainer (scaling, failure, storage,
an uneven data split), and a run-log actor that writes metrics where the driver is.
Worker side: a synchronised feed of micro-batches (every worker runs the same number of
forward passes, so ZeRO-3 collectives never wait on a worker that ran out of data),
all-reduced metric sums, checkpoints with the data position, and weight gathering for
export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# --------------------------------------------------------------------------- driver


def quiet_ray_data() -> None:
    """Ray Data's per-dataset progress logs drown the training progress line."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from cluster.console import divert_errors_to

    divert_errors_to()  # a failed task's traceback goes to the run's errors.log


def connect(cluster_cfg: Any, extra_cpus: float = 0.0) -> None:
    """Join the configured Ray cluster, or start a local one sized for this job.

    A local Ray gets CPUs for the workers plus `data_cpus` for the Ray Data pipeline:
    with exactly the workers' CPUs the pipeline never gets a CPU and training waits
    forever (ENVIRONMENT.md).
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return
    address = cluster_cfg.address or os.environ.get("RAY_ADDRESS")
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1"}
    if os.environ.get("RLHF_CACHE"):
        env_vars["RLHF_CACHE"] = os.environ["RLHF_CACHE"]
    env = {"env_vars": env_vars}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    need = (cluster_cfg.worker_range[1] * cluster_cfg.cpus_per_worker + cluster_cfg.data_cpus
            + extra_cpus)
    # address="local": a new cluster of our own, even when another one (e.g. from
    # `ray start`) runs on this machine; joining it is what cluster.address is for.
    ray.init(address="local", num_cpus=max(int(math.ceil(need)), os.cpu_count() or 1),
             runtime_env=env, log_to_driver=True)


def check_resources(cluster_cfg: Any) -> None:
    """Fail early, with numbers, when the cluster can never host the workers."""
    import ray

    total = ray.cluster_resources()
    workers = cluster_cfg.worker_range[0]  # an elastic run starts with its minimum
    need_cpu = workers * cluster_cfg.cpus_per_worker
    need_gpu = workers if cluster_cfg.use_gpu else 0
    autoscaling = bool(os.environ.get("RAY_ADDRESS") or cluster_cfg.address)
    if autoscaling:
        return  # an autoscaler may add nodes; Ray Train waits for them
    if total.get("CPU", 0) < need_cpu + 1 or total.get("GPU", 0) < need_gpu:
        raise RuntimeError(
            f"The local Ray cluster has {total.get('CPU', 0):g} CPUs and "
            f"{total.get('GPU', 0):g} GPUs; {workers} workers need "
            f"{need_cpu:g} CPUs (+1 for the data pipeline) and {need_gpu} GPUs. Lower "
            "cluster.num_workers or cluster.cpus_per_worker.")


def make_trainer(loop, loop_config: dict, cluster_cfg: Any, datasets: dict, *, name: str,
                 storage_path: str, keep_checkpoints: int, label_selector: dict | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cluster_cfg.cpus_per_worker}
    if cluster_cfg.use_gpu:
        resources["GPU"] = 1
    filesystem = None
    if "://" in storage_path:
        # Object storage (s3://, gs://): the driver resolves the filesystem, endpoint and
        # credentials from its environment, and Ray Train ships it to the controller and
        # workers (a path alone would be resolved there, from a Ray cluster's own env).
        from rlhf.data.readers import object_store

        filesystem, storage_path = object_store(storage_path)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        # A range makes Ray Train elastic: it asks for max, starts with what is there
        # (>= min), and restarts the group at another size from the latest checkpoint
        # when nodes come or go (cluster.loop reloads it at the new world size).
        scaling_config=ScalingConfig(
            num_workers=(cluster_cfg.worker_range if cluster_cfg.elastic
                         else cluster_cfg.worker_range[0]),
            use_gpu=cluster_cfg.use_gpu, resources_per_worker=resources,
            elastic_resize_monitor_interval_s=cluster_cfg.resize_check_s,
            label_selector=label_selector),
        # A lost peer must surface as an error naming it, not a silent hang.
        torch_config=TorchConfig(timeout_s=1800),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cluster_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, keep_checkpoints)),
            worker_runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}),
        # Ray's default split (equal=True) gives every worker the same number of rows,
        # leaving out at most num_workers - 1 at the end of an epoch (reported in the
        # summary); an uneven split starves workers when the data has few blocks.
        datasets=datasets,
    )


def root_cause(exc: BaseException) -> BaseException:
    """The innermost user-facing error of a failed Ray Train run."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = None
        for attr in ("worker_failures", "errors"):
            group = getattr(exc, attr, None)
            if isinstance(group, dict) and group:
                nxt = next(iter(group.values()))
                break
        nxt = nxt or getattr(exc, "cause", None) or exc.__cause__
        if nxt is None:
            break
        exc = nxt
    return exc


class RunLog:
    """Ray actor (on the driver's node) that writes metrics.jsonl into the run
    directory, hands every record to the trackers of output.report_to
    (cluster.trackers: TensorBoard events in the run directory, W&B, MLflow) and prints
    the progress line."""

    def __init__(self, run_dir: str, total_steps: int, unit: str = "pairs",
                 env: dict[str, str] | None = None):
        self.run_dir = Path(run_dir)
        self.unit = unit  # what a row is called: pairs, examples
        self.metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.total = total_steps
        self.t0 = time.time()
        self.first_step: int | None = None
        self.trackers = None
        self.status: dict | None = None
        os.environ.update(env or {})  # the launching process's WANDB_*, MLFLOW_*

    def start_trackers(self, report_to: list[str], config: dict) -> None:
        from cluster.trackers import Trackers

        self.trackers = Trackers(report_to, self.run_dir, self.run_dir.name, config)

    def log(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.trackers is not None:
            self.trackers.log(record)
        if "train/loss" in record:
            if self.first_step is None:
                self.first_step, self.t0 = step, time.time()
            done = step - self.first_step
            eta = (time.time() - self.t0) / done * (self.total - step) if done else float("nan")
            print(f"step {step}/{self.total}  {_brief(record, 'train')}  "
                  f"lr {record['train/learning_rate']:.2e}  "
                  f"{record['train/tokens_per_s']:.0f} tok/s  ETA {_hms(eta)}", flush=True)
        if any(k.startswith("eval/") for k in record):
            print(f"eval @ step {step}: {_brief(record, 'eval')}  "
                  f"({record.get(f'eval/{self.unit}', 0)} {self.unit})", flush=True)

    def set_summary(self, summary: dict) -> None:
        self._summary = summary

    def summary(self) -> dict:
        return dict(getattr(self, "_summary", {}))

    def close(self, summary: dict | None = None) -> dict:
        """The trackers get the final summary (None: the run failed) and end their runs;
        metrics.jsonl is closed. Returns each tracker's status (summary.json: trackers).
        A second call returns the first one's status."""
        if self.status is None:
            self.status = self.trackers.finish(summary) if self.trackers is not None else {}
            self.metrics.close()
        return self.status


def _brief(record: dict, split: str) -> str:
    """loss, and accuracy, reward and margin where the entry point logs them."""
    parts = []
    for label, keys, fmt in (("loss", ("loss",), ".4f"),
                             ("acc", ("rewards/accuracy", "accuracy"), ".3f"),
                             ("reward", ("reward",), ".3f"),
                             ("margin", ("rewards/margin",), "+.4f")):
        for k in keys:
            if f"{split}/{k}" in record:
                parts.append(f"{label} {record[f'{split}/{k}']:{fmt}}")
                break
    return "  ".join(parts)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def start_run_log(run_dir: Path, total_steps: int, unit: str = "pairs",
                  report_to: tuple[str, ...] | list[str] = ("tensorboard",),
                  config: dict | None = None):
    """The run log actor with its trackers started (given `config`, redacted there);
    a tracker that cannot start is a ConfigError, before training starts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster.trackers import tracker_env
    from rlhf.config import ConfigError

    here = ray.get_runtime_context().get_node_id()
    # The environment goes as an argument, not as the actor's runtime_env: Ray keeps
    # and logs a runtime_env, and it may hold credentials (WANDB_API_KEY, ...).
    actor = ray.remote(num_cpus=0)(RunLog).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(str(run_dir), total_steps, unit, tracker_env())
    try:
        ray.get(actor.start_trackers.remote(list(report_to), config or {}))
    except ray.exceptions.RayTaskError as e:
        ray.kill(actor)
        raise ConfigError(f"output.report_to: {root_cause(e)}") from None
    return actor


def close_run_log(run_log, summary: dict | None = None, timeout_s: float = 120) -> dict:
    """End the run log (its trackers get `summary`; None: the run failed) and the actor;
    returns the trackers' status. Never raises: the run's own outcome stands."""
    import ray

    from cluster.trackers import redact_text

    try:
        return ray.get(run_log.close.remote(summary), timeout=timeout_s)
    except Exception as e:  # noqa: BLE001
        print(f"warning: the run log did not close cleanly: "
              f"{redact_text(f'{type(e).__name__}: {e}')[:300]}", file=sys.stderr, flush=True)
        return {}
    finally:
        try:
            ray.kill(run_log)
        except Exception:  # noqa: BLE001 -- already gone
            pass


# --------------------------------------------------------------------------- worker


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


def _rows_collate():
    """Collate that keeps numpy rows as they are: variable-length token lists are padded
    per micro-batch by the entry point, after bad rows are counted and left out."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class KeepNumpy(NumpyBatchCollateFn):
        def __call__(self, batch):
            return batch

    return KeepNumpy()


# Boolean columns of tokenised pair rows counted by the feed, with their labels.
PAIR_FLAGS = {"prompt_truncated": "prompt truncated", "response_truncated": "response truncated"}


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
        self.flags = PAIR_FLAGS if flags is None else flags
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


# ---------------------------------------------------------------------- checkpoints


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


def save_checkpoint(engine, worker_state: dict, metrics: dict, step: int,
                    extra=None) -> None:
    """Every rank: DeepSpeed's sharded state + this rank's data position -> Ray Train.

    Ray Train merges the ranks' folders into one checkpoint. `extra(folder)` may add
    files (the final export).
    """
    import tempfile

    import ray.train

    rank, _ = rank_world()
    with tempfile.TemporaryDirectory(prefix="rlhf-ckpt-") as tmp:
        # Frozen weights (a LoRA base) are reloaded from the model path, not saved.
        engine.save_checkpoint(tmp, tag="deepspeed", exclude_frozen_parameters=True)
        if extra is not None:
            extra(Path(tmp))
        state = dict(worker_state)
        consumed = np.asarray(state.pop("consumed"), dtype=np.int64)
        np.save(Path(tmp) / f"consumed_rank{rank}.npy", consumed)
        (Path(tmp) / f"state_rank{rank}.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{step:07d}")


def saved_world_size(path: str) -> int:
    """How many workers saved the checkpoint at `path` (one state file each)."""
    return len(list(Path(path).glob("state_rank*.json")))


def load_engine_state(engine, path: str, tag: str, universal: bool = False) -> None:
    """engine.load_checkpoint(path, tag), or, when the checkpoint was saved by another
    number of workers (an elastic resize), through DeepSpeed's universal checkpoint: ZeRO
    partitions optimizer states (and, at stage 3, weights) by world size, so the saved
    shards are first merged per parameter (deepspeed.checkpoint.ds_to_universal), once
    per node, and the engine (built with checkpoint.load_universal) re-partitions them
    for its own world. Stage 0 keeps whole states and loads at any size as it is."""
    if not universal:
        _load(engine, path, tag)
        return
    import hashlib
    import shutil
    import subprocess
    import sys
    import tempfile

    import ray

    key = hashlib.sha1(f"{Path(path).resolve()}/{tag}".encode()).hexdigest()[:16]
    # The first rank on each Ray node converts. Not "local rank 0": Ray Train numbers
    # local ranks per IP, and nodes may share one (and /tmp) on a test machine.
    node = ray.get_runtime_context().get_node_id()
    converts = all_gather_objects(node).index(node) == rank_world()[0]
    root = Path(tempfile.gettempdir()) / "rlhf-universal" / f"{key}-{node[:12]}"
    out = root / f"{tag}_universal"
    if converts and not out.is_dir():
        tmp = root / f"{tag}_converting"
        shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted conversion left
        t0 = time.time()
        procs = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
        done = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
             "--input_folder", str(Path(path) / tag), "--output_folder", str(tmp),
             "--inject_missing_state", "--num_extract_workers", procs,
             "--num_merge_workers", procs], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"converting checkpoint {path}/{tag} for a new number of workers failed "
                f"(deepspeed.checkpoint.ds_to_universal):\n{done.stdout[-2000:]}"
                f"{done.stderr[-2000:]}")
        tmp.rename(out)
        print(f"checkpoint {tag} re-sharded for {rank_world()[1]} workers in "
              f"{time.time() - t0:.0f} s", flush=True)
    all_sum([0.0])  # a barrier: every node's copy is ready
    _load(engine, str(root), out.name)
    all_sum([0.0])  # every rank has read it: the copy (a whole model's states) can go
    if converts:
        shutil.rmtree(root, ignore_errors=True)


def _load(engine, path: str, tag: str) -> None:
    """engine.load_checkpoint, failing where DeepSpeed would only warn (a missing folder
    makes it skip the load and return None)."""
    load_path, _ = engine.load_checkpoint(path, tag=tag, load_module_strict=False)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {path}")


def load_checkpoint(engine, path: str, universal: bool = False) -> dict:
    """Restore engine state (see load_engine_state); return {"consumed": set of ids,
    "states": [per-rank dicts]}."""
    load_engine_state(engine, path, "deepspeed", universal)
    root = Path(path)
    consumed: set[int] = set()
    for f in sorted(root.glob("consumed_rank*.npy")):
        consumed.update(int(x) for x in np.load(f))
    states = [json.loads(f.read_text()) for f in sorted(root.glob("state_rank*.json"))]
    return {"consumed": consumed, "states": states}


def iter_state_dict(engine, zero_stage: int):
    """(name, full tensor on CPU) for every weight of the engine's module, on rank 0;
    (name, None) on the other ranks, which must iterate too (under ZeRO-3 each parameter
    is gathered by all ranks together, one at a time, so no rank ever holds more than one
    unsharded parameter beyond what it already has)."""
    rank, _ = rank_world()
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name, (p.data.detach().cpu().clone() if rank == 0 else None)
        keys = module.state_dict().keys()
        for name, b in module.named_buffers():
            if name in keys:
                yield name, (b.detach().cpu().clone() if rank == 0 else None)
    elif rank == 0:
        for k, v in module.state_dict().items():
            yield k, v.detach().cpu().clone()


def gather_state_dict(engine, zero_stage: int) -> dict | None:
    """Full weights of the engine's module on rank 0's CPU (None on other ranks); see
    `iter_state_dict`."""
    rank, _ = rank_world()
    out = dict(iter_state_dict(engine, zero_stage))
    return out if rank == 0 else None


# --------------------------------------------------------------------------- driver


class TrainingError(RuntimeError):
    """Training failed in a worker; the message is the worker's error."""


def make_run_dir(output_cfg: Any, resume: bool, prefix: str) -> Path:
    """The run directory: output.dir/output.name, or a new `{prefix}-<time>`; with resume,
    the named run or the newest `{prefix}-*` run holding a config.yaml. Ray's error logs
    go to its errors.log from here on (cluster.console)."""
    from cluster.console import LOG_NAME, divert_errors_to

    run = _run_dir(output_cfg, resume, prefix)
    divert_errors_to(run / LOG_NAME)
    return run


def _run_dir(output_cfg: Any, resume: bool, prefix: str) -> Path:
    from datetime import datetime

    from rlhf.config import ConfigError

    root = Path(output_cfg.dir).expanduser().resolve()
    if resume:
        if output_cfg.name:
            run = root / output_cfg.name
        else:
            runs = sorted((p for p in root.glob(f"{prefix}-*") if (p / "config.yaml").is_file()),
                          key=lambda p: p.stat().st_mtime)
            if not runs:
                raise ConfigError(f"train.resume=true but {root} holds no earlier {prefix} "
                                  "run; set output.name to the run to continue.")
            run = runs[-1]
        if not run.is_dir():
            raise ConfigError(f"train.resume=true but {run} does not exist.")
        return run
    run = root / (output_cfg.name or datetime.now().strftime(f"{prefix}-%Y%m%d-%H%M%S"))
    if run.exists() and any(run.iterdir()):
        raise ConfigError(f"{run} already holds a run: pick another output.name, or set "
                          "train.resume=true to continue it.")
    run.mkdir(parents=True, exist_ok=True)
    return run


def fit(trainer, run_log, run_dir: Path):
    """trainer.fit(); on failure a TrainingError with the worker's own error. The final
    checkpoint's exported model is copied to run_dir/model. Returns (result, summary)."""
    import shutil

    import ray

    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - report the worker's own error
        cause = root_cause(e)
        raise TrainingError(f"{type(cause).__name__}: {cause}") from None
    summary = ray.get(run_log.summary.remote())  # the run log is closed by the caller
    with result.checkpoint.as_directory() as d:
        if (run_dir / "model").exists():
            shutil.rmtree(run_dir / "model")
        shutil.copytree(Path(d) / "model", run_dir / "model")
    return result, summary


def plot_curves(run_dir: Path, keys: tuple[str, ...]) -> None:
    """curves.png: train and eval curves of `keys` from metrics.jsonl (skipped without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
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
