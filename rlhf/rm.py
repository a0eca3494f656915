"""A reward model on Ray Train + DeepSpeed ZeRO: a causal LM backbone with a scalar
head, trained with the Bradley-Terry loss on the preference pairs DPO reads.

    python -m rlhf.rm                        # laptop: local Ray, CPU, tiny model, demo pairs
    python -m rlhf.rm model.name_or_path=runs/sft-.../model cluster.zero_stage=3
    python -m rlhf.rm --config launch/recipes/rm-llama3-8b.yaml
    python -m rlhf.rm --help                 # every field, its default and meaning

What a micro-batch computes, and how the export scores, is rlhf/train/tasks/rm.py; around
it the shared driver (rlhf/train/driver.py) and worker loop (rlhf/train/loop.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rlhf.config import RMConfig
from rlhf.train import driver
from rlhf.train.tasks.rm import RMTask


def run(cfg: RMConfig, dataset: Any = None, eval_dataset: Any = None, *,
        crash_once_at_step: int | None = None) -> Path:
    """Train; returns the run directory (see rlhf.train.driver.run_training for the arguments)."""
    return driver.run_training(cfg, RMTask, dataset=dataset, eval_dataset=eval_dataset,
                               crash_once_at_step=crash_once_at_step)


def main(argv: list[str] | None = None) -> int:
    return driver.main(RMTask, "rlhf.rm", run, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
