"""Joining or starting Ray for a job: the cluster itself, sized for the job, quiet, and
the worker error behind a failed Ray call.

    connect(cfg.cluster, extra_cpus=engines_cpus)   # join cluster.address, or start local
    check_resources(cfg.cluster)                    # fail early, with numbers
    quiet_ray_data()                                # no per-dataset progress logs
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from rlhf.config import ConfigError


def quiet_ray_data() -> None:
    """Ray Data's per-dataset progress logs drown the training progress line."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def connect(cluster_cfg: Any, extra_cpus: float = 0.0) -> None:
    """Join the configured Ray cluster, or start a local one sized for this job.

    A local Ray gets CPUs for the workers plus `data_cpus` for the Ray Data pipeline:
    with exactly the workers' CPUs the pipeline never gets a CPU and training waits
    forever (seen with 2 workers on ray.init(num_cpus=2): "1/0 CPU", no row delivered).
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


def check_resources(cluster_cfg: Any, extra_cpus: float = 0.0) -> None:
    """Fail early, with numbers, when the cluster can never host the workers, and what
    else the job starts (`extra_cpus`: online RL's engines and served reward models),
    with a CPU left for the data pipeline (without one, training waits for ever)."""
    import ray

    total = ray.cluster_resources()
    workers = cluster_cfg.worker_range[0]  # an elastic run starts with its minimum
    need_cpu = workers * cluster_cfg.cpus_per_worker + extra_cpus
    need_gpu = workers if cluster_cfg.use_gpu else 0
    autoscaling = bool(os.environ.get("RAY_ADDRESS") or cluster_cfg.address)
    if autoscaling:
        return  # an autoscaler may add nodes; Ray Train waits for them
    if total.get("CPU", 0) < need_cpu + 1 or total.get("GPU", 0) < need_gpu:
        also = (f" and the engines and served reward models {extra_cpus:g}" if extra_cpus
                else "")
        raise ConfigError(
            f"The local Ray cluster has {total.get('CPU', 0):g} CPUs and "
            f"{total.get('GPU', 0):g} GPUs; {workers} workers{also} need "
            f"{need_cpu:g} CPUs (+1 for the data pipeline) and {need_gpu} GPUs. Lower "
            "cluster.num_workers or cluster.cpus_per_worker"
            + (" (or rollout.cpus_per_engine, reward.cpus_per_replica)" if extra_cpus else "")
            + ".")


def user_error(exc: BaseException) -> BaseException:
    """The outermost error of ours (or the user's code) in the chain Ray wraps around a
    failed task: a Ray Data stage's error reaches the driver as UserCodeException ->
    (our error) -> (what it wraps); the first link not from Ray itself is the one that
    names what went wrong. `exc` itself where every link is Ray's."""
    from ray.exceptions import RayError

    seen, link = set(), exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        # RayTaskError(X) is a class Ray makes on the fly: its module says nothing
        if not isinstance(link, RayError) and not type(link).__module__.startswith("ray"):
            return link
        link = link.__cause__ or getattr(link, "cause", None)
    return exc


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

