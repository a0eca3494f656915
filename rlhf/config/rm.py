"""rlhf.rm's config (reward model training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from rlhf.config.base import ConfigError
from rlhf.config.sections import (ClusterConfig, DataConfig, ModelConfig, OutputConfig,
                                  TrainConfig, check_pairs)


@dataclass
class RMLossConfig:
    center_coefficient: float = 0.0
    """Reward centering (Eisenstein et al. 2023): weight of a (r_chosen + r_rejected)^2
    penalty that keeps the mean reward near zero; 0.01 is the usual value, 0 disables."""


@dataclass
class RMConfig:
    """A reward model (causal LM backbone + scalar head, Bradley-Terry loss) on Ray Train
    + DeepSpeed, preference pairs through Ray Data."""

    PRETRAINED_LR: ClassVar[float] = 1e-5

    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone the reward model starts from (usually the SFT model)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference pairs and how they are tokenised."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation schedule, evaluation and checkpoints."""
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    """The Bradley-Terry loss and its options."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray and DeepSpeed."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results land."""

    def __post_init__(self) -> None:
        check_rm(self)


def check_rm(cfg: RMConfig) -> None:
    check_pairs(cfg)
    if cfg.model.lora.enabled and not cfg.model.lora.merge_on_export:
        raise ConfigError("A reward model is exported merged, so that it loads as "
                          "AutoModelForSequenceClassification and scores through "
                          "cluster.scoring: drop model.lora.merge_on_export=false.")
    if cfg.loss.center_coefficient < 0:
        raise ConfigError(f"loss.center_coefficient={cfg.loss.center_coefficient} must be "
                          ">= 0 (0.01 is the usual value, 0 disables centering).")

