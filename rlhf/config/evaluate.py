"""rlhf.evaluate's config: the two models, held-out data, generation, judge,
benchmarks and general tasks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlhf.config.base import ConfigError, one_of
from rlhf.config.sections import ClusterConfig, DataConfig, OutputConfig


@dataclass
class EvalDataConfig(DataConfig):
    """Held-out prompts (and, for preference data, their pairs)."""

    path: str = ""
    """Data whose held-out split is evaluated: any source rlhf.dpo (or, for prompts
    alone, rlhf.ppo) reads. Empty: the training run's own data (its config.yaml), or
    builtin:demo without a run. data.eval_path names a file to evaluate whole."""
    max_prompts: int = 256
    """Evaluate at most this many held-out rows (the lowest row ids: the same rows every
    time)."""


@dataclass
class GenerationConfig:
    """How both models sample (the same seeds for both: differences are the models')."""

    max_new_tokens: int = 64
    """Longest response in tokens."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    samples_per_prompt: int = 1
    """Responses per prompt and model; each is compared with the other model's response
    of the same sample index."""
    kv_cache_fraction: float = 0.15
    """vLLM's gpu_memory_utilization (on CPU: the share of host memory for the KV cache)."""
    tensor_parallel_size: int = 1
    """GPUs per engine."""
    cpus_per_engine: float = 1.0
    """CPUs reserved per engine actor."""


@dataclass
class JudgeConfig:
    reward_model: str = ""
    """A reward model exported by rlhf.rm: it scores both responses, the higher wins.
    Empty and no judge.model: the built-in demo reward model (rlhf.rm's default run,
    trained once and cached) on builtin:demo data; other data needs a judge."""
    model: str = ""
    """A causal LM prompted to pick the better of two responses (pairwise judge), by the
    log-probs it gives "A" and "B"; used instead of a reward model when given."""
    both_orders: bool = False
    """Pairwise judge: ask with both orders and count a win only when both agree (a
    split verdict is a tie). Otherwise one order, randomised per comparison."""
    tie_tolerance: float = 0.0
    """Scores (or the judge's log-prob gap) within this are a tie."""
    max_length: int = 2048
    """Pairwise judge: longest judge prompt in tokens (longer ones lose the start of
    the conversation)."""


@dataclass
class BenchmarksConfig:
    """MT-Bench and AlpacaEval: both models answer, the answers are written in each
    tool's format under benchmarks/ (with the official judges' commands), and the local
    judge grades them."""

    mt_bench: str = ""
    """MT-Bench questions: FastChat's data/mt_bench/question.jsonl (question_id,
    category, turns). Each turn is answered after the model's own previous answer, at
    FastChat's temperature for the category. The local judge (judge.model) grades every
    answer 1-10. `auto`: the copy an installed package ships (a FastChat source
    checkout; the fschat wheel has none). Empty: skipped."""
    alpaca_eval: str = ""
    """AlpacaEval instructions: its alpaca_eval.json (or any JSON / JSON-lines file of
    {instruction} rows), answered at generation.temperature; the local judge (judge.model
    or judge.reward_model) gives the aligned model's win rate against its base. `auto`:
    alpaca_eval.json from the tatsu-lab/alpaca_eval hub data set (or the hub cache).
    Empty: skipped."""
    max_questions: int = 0
    """Ask at most this many questions of each set (0: all)."""
    max_new_tokens: int = 1024
    """Longest answer in tokens (FastChat's and AlpacaEval's default is 1024 or more)."""
    max_prompt_length: int = 2048
    """Longest prompt in tokens (a second MT-Bench turn carries the first); longer ones
    keep their end, counted."""
    model_id: str = ""
    """The aligned model's name in the exported files. Empty: the run's directory name
    (the base is named after its folder)."""


@dataclass
class GeneralTasksConfig:
    """General tasks through lm-evaluation-harness (pip install lm-eval): the base and
    the aligned model side by side, the difference with its paired standard error, and
    a flag where the aligned model is worse beyond noise."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task names (built-in, e.g. [arc_easy,hellaswag], or defined by YAML in
    general.include_path). Empty: skipped."""
    include_path: str = ""
    """A folder of lm-eval task YAML files (local data: dataset_path: json with
    dataset_kwargs.data_files)."""
    backend: str = "hf"
    """lm-eval's model backend: hf (transformers; CPU or GPU) or vllm (GPU)."""
    limit: int = 0
    """Documents per task (0: all)."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt. Empty: each task's own default."""
    batch_size: int = 8
    """lm-eval's batch size."""


@dataclass
class EvalConfig:
    """Compare an aligned model with its base on held-out prompts: win rate, held-out
    preference accuracy, drift and degeneration, with a report."""

    run: str = ""
    """A training run directory (rlhf.dpo, rlhf.ppo, ...): its model/ is the aligned
    model, the model it started from the base, its held-out data the prompts. Empty:
    the newest runs/dpo-* run, unless model and base are given."""
    model: str = ""
    """The aligned model (a Hugging Face folder). Empty: the run's model/."""
    base: str = ""
    """The model it was trained from (or any model to compare with). Empty: the run's
    reference (model.ref_name_or_path, else model.name_or_path)."""
    beta: float | None = None
    """Beta of DPO's implicit reward for the preference accuracy. Empty: the run's
    loss.beta, else 0.1."""
    seed: int = 42
    """Seed of the held-out split (a run's train.seed is taken from the run) and, with
    the row id, of every prompt's sampling."""
    dtype: str = "fp32"
    """Weights and compute dtype of the engines and judges: fp32, bf16 or fp16."""
    max_kl_per_token: float = 0.5
    """Flag drift when the KL estimate to the base exceeds this many nats per token."""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Held-out prompts and pairs."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling of both models."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Who decides which response is better."""
    benchmarks: BenchmarksConfig = field(default_factory=BenchmarksConfig)
    """MT-Bench and AlpacaEval hand-off (answers in their formats, a local judge)."""
    general: GeneralTasksConfig = field(default_factory=GeneralTasksConfig)
    """General tasks (lm-evaluation-harness): no degradation against the base."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray (address, use_gpu); the training fields are unused."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where the report lands (a run directory eval-<date>-<time>)."""

    def __post_init__(self) -> None:
        one_of("dtype", self.dtype, ("fp32", "bf16", "fp16"))
        g = self.generation
        if g.max_new_tokens < 1 or g.samples_per_prompt < 1:
            raise ConfigError("generation.max_new_tokens and generation.samples_per_prompt "
                              "must be at least 1.")
        if g.temperature < 0 or not 0 < g.top_p <= 1:
            raise ConfigError("generation.temperature must be >= 0 and generation.top_p in "
                              "(0, 1].")
        if self.data.max_prompts < 1:
            raise ConfigError("data.max_prompts must be at least 1.")
        if self.judge.reward_model and self.judge.model:
            raise ConfigError("Give one judge: judge.reward_model or judge.model, not both.")
        gt = self.general
        one_of("general.backend", gt.backend, ("hf", "vllm"))
        if gt.tasks:
            import importlib.util

            if importlib.util.find_spec("lm_eval") is None:
                raise ConfigError("general.tasks needs lm-evaluation-harness: pip install "
                                  "lm-eval (0.4.13 is tested).")
            if gt.include_path and not Path(gt.include_path).expanduser().is_dir():
                raise ConfigError(f"general.include_path={gt.include_path}: no such folder "
                                  "(give the folder holding your lm-eval task YAML files).")

