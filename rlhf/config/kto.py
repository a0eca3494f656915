"""rlhf.kto's config (KTO: preference optimisation on thumbs-up / thumbs-down data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from rlhf.config.base import ConfigError, one_of
from rlhf.config.sections import (AfterTrainingConfig, ClusterConfig, ColumnsConfig,
                                  DataConfig, ModelConfig, OutputConfig, TrainConfig,
                                  check_pairs, check_precomputed_reference)

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOColumnsConfig(ColumnsConfig):
    completion: str = "completion"
    """Unpaired data (TRL's format): the column holding the response."""
    label: str = "label"
    """Unpaired data: the column saying whether the response is desirable (true: a
    thumbs-up) or not (false); 1/0 are read as true/false."""


@dataclass
class KTODataConfig(DataConfig):
    """Unpaired preference data (prompt, completion, label), or pairs in any format
    rlhf.dpo reads, each split into a desirable and an undesirable example."""

    columns: KTOColumnsConfig = field(default_factory=KTOColumnsConfig)
    """Column names in the source; e.g. data.columns.label=thumbs_up."""


@dataclass
class KTOLossConfig:
    type: str = "kto"
    """kto (Ethayarajh et al. 2024), or apo_zero_unpaired (APO's anchored loss on
    unpaired data: no KL reference point)."""
    beta: float = 0.1
    """Strength of the pull towards the reference, as DPO's beta."""
    desirable_weight: float = 1.0
    """Weight of the desirable examples' losses (KTO's lambda_D)."""
    undesirable_weight: float = 1.0
    """Weight of the undesirable examples' losses (KTO's lambda_U). With unbalanced data
    keep desirable count x weight between 1 and 4/3 of undesirable count x weight; the
    run warns otherwise and names the range."""
    precompute_reference: bool = False
    """Compute the reference log-probs of every example (and of its mismatched
    completion, for the KL point) once, in a Ray Data pass over an actor pool
    (cluster.reference_actors), and stream them with the examples: the training workers
    then hold no reference model and run no reference forward."""


@dataclass
class KTOConfig:
    """KTO (Kahneman-Tversky optimisation) on Ray Train + DeepSpeed, unpaired preference
    data through Ray Data."""

    PRETRAINED_LR: ClassVar[float] = 5e-7

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (and reference) model."""
    data: KTODataConfig = field(default_factory=KTODataConfig)
    """Unpaired examples (or pairs) and how they are tokenised."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation schedule, evaluation and checkpoints."""
    loss: KTOLossConfig = field(default_factory=KTOLossConfig)
    """The KTO loss."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray and DeepSpeed."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results land."""
    eval: AfterTrainingConfig = field(default_factory=AfterTrainingConfig)
    """Comparison with the base model after training (rlhf.evaluate)."""

    def __post_init__(self) -> None:
        check_kto(self)


def check_kto(cfg: KTOConfig) -> None:
    check_pairs(cfg)
    lo = cfg.loss
    one_of("loss.type", lo.type, KTO_LOSS_TYPES)
    if lo.beta <= 0:
        raise ConfigError(f"loss.beta={lo.beta} must be positive (0.1 is the usual value).")
    if lo.desirable_weight <= 0 or lo.undesirable_weight <= 0:
        raise ConfigError("loss.desirable_weight and loss.undesirable_weight must be "
                          "positive (1.0 each for balanced data).")
    check_precomputed_reference(cfg)
    if cfg.model.ref_name_or_path and cfg.model.lora.enabled:
        raise ConfigError("model.ref_name_or_path and model.lora.enabled together: under "
                          "LoRA the reference is the policy with adapters disabled. Drop "
                          "one of them.")
