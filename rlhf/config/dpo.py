"""rlhf.dpo's config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from rlhf.config.base import ConfigError, one_of
from rlhf.config.sections import (AfterTrainingConfig, ClusterConfig, DataConfig, LossConfig,
                                  ModelConfig, OutputConfig, TrainConfig, check_pairs)


@dataclass
class DPOConfig:
    """Direct Preference Optimisation on Ray Train + DeepSpeed, data through Ray Data."""

    PRETRAINED_LR: ClassVar[float] = 5e-7

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (and reference) model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference pairs and how they are tokenised."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation schedule, evaluation and checkpoints."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The preference loss."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray and DeepSpeed."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results land."""
    eval: AfterTrainingConfig = field(default_factory=AfterTrainingConfig)
    """Comparison with the base model after training (rlhf.evaluate)."""

    def __post_init__(self) -> None:
        check_dpo(self)


def check_dpo(cfg: DPOConfig) -> None:
    check_pairs(cfg)
    lo = cfg.loss
    one_of("loss.type", lo.type, ("sigmoid", "ipo", "hinge", "simpo"))
    if lo.beta <= 0:
        raise ConfigError(f"loss.beta={lo.beta} must be positive (0.1 is the usual value).")
    if not 0.0 <= lo.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing={lo.label_smoothing} must be in [0, 0.5).")
    if lo.label_smoothing and lo.type not in ("sigmoid", "simpo"):
        raise ConfigError(f"loss.label_smoothing only applies to sigmoid and simpo, not "
                          f"loss.type={lo.type}: set it to 0.")
    if lo.precompute_reference and lo.type == "simpo":
        raise ConfigError("loss.type=simpo uses no reference: drop loss.precompute_reference.")
    if lo.precompute_reference and cfg.model.lora.load_in_4bit:
        raise ConfigError("loss.precompute_reference loads the reference in model.dtype; with "
                          "4-bit QLoRA the on-the-fly reference (adapters off) is the exact "
                          "one: drop loss.precompute_reference.")
    if cfg.model.ref_name_or_path and cfg.model.lora.enabled:
        raise ConfigError("model.ref_name_or_path and model.lora.enabled together: under "
                          "LoRA the reference is the policy with adapters disabled. Drop "
                          "one of them.")

