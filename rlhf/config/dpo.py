"""rlhf.dpo's config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from rlhf.config.base import ConfigError, one_of
from rlhf.config.sections import (DPO_LOSS_TYPES, F_DIVERGENCE_TYPES, F_DIVERGENCES,
                                  REFERENCE_FREE_TYPES, SMOOTHED_TYPES, AfterTrainingConfig,
                                  ClusterConfig, DataConfig, LossConfig, ModelConfig,
                                  OutputConfig, TrainConfig, check_pairs,
                                  check_precomputed_reference)


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
    types = lo.type
    if not types:
        raise ConfigError("loss.type is empty: name a loss, e.g. loss.type=sigmoid.")
    for t in types:
        one_of("loss.type", t, DPO_LOSS_TYPES + REFERENCE_FREE_TYPES)
    if len(set(types)) < len(types):
        raise ConfigError(f"loss.type={','.join(types)} names a type twice: give each once "
                          "and weigh it with loss.weights.")
    if lo.reference_free and len(types) > 1:
        raise ConfigError(f"loss.type={','.join(types)}: {', '.join(REFERENCE_FREE_TYPES)} "
                          "have no reference and stand alone; for an NLL term beside one "
                          "use loss.rpo_alpha.")
    if lo.weights is not None and len(lo.weights) != len(types):
        raise ConfigError(f"loss.weights has {len(lo.weights)} values for {len(types)} "
                          f"loss types ({','.join(types)}): give one weight per type.")
    if lo.beta <= 0:
        raise ConfigError(f"loss.beta={lo.beta} must be positive (0.1 is the usual value).")
    if not 0.0 <= lo.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing={lo.label_smoothing} must be in [0, 0.5).")
    if lo.label_smoothing and not any(t in SMOOTHED_TYPES for t in types):
        raise ConfigError(f"loss.label_smoothing only applies to {', '.join(SMOOTHED_TYPES)}, "
                          f"not loss.type={','.join(types)}: set it to 0.")
    if "exo_pair" in types and not lo.label_smoothing:
        raise ConfigError("loss.type=exo_pair needs loss.label_smoothing > 0 (EXO's epsilon; "
                          "the paper uses 1e-3).")
    one_of("loss.f_divergence", lo.f_divergence, F_DIVERGENCES)
    if lo.f_divergence != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_TYPES):
        raise ConfigError(f"loss.f_divergence={lo.f_divergence} applies to "
                          f"{', '.join(F_DIVERGENCE_TYPES)}; loss.type={','.join(types)} "
                          "has none: drop loss.f_divergence.")
    if lo.ld_alpha is not None and not 0.0 <= lo.ld_alpha <= 1.0:
        raise ConfigError(f"loss.ld_alpha={lo.ld_alpha} must be in [0, 1] (1: no effect).")
    if lo.alphapo and not set(types) <= {"cpo", "simpo"}:
        raise ConfigError(f"loss.alphapo applies to cpo and simpo, not "
                          f"loss.type={','.join(types)}.")
    if lo.rpo_alpha is not None and lo.rpo_alpha < 0:
        raise ConfigError(f"loss.rpo_alpha={lo.rpo_alpha} must be >= 0.")
    if lo.precompute_reference and lo.reference_free:
        raise ConfigError(f"loss.type={types[0]} uses no reference: drop "
                          "loss.precompute_reference.")
    if lo.reference_free and cfg.model.ref_name_or_path:
        raise ConfigError(f"model.ref_name_or_path is set but loss.type={types[0]} uses no "
                          "reference: drop model.ref_name_or_path.")
    if lo.precompute_reference and lo.ld_alpha is not None:
        raise ConfigError("loss.ld_alpha with loss.precompute_reference: the streamed "
                          "reference log-probs are plain sums. Drop one of them.")
    if lo.reference_sync_every < 0 or not 0.0 < lo.reference_mixup <= 1.0:
        raise ConfigError("loss.reference_sync_every must be >= 0 and loss.reference_mixup "
                          "in (0, 1].")
    if lo.reference_sync_every:
        for bad, why in ((lo.reference_free, f"loss.type={types[0]} has no reference"),
                         (cfg.model.lora.enabled, "under LoRA the reference is the policy "
                          "with its adapters off"),
                         (lo.precompute_reference, "the reference log-probs are computed "
                          "once, before training")):
            if bad:
                raise ConfigError(f"loss.reference_sync_every (TR-DPO) cannot move the "
                                  f"reference: {why}. Set loss.reference_sync_every=0.")
    check_precomputed_reference(cfg)
    if cfg.model.ref_name_or_path and cfg.model.lora.enabled:
        raise ConfigError("model.ref_name_or_path and model.lora.enabled together: under "
                          "LoRA the reference is the policy with adapters disabled. Drop "
                          "one of them.")

