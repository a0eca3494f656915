"""Ray Train's TorchTrainer for a job: scaling (elastic with a worker range), failure
handling, checkpoint storage (a folder or object storage), the datasets handed to the
workers; and `fit`, which turns a failed run into the worker's own error.

    trainer = make_trainer(loop, loop_config, cfg.cluster, {"train": ds, "eval": held},
                           name="checkpoints", storage_path=run_dir, keep_checkpoints=2)
    result = fit(trainer)                  # TrainingError with the worker's message
"""

from __future__ import annotations

import functools
from typing import Any

from cluster.ray_cluster import root_cause
from rlhf.data.readers import object_store


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
        filesystem, storage_path = object_store(storage_path)
    return TorchTrainer(
        # The config rides inside the training function, which Ray Train hands to the
        # workers through the object store, untouched on the way. Given as
        # train_loop_config it would also be unpickled by the controller actor (Ray Train
        # keeps it in the run's context), importing the task's modules (torch,
        # transformers, deepspeed) there for nothing: ~2.5 s of a core at every run's
        # start, before the workers can be placed.
        functools.partial(loop, loop_config),
        # A range makes Ray Train elastic: it asks for max, starts with what is there
        # (>= min), and restarts the group at another size from the latest checkpoint
        # when nodes come or go (rlhf.train.loop reloads it at the new world size).
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



class TrainingError(RuntimeError):
    """Training failed in a worker; the message is the worker's error."""




def fit(trainer):
    """trainer.fit(); on failure a TrainingError with the worker's own error."""
    try:
        return trainer.fit()
    except Exception as e:  # noqa: BLE001 - report the worker's own error
        cause = root_cause(e)
        raise TrainingError(f"{type(cause).__name__}: {cause}") from None
