"""rlhf.sample's config: prompts, the policy that samples, the reward sources that score,
and what is written."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.config.base import ConfigError, one_of
from rlhf.config.ppo import PAIRINGS, RewardConfig
from rlhf.config.sections import ClusterConfig, ModelConfig, OutputConfig, PromptDataConfig

OUTPUTS = ("sft", "pairs", "scored")


@dataclass
class SamplingConfig:
    samples_per_prompt: int = 4
    """Responses sampled per prompt (the n of best-of-n)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    """Longest response in tokens."""
    engines: int = 1
    """vLLM engine actors (a Ray Data actor pool): each takes batches of prompts."""
    tensor_parallel_size: int = 1
    """GPUs per engine (tensor parallel); 1 on CPU."""
    cpus_per_engine: float = 1.0
    kv_cache_fraction: float = 0.15
    """vLLM's gpu_memory_utilization (on CPU: the share of host memory for the KV cache)."""
    batch_prompts: int = 32
    """Prompts per engine call (and per scoring call)."""
    shard_prompts: int = 64
    """Prompts per written part (part-NNNNN.jsonl in each output): the unit a killed job
    resumes from. A part is written whole, then committed; a resumed job skips the
    committed parts' prompts and writes the rest, none twice."""
    seed: int = 0
    """Each prompt's samples are drawn from a seed of (this, the prompt's row id): a
    resumed job, or another number of engines, draws the same samples."""
    write: list[str] = field(default_factory=lambda: list(OUTPUTS))
    """What is written, each in a folder of its own under the output: sft (each prompt's
    best sample, at or above sft_min_score: prompt/completion rows for rlhf.sft), pairs
    (prompt/chosen/rejected with score_chosen/score_rejected, for rlhf.dpo and rlhf.rm)
    and scored (every sample: prompt/completion/label/score, for rlhf.kto and analysis)."""
    pairs: str = "best_worst"
    """Which samples make pairs (rlhf.core.pairwise.select_pairs): best_worst (RLHFlow's
    iterative DPO), best_random or all; ties and gaps below min_pair_gap are never
    paired."""
    min_pair_gap: float = 0.0
    sft_min_score: float | None = None
    """sft: a prompt's best sample is written only at or above this score (rejection
    sampling); empty: every prompt's best."""
    kto_threshold: float | None = None
    """scored: label = score >= this; empty: score above the prompt's median (a prompt
    whose samples all score the same gets no label: null, which rlhf.kto counts and
    drops)."""
    output: str = ""
    """Where the data goes: a folder or s3://bucket/prefix (credentials from AWS_*).
    Empty: the run directory (output.dir/output.name). Run again with the same output to
    resume a killed job."""


@dataclass
class SampleConfig:
    """Best-of-n sampling as a batch job: prompts through Ray Data to a pool of vLLM
    engines, every sample scored by the reward sources, written as best-of-n SFT data,
    preference pairs and scored samples."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy that samples (builtin:tiny-llama: the built-in SFT model)."""
    data: PromptDataConfig = field(default_factory=lambda: PromptDataConfig(
        demo_pairs=256, demo_eval_pairs=32))
    """Prompts: every usable row of the training split is sampled."""
    sample: SamplingConfig = field(default_factory=SamplingConfig)
    """How many samples, from how many engines, and what is written."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The reward sources, as rlhf.ppo's (functions, models and their ensemble, judge,
    remote endpoint; gold is written beside the score, kept out of it). reward.replicas
    scoring actors each hold every reward model (and the judge), with
    reward.cpus_per_replica / gpus_per_replica."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray (the workers' fields are unused: nothing trains)."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """The run directory (its config.yaml, summary.json, and the data unless
    sample.output names another place)."""

    def __post_init__(self) -> None:
        s, rw = self.sample, self.reward
        if s.samples_per_prompt < 1 or s.max_new_tokens < 1 or s.engines < 1:
            raise ConfigError("sample.samples_per_prompt, sample.max_new_tokens and "
                              "sample.engines must be at least 1.")
        if s.batch_prompts < 1 or s.shard_prompts < 1:
            raise ConfigError("sample.batch_prompts and sample.shard_prompts must be at least 1.")
        for w in s.write:
            one_of("sample.write", w, OUTPUTS)
        if not s.write:
            raise ConfigError(f"sample.write is empty: name what to write ({', '.join(OUTPUTS)}).")
        one_of("sample.pairs", s.pairs, PAIRINGS)
        if "pairs" in s.write and s.samples_per_prompt < 2:
            raise ConfigError("sample.write has pairs: set sample.samples_per_prompt >= 2 "
                              "(a pair needs two samples of a prompt).")
        if s.min_pair_gap < 0:
            raise ConfigError(f"sample.min_pair_gap={s.min_pair_gap} must be >= 0.")
        if rw.min_score is not None or rw.max_score is not None:
            raise ConfigError("reward.min_score/max_score filter rlhf.ppo's training samples; "
                              "rlhf.sample writes every sample: use sample.sft_min_score (the "
                              "best-of-n threshold) or sample.kto_threshold.")
        if rw.model and rw.models:
            raise ConfigError("reward.model and reward.models are both given: list every "
                              "reward model in reward.models.")
        if not (rw.functions or rw.model or rw.models or rw.remote_url or rw.judge):
            raise ConfigError("No reward: give reward.functions (module:function), "
                              "reward.models (reward models exported by rlhf.rm), "
                              "reward.judge or reward.remote_url.")
        if rw.replicas < 1:
            raise ConfigError(f"reward.replicas={rw.replicas}: at least 1 scoring actor.")
