"""DPO on Ray Train + DeepSpeed ZeRO, with preference pairs streamed by Ray Data.

    python -m rlhf.dpo                          # laptop: local Ray, CPU, tiny model, demo data
    python -m rlhf.dpo train.max_steps=20 cluster.zero_stage=3
    python -m rlhf.dpo --config launch/recipes/dpo-llama3-8b.yaml
    ray job submit --working-dir . -- python -m rlhf.dpo --config launch/recipes/dpo-llama3-8b.yaml
    python -m rlhf.dpo --help                   # every field, its default and meaning

Reads top to bottom: the reference (its own model, the policy without its adapters, or
log-probs computed once in the pipeline), then the shared driver (rlhf/train/driver.py)
and worker loop (rlhf/train/loop.py) around what DPO computes per micro-batch
(rlhf/train/tasks/dpo.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from cluster.models import reference_path
from rlhf.config import DPOConfig
from rlhf.evaluate import after_training_of
from rlhf.train import driver
from rlhf.train.reference import reference_pass
from rlhf.train.tasks.dpo import DPOTask


def run(cfg: DPOConfig, dataset: Any = None, eval_dataset: Any = None, *,
        crash_once_at_step: int | None = None) -> Path:
    """Train; returns the run directory (see rlhf.train.driver.run_training for the arguments)."""
    ref_path, notes = reference_path(cfg.model)
    for n in notes:
        print(f"warning: {n}", file=sys.stderr)

    return driver.run_training(cfg, DPOTask, dataset=dataset, eval_dataset=eval_dataset,
                               loop_config={"ref_path": ref_path},
                               add_to_pipelines=reference_pass(cfg, ref_path), notes=notes,
                               crash_once_at_step=crash_once_at_step,
                               evaluate=after_training_of(cfg))


def main(argv: list[str] | None = None) -> int:
    return driver.main(DPOTask, "rlhf.dpo", run, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
