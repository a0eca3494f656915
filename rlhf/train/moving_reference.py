"""A reference model that moves towards the policy (TR-DPO, Gorbatovski et al. 2024):
every `every` steps ref = mixup x policy + (1 - mixup) x ref (eq. 6). Shared by rlhf.dpo
(loss.reference_sync_every) and online DPO in rlhf.ppo (algo.reference_sync_every).

A moved reference is part of the run's state (a mixture of past policies): its full
weights are saved with each checkpoint once it has moved, and loaded back on resume.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cluster.checkpoints import gather_state_dict
from cluster.deepspeed import blend_parameters, load_parameters

REFERENCE_FILE = "reference.pt"  # saved with the checkpoint once the reference has moved


class MovingReference:
    def __init__(self, ref_engine, every: int, mixup: float):
        """ref_engine: the frozen reference's DeepSpeed engine (None: no reference, and
        nothing moves); every: steps between moves (0: it never moves)."""
        self.engine, self.every, self.mixup = ref_engine, every, mixup
        self.synced_at = 0

    def step(self, policy_engine, step: int) -> bool:
        """After `step`: move the reference when it is due; whether it moved. After a
        restore (step == the restored step) it is not moved again: `load` brought it
        back as it was."""
        if self.engine is None or not self.every or step <= self.synced_at or step % self.every:
            return False
        blend_parameters(self.engine, policy_engine, self.mixup)
        self.synced_at = step
        return True

    def save(self, folder: Path) -> None:
        if self.engine is None or not self.synced_at:
            return  # never moved: the reference loaded from its path is the right one
        full = gather_state_dict(self.engine, self.engine.zero_optimization_stage())
        if full is not None:
            torch.save({"synced_at": self.synced_at, "weights": full}, folder / REFERENCE_FILE)

    def load(self, folder: Path) -> None:
        path = folder / REFERENCE_FILE
        if self.engine is None or not path.is_file():
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        load_parameters(self.engine, saved["weights"])
        self.synced_at = saved["synced_at"]
