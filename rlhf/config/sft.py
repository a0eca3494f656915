"""rlhf.sft's config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from rlhf.config.base import ConfigError, one_of
from rlhf.config.sections import (ClusterConfig, ModelConfig, OutputConfig, SFTDataConfig,
                                  TrainConfig, check_common)


@dataclass
class SFTConfig:
    """Supervised fine-tuning (next-token loss on completions) on Ray Train + DeepSpeed,
    examples through Ray Data."""

    PRETRAINED_LR: ClassVar[float] = 2e-5

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune (usually a base model)."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    """Examples and how they are tokenised."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation schedule, evaluation and checkpoints."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray and DeepSpeed."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results land."""

    def __post_init__(self) -> None:
        check_sft(self)


def check_sft(cfg: SFTConfig) -> None:
    check_common(cfg)
    one_of("data.format", cfg.data.format,
            ("auto", "prompt_completion", "conversational", "text", "preference"))
    one_of("data.truncation", cfg.data.truncation, ("keep_start", "keep_end", "drop"))
    if cfg.data.max_length < 2:
        raise ConfigError(f"data.max_length={cfg.data.max_length}: an example needs at "
                          "least 2 tokens (one to predict from, one to predict).")

