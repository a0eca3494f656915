"""Typed, nested dataclass configs and the one loader every entry point uses.

A config is a tree of dataclasses. Each field's help text is the string literal written
right under it (an attribute docstring, as in litgpt), read from the source with `ast`, so
the help and the code cannot drift apart. Values come, in order, from the dataclass
defaults, an optional YAML recipe (`--config FILE`), then `key.sub=value` overrides on
the command line. Unknown keys and values of the wrong type fail at once with a message
that says what to change.

    from rlhf.config import DPOConfig, load
    cfg = load(DPOConfig, "my-recipe.yaml", ["loss.beta=0.2"])

The modules: base (ConfigError, built-in names), sections (what the entry points share:
model, data, loss, train, cluster, output), one per entry point (dpo, rm, sft, ppo,
sample, evaluate), loader (parse, build, help, suggestions), entry_points (the table of entry
points). This package imports nothing else of the project, and nothing heavier than
dataclasses and yaml: every layer above may import it.
"""

from rlhf.config.base import BUILTIN_DATA, BUILTIN_MODEL, BUILTIN_TOOLS, ConfigError
from rlhf.config.dpo import DPOConfig
from rlhf.config.evaluate import (BenchmarksConfig, EvalConfig, EvalDataConfig,
                                  GeneralTasksConfig, GenerationConfig, JudgeConfig)
from rlhf.config.loader import (PEER_FLAGS, build, field_docs, help_text, load, parse_args,
                                suggest, to_dict)
from rlhf.config.kto import KTOColumnsConfig, KTOConfig, KTODataConfig, KTOLossConfig
from rlhf.config.ppo import (PPOConfig, RewardConfig, RLAlgoConfig, RolloutConfig,
                             resolved_rollout_is)
from rlhf.config.rm import RMConfig, RMLossConfig
from rlhf.config.sample import SampleConfig, SamplingConfig
from rlhf.config.sections import (AfterTrainingConfig, ClusterConfig, ColumnsConfig,
                                  DataConfig, LoraConfig, LossConfig, ModelConfig,
                                  OutputConfig, PromptDataConfig, SFTColumnsConfig,
                                  SFTDataConfig, SourceConfig, TrainConfig,
                                  resolved_learning_rate)
from rlhf.config.sft import SFTConfig

__all__ = [
    "BUILTIN_DATA", "BUILTIN_MODEL", "BUILTIN_TOOLS", "ConfigError", "DPOConfig",
    "BenchmarksConfig", "EvalConfig", "EvalDataConfig", "GeneralTasksConfig",
    "GenerationConfig", "JudgeConfig", "PEER_FLAGS", "build", "field_docs", "help_text",
    "load", "parse_args", "suggest", "to_dict", "KTOColumnsConfig", "KTOConfig",
    "KTODataConfig", "KTOLossConfig", "PPOConfig", "RewardConfig", "RLAlgoConfig",
    "RolloutConfig", "resolved_rollout_is", "RMConfig", "RMLossConfig",
    "AfterTrainingConfig", "ClusterConfig", "ColumnsConfig", "DataConfig", "LoraConfig",
    "LossConfig", "ModelConfig", "OutputConfig", "PromptDataConfig", "SFTColumnsConfig",
    "SFTDataConfig", "SourceConfig", "TrainConfig", "resolved_learning_rate", "SFTConfig",
    "SampleConfig", "SamplingConfig",
]
