"""The run log: a Ray actor on the driver's node, the one place a run's metrics are
written. Rank 0 of the training workers sends it every record; it appends the record to
metrics.jsonl, hands it to the trackers of output.report_to (rlhf.runlog.trackers) and
prints the progress line (step, loss, accuracy or reward, learning rate, tokens/s, ETA).

    run_log = start_run_log(run_dir, total_steps, "pairs", ["tensorboard"], config)
    run_log.log.remote({"step": 1, "train/loss": 0.69, ...})      # from rank 0
    status = close_run_log(run_log, summary)                        # trackers' status
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from cluster.ray_cluster import root_cause
from cluster.worker import say
from rlhf.config import ConfigError
from rlhf.runlog.redact import redact_text
from rlhf.runlog.trackers import Trackers, tracker_env


class RunLog:
    """Ray actor (on the driver's node) that writes metrics.jsonl into the run
    directory, hands every record to the trackers of output.report_to
    (rlhf.runlog.trackers: TensorBoard events in the run directory, W&B, MLflow) and prints
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
            say(f"step {step}/{self.total}  {_brief(record, 'train')}  "
                f"lr {record['train/learning_rate']:.2e}  "
                f"{record['train/tokens_per_s']:.0f} tok/s  ETA {_hms(eta)}")
        if any(k.startswith("eval/") for k in record):
            say(f"eval @ step {step}: {_brief(record, 'eval')}  "
                f"({record.get(f'eval/{self.unit}', 0)} {self.unit})")

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
