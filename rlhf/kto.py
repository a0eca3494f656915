"""KTO on Ray Train + DeepSpeed ZeRO: preference optimisation from thumbs-up /
thumbs-down data (one response per row, labelled desirable or not), streamed by Ray Data.

    python -m rlhf.kto                          # laptop: local Ray, CPU, tiny model, the
                                                # demo's pairs split into unpaired examples
    python -m rlhf.kto data.path=feedback.jsonl model.name_or_path=/models/Llama-3.1-8B-Instruct
    python -m rlhf.kto --config launch/recipes/kto-llama3-8b.yaml
    python -m rlhf.kto --help                   # every field, its default and meaning

Data: TRL's unpaired format (prompt, completion, label), text or messages, or pairs in
any format rlhf.dpo reads, each split into a desirable and an undesirable example
(rlhf/data/unpaired.py). Reads top to bottom: the shared driver (rlhf/train/driver.py)
and worker loop (rlhf/train/loop.py) around what KTO computes per step
(rlhf/train/tasks/kto.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from cluster.models import reference_path
from rlhf.config import KTOConfig
from rlhf.evaluate import after_training_of
from rlhf.train import driver
from rlhf.train.reference import UNPAIRED_REFERENCE, reference_pass
from rlhf.train.tasks.kto import KTOTask

BALANCE = (1.0, 4 / 3)  # KTO's advised desirable:undesirable weighted ratio (eq. 8)


def balance_warning(desirable: int, undesirable: int, w_d: float, w_u: float) -> str:
    """A warning when desirable x w_d : undesirable x w_u falls outside 1:1 to 4:3
    (Ethayarajh et al. 2024, eq. 8, as TRL checks it), with the weights that fix it;
    "" when it is inside, or a side is empty."""
    if not desirable or not undesirable:
        return ""
    ratio = desirable * w_d / (undesirable * w_u)
    if BALANCE[0] <= ratio <= BALANCE[1] + 1e-9:
        return ""
    lo_d, hi_d = (undesirable * w_u / desirable * b for b in BALANCE)
    lo_u, hi_u = (desirable * w_d / undesirable / b for b in reversed(BALANCE))
    return (f"{desirable} desirable x {w_d:g} against {undesirable} undesirable x {w_u:g} is "
            f"a weighted ratio of {ratio:.2f}; KTO works best between 1 and 4/3. Set "
            f"loss.desirable_weight in [{lo_d:.2f}, {hi_d:.2f}] or loss.undesirable_weight "
            f"in [{lo_u:.2f}, {hi_u:.2f}] (one of them).")


def run(cfg: KTOConfig, dataset: Any = None, eval_dataset: Any = None, *,
        crash_once_at_step: int | None = None) -> Path:
    """Train; returns the run directory (see rlhf.train.driver.run_training for the arguments)."""
    ref_path, notes = reference_path(cfg.model)
    for n in notes:
        print(f"warning: {n}", file=sys.stderr)

    precompute = reference_pass(cfg, ref_path, UNPAIRED_REFERENCE, "examples")

    def check_balance_and_precompute(pipes, model_path: str) -> None:
        precompute(pipes, model_path)
        if pipes.labels is None:  # pairs: one desirable and one undesirable each
            return
        lo = cfg.loss
        warning = balance_warning(pipes.labels[True], pipes.labels[False],
                                  lo.desirable_weight, lo.undesirable_weight)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
            notes.append(warning)

    return driver.run_training(cfg, KTOTask, dataset=dataset, eval_dataset=eval_dataset,
                               loop_config={"ref_path": ref_path},
                               add_to_pipelines=check_balance_and_precompute, notes=notes,
                               crash_once_at_step=crash_once_at_step,
                               evaluate=after_training_of(cfg))


def main(argv: list[str] | None = None) -> int:
    return driver.main(KTOTask, "rlhf.kto", run, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
