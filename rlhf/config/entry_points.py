"""The entry points, in one table: launch/ (recipes, plans, job submission) and the tests
read it from here.

    python -m rlhf.<name> [--config RECIPE] [key.sub=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config.dpo import DPOConfig
from rlhf.config.evaluate import EvalConfig
from rlhf.config.kto import KTOConfig
from rlhf.config.ppo import PPOConfig
from rlhf.config.rm import RMConfig
from rlhf.config.sample import SampleConfig
from rlhf.config.sft import SFTConfig


@dataclass(frozen=True)
class EntryPoint:
    name: str
    """The recipe prefix and run-directory prefix (dpo -> runs/dpo-<time>/)."""
    config: type
    """Its config dataclass."""
    trains: bool
    """Trains a model on Ray Train (launch/ plans and submits these)."""
    what: str
    """One line for help texts."""

    @property
    def module(self) -> str:
        """What `python -m` runs."""
        return f"rlhf.{self.name}"


ENTRY_POINTS: dict[str, EntryPoint] = {e.name: e for e in (
    EntryPoint("dpo", DPOConfig, True, "preference optimisation on pairs (DPO and its family)"),
    EntryPoint("kto", KTOConfig, True, "preference optimisation on thumbs-up/down data (KTO)"),
    EntryPoint("rm", RMConfig, True, "a reward model on pairs (Bradley-Terry)"),
    EntryPoint("sft", SFTConfig, True, "supervised fine-tuning on examples"),
    EntryPoint("ppo", PPOConfig, True, "online RL with vLLM rollouts (PPO, GRPO, RLOO, ...)"),
    EntryPoint("sample", SampleConfig, False, "best-of-n samples, scored: SFT data, pairs"),
    EntryPoint("evaluate", EvalConfig, False, "an aligned model against its base"),
)}

TRAINING = tuple(name for name, e in ENTRY_POINTS.items() if e.trains)
