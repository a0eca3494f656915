"""Supervised fine-tuning on Ray Train + DeepSpeed ZeRO, examples streamed by Ray Data:
the first stage of SFT -> reward model -> PPO.

    python -m rlhf.sft                       # laptop: local Ray, CPU, tiny model, demo data
    python -m rlhf.sft data.path=chats.jsonl model.name_or_path=/models/Llama-3.1-8B
    python -m rlhf.sft --config launch/recipes/sft-llama3-8b.yaml
    python -m rlhf.sft --help                # every field, its default and meaning

Data: prompt/completion pairs, conversations (chat template; loss on the assistant
messages), plain text, or the chosen side of preference pairs (what the embedded
default trains on: the demo's prompts and their chosen answers); see rlhf/data/examples.py.
The loss is the mean next-token NLL over every trained token of the global batch,
however the batch is split over workers and micro-batches. With data.packing (the
default) a micro-batch runs as one row, each example attending to itself only.

What a micro-batch computes is rlhf/train/tasks/sft.py; around it the shared driver
(rlhf/train/driver.py) and worker loop (rlhf/train/loop.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rlhf.config import SFTConfig
from rlhf.data.examples import resolve_chat_template
from rlhf.train import driver
from rlhf.train.tasks.sft import SFTTask


def run(cfg: SFTConfig, dataset: Any = None, eval_dataset: Any = None, *,
        crash_once_at_step: int | None = None) -> Path:
    """Train; returns the run directory (see rlhf.train.driver.run_training for the arguments)."""
    cfg.data.chat_template = resolve_chat_template(cfg.data.chat_template)
    return driver.run_training(cfg, SFTTask, dataset=dataset, eval_dataset=eval_dataset,
                               crash_once_at_step=crash_once_at_step)


def main(argv: list[str] | None = None) -> int:
    return driver.main(SFTTask, "rlhf.sft", run, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
