"""rlhf.ppo's config: rollout, algorithm, rewards, on top of the shared sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rlhf.config.base import ConfigError, one_of
from rlhf.config.sections import DPO_LOSS_TYPES
from rlhf.config.sections import (AfterTrainingConfig, ClusterConfig, ModelConfig,
                                  OutputConfig, PromptDataConfig, TrainConfig, check_common)


@dataclass
class RolloutConfig:
    engines: int = 1
    """vLLM engine actors generating the responses (each serves the training workers
    whose rank modulo this count is its index)."""
    tensor_parallel_size: int = 1
    """GPUs per engine (tensor parallel); 1 on CPU."""
    cpus_per_engine: float = 1.0
    """CPUs reserved per engine actor."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt (GRPO's and RLOO's group size)."""
    temperature: float = 1.0
    """Sampling temperature (the trainer's log-probs use the same)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 48
    """Longest response in tokens."""
    kv_cache_fraction: float = 0.15
    """vLLM's gpu_memory_utilization (on CPU: the share of host memory for the KV cache)."""
    weight_sync: str = "auto"
    """How new weights reach the engines: shm (a file in /dev/shm: one machine), store
    (buckets through Ray's object store, any number of nodes), broadcast (a process group
    of training rank 0 and the engine workers: NCCL on GPUs, gloo on CPU; no copy kept,
    so an engine lost mid-step costs a resume from the last checkpoint) or auto (shm on
    a local Ray this run starts, store on a cluster)."""
    sync_bucket_mb: float = 512.0
    """store, broadcast: the weights travel in buckets of about this size (ZeRO-3
    gathers one bucket at a time, so no rank holds the whole model)."""
    sync_timeout_s: float = 600.0
    """broadcast: the longest wait for the group to form or a bucket to arrive; past it
    the step fails with the engines that did not answer named."""
    max_staleness: int = 0
    """How many weights versions a sample may lag the policy it trains: 0 is lock-step
    on-policy (each step's samples come from the step's own starting weights); 1 lets
    the engines generate the next step's samples while this one trains; k >= 2 lets them
    run up to k steps ahead. Staleness is shown per step (train/staleness/...)."""
    partial_rollouts: bool = False
    """Generate in pieces of rollout.chunk_tokens and let the engines take new weights
    between pieces: a response interrupted by a weight update continues under the new
    weights, each token tagged with the version that sampled it (with max_staleness >= 1
    the engines then never wait for a long response to finish)."""
    chunk_tokens: int = 16
    """partial_rollouts: tokens per piece."""
    placement: str = "colocated"
    """colocated: the engines go wherever Ray finds room, beside the training workers if
    need be; separate: engines only on nodes labelled rlhf-role=rollout and training
    workers only on the others (ray-cluster.yaml's rollout node type), so generation and
    training never share a GPU."""
    environment: str = ""
    """A multi-turn environment as module:Class (rlhf.core.environments; e.g.
    rlhf.core.tasks:BoxLookupEnv for the tool demo): its rewards join reward.functions'."""
    env_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment: a mapping (on the command line in YAML's
    flow form, e.g. rollout.env_args='{latency_s: 0.2}')."""
    max_turns: int = 1
    """Model turns per episode (an environment's observation between turns)."""
    max_observation_tokens: int = 64
    """The longest observation appended (its content is cut to this many tokens)."""
    env_timeout_s: float = 30.0
    """The longest an environment's reset or step may take; past it the episode fails."""
    env_errors: str = "skip"
    """An environment that raises, hangs or returns a malformed step: skip (the prompt's
    group is dropped, counted, and replaced by the next prompt) or stop (the run ends
    with the environment's name and error)."""


@dataclass
class RLAlgoConfig:
    algorithm: str = "grpo"
    """grpo (group-normalised advantages), rloo (leave-one-out baseline), reinforce++
    (batch-whitened returns), all without a critic; ppo (GAE with a critic); or
    rejection (online rejection-sampling fine-tuning, RAFT / ReST: of each prompt's
    samples the best-scoring one (at or above reward.min_score when given) is kept and
    trained with the SFT loss, the others left out; a prompt with none is dropped and
    replaced); or online_dpo (each prompt's samples, scored by the reward sources, made
    into preference pairs by algo.pairs and trained with the DPO loss algo.dpo_loss
    against the reference; a prompt with no pair is dropped and replaced)."""
    scale_rewards: bool = True
    """grpo: divide by the group's reward std (false: Dr. GRPO)."""
    ppo_epochs: int = 1
    """Passes over each batch of samples."""
    mini_batches: int = 1
    """Optimizer updates per pass, each over 1/mini_batches of the batch (must divide
    the micro-batches per worker). With ppo_epochs x mini_batches > 1 the policy that
    sampled is recomputed first, and the clip bounds the later updates."""
    clip_low: float = 0.2
    """Policy ratio clip below 1."""
    clip_high: float | None = None
    """Policy ratio clip above 1 (empty: clip_low; larger: DAPO's clip-higher)."""
    kl_coef: float = 0.02
    """Weight of the KL to the reference (0: no reference model is loaded)."""
    kl_penalty: str = "loss"
    """loss: kl_coef x k3 KL added to the policy loss; reward: -kl_coef x k1 KL added to
    every token's reward (PPO's classic RLHF form; for grpo/rloo the response's summed
    KL is taken off its score before the baseline)."""
    kl_target: float | None = None
    """kl_penalty=reward: adapt kl_coef towards this KL per response (Ziegler et al.
    2019); empty: the coefficient stays fixed."""
    kl_horizon: int = 10000
    """Adaptive KL: responses over which a full correction is made."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (subtracted from the loss)."""
    gamma: float = 1.0
    """ppo, reinforce++: discount over response tokens."""
    lam: float = 0.95
    """ppo: GAE lambda."""
    value_clip: float | None = 0.2
    """ppo: clip of the critic's change per update (empty: plain squared error)."""
    critic_model: str | None = None
    """ppo: the critic's starting point (empty: the policy with a fresh value head; a
    reward model exported by rlhf.rm: its trained head)."""
    critic_learning_rate: float | None = None
    """ppo: the critic's learning rate (empty: the policy's)."""
    rollout_is: str = "auto"
    """Correction for the engine's sampling policy mu against the trainer's proximal
    policy (the policy at the step's start): each token's loss is weighted by
    pi_prox / mu, truncated at rollout_is_cap (tis) or dropped above it (mis); none
    ignores mu. auto: tis when rollout.max_staleness > 0 (stale samples: the decoupled
    PPO objective), none when 0."""
    rollout_is_cap: float = 2.0
    """The largest importance weight kept (tis) or trained on (mis)."""
    dynamic_sampling: bool = False
    """grpo, rloo: drop prompts whose samples all score the same (no learning signal) and
    sample more prompts until the batch is full (DAPO); counted per step."""
    overlong: str = "none"
    """Responses that reach the token budget: none, filter (left out of the loss) or
    penalty (DAPO's soft penalty over the last overlong_buffer tokens)."""
    overlong_buffer: int = 8
    """overlong=penalty: tokens before the budget where the penalty starts."""
    overlong_penalty: float = 1.0
    """overlong=penalty: the penalty at the budget."""
    pairs: str = "best_worst"
    """online_dpo: which of a prompt's samples make pairs (rlhf.core.pairwise.select_pairs):
    best_worst (the best against the worst, RLHFlow's iterative DPO), best_random (the
    best against another drawn at random) or all (every pair at least min_pair_gap
    apart). With reward.judge alone and rollout.samples_per_prompt=2 the pair is the
    judge's own preference (the second sample's P(better than the first))."""
    min_pair_gap: float = 0.0
    """online_dpo: pairs whose scores differ by less (and ties, always) are not made;
    counted per step (train/pairs_dropped)."""
    dpo_loss: str = "sigmoid"
    """online_dpo: the loss on each pair, any of rlhf.dpo's loss.type family (sigmoid =
    DPO, ipo, hinge, robust, bco_pair, ..., or simpo, which needs no reference). The
    reference is loaded for it whatever algo.kl_coef says (the KL is DPO's own: kl_coef
    and rollout_is play no part; the KL to the reference is still reported)."""
    beta: float = 0.1
    """online_dpo: the DPO beta."""
    reference_sync_every: int = 0
    """online_dpo: move the reference towards the policy every this many steps (ref =
    reference_mixup x policy + (1 - reference_mixup) x ref, TR-DPO); 0: the reference
    stays the policy's starting point."""
    reference_mixup: float = 0.6
    """online_dpo: TR-DPO's alpha for reference_sync_every."""


# reward.ensemble's and reward.aggregation's rules (rlhf.core.reward_ensemble's; named
# here so that a config loads without torch, unit/test_rewards.py checks they agree)
ENSEMBLES = ("mean", "min", "uwo", "mean_minus_std")
AGGREGATIONS = ("sum_then_normalise", "normalise_then_sum")


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: ["rlhf.core.tasks:demo_opening"])
    """Reward functions as module:function or module:function=weight, summed."""
    model: str | None = None
    """One reward model (an rlhf.rm export, or any Hugging Face sequence-classification
    model with one output): reward.models=[model] with weight reward.model_weight (the
    name OpenRLHF's reward_pretrain maps to). Served like reward.models, not held by the
    training workers."""
    model_weight: float = 1.0
    """Weight of reward.model's score."""
    clip: float | None = None
    """Clip each response's total reward to [-clip, clip]."""
    models: list[str] = field(default_factory=list)
    """Reward models served beside the engines (each an rlhf.rm export, or a Hugging Face
    sequence-classification model with one output, which scores the decoded text with
    its own tokenizer; a pool of reward.replicas Ray actors per model), scored when a
    sample is made, so that every filter (algo.dynamic_sampling, reward.min_score) sees
    their scores and the training workers hold none of them. Several are one ensemble,
    combined by reward.ensemble; the combined score joins the functions' sum with weight
    reward.models_weight. Each model's score, the combined one and the models'
    disagreement (their std) are logged per step as reward[rm<i>], reward[ensemble],
    reward[ensemble_std]."""
    models_weight: float = 1.0
    """Weight of reward.models' combined score in the sum of reward sources."""
    ensemble: str = "mean"
    """How reward.models' scores become one (Coste et al. 2023): mean; min (worst case,
    WCO); uwo (mean - reward.ensemble_coef x their variance); mean_minus_std (mean -
    reward.ensemble_coef x their std, the penalty in the scores' own units)."""
    ensemble_coef: float = 0.5
    """The disagreement penalty's weight for ensemble=uwo and mean_minus_std."""
    aggregation: str = "sum_then_normalise"
    """How the sources (each function, the environment, the reward models, the remote
    endpoint) become one reward: sum_then_normalise (their weighted sum; the algorithm's
    own normalisation follows) or normalise_then_sum (each source first brought to zero
    mean and unit std within the prompt's samples, then the weighted sum: a source on a
    large scale does not drown one on a small scale; TRL's multi_objective_aggregation,
    GDPO). Needs rollout.samples_per_prompt >= 2."""
    replicas: int = 1
    """Actors serving each of reward.models (requests are cut in batches over them)."""
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    """GPUs per replica actor (fractions share a GPU); 0: on CPUs."""
    timeout_s: float = 120.0
    """A served model's batch with no answer by then is sent again (its replica is
    restarted); twice more, then the run stops, naming the model. Also a remote
    endpoint's timeout per request."""
    min_score: float | None = None
    """Reward thresholds on the rollout-side reward (functions, environment, served
    reward models): a sample scoring below min_score or above max_score is left out of
    the loss (its loss mask zeroed) and counted per step (train/outside_thresholds); a
    prompt all of whose samples are outside is dropped, counted, and replaced."""
    max_score: float | None = None
    remote_url: str = ""
    """A reward served over HTTP (docs/online-rl.md: POST {"prompts", "responses",
    "metadata"} -> {"scores": one number per response}), scored in batches of
    reward.remote_batch_size, reward.timeout_s per request, retried twice. Joins the sum
    with weight reward.remote_weight, logged as reward[remote]."""
    remote_weight: float = 1.0
    remote_batch_size: int = 32
    remote_auth_env: str = "RLHF_REWARD_TOKEN"
    """The environment variable holding the endpoint's token, sent as "Authorization:
    Bearer <token>" when set (never logged; a URL with user:password@ is refused)."""
    remote_errors: str = "skip"
    """An answer that is not {"scores": [one finite number per response]}, or a batch
    that fails all its tries: skip (its prompts' groups are dropped, counted, and
    replaced) or stop (the run ends naming the endpoint and what it answered)."""
    judge: str = ""
    """A pairwise judge as a reward source: a causal LM (an instruction model, or a
    local path) asked which of a sample and a baseline response is better, in both
    orders to cancel position bias, its preference read from its own log-probs of the
    letters A and B (no text parsed); the sample's score is P(sample better than the
    baseline), in [0, 1]. Served like reward.models (reward.replicas actors), logged as
    reward[judge], weighted by reward.judge_weight."""
    judge_weight: float = 1.0
    judge_baseline: str = ""
    """The baseline the judge compares each sample with: a prompt column (the dataset's
    reference answer, reaching the judge as metadata), or empty: the prompt's first
    sample (so the others are scored against it, and it scores 0.5)."""
    gold: str = ""
    """A reward kept out of training, for the reward-hacking monitor: module:function, or
    a reward model (served, one replica). Scored on the same samples, logged as
    reward[gold]; a warning when the training reward rises while gold falls over
    three evaluations."""

    def served(self) -> tuple[list[str], float]:
        """(the reward models to serve as one ensemble, its weight in the sum)."""
        if self.model:
            return [self.model], self.model_weight
        return list(self.models), self.models_weight

    def served_replicas(self) -> int:
        """The actors serving this section: the reward models', the judge's (replicas
        each) and the gold reward model's (one)."""
        return ((len(self.served()[0]) + bool(self.judge)) * self.replicas
                + bool(self.gold and not is_function(self.gold)))


@dataclass
class PPOConfig:
    """Online RL (GRPO, RLOO, REINFORCE++, PPO with a critic, rejection sampling, online
    DPO) with vLLM rollout engines on
    Ray, the policy (and critic) trained by Ray Train + DeepSpeed, prompts through Ray
    Data."""

    PRETRAINED_LR: ClassVar[float] = 1e-6

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to start from (usually an SFT model); also the reference."""
    data: PromptDataConfig = field(default_factory=lambda: PromptDataConfig(
        demo_pairs=256, demo_eval_pairs=32))
    """Prompts."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        global_batch_size=16, micro_batch_size=8, max_steps=24, eval_every=8,
        warmup_ratio=0.0, lr_scheduler="constant", checkpoint_every=0))
    """Iterations, each over train.global_batch_size prompts (algo.ppo_epochs x
    algo.mini_batches optimizer updates each)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """vLLM engines and sampling."""
    algo: RLAlgoConfig = field(default_factory=RLAlgoConfig)
    """Advantages and the policy loss."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Where rewards come from."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray and DeepSpeed."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results land."""
    eval: AfterTrainingConfig = field(default_factory=AfterTrainingConfig)
    """Comparison with the base model after training (rlhf.evaluate)."""

    def __post_init__(self) -> None:
        check_common(self)
        a, r = self.algo, self.rollout
        one_of("rollout.weight_sync", r.weight_sync, ("auto", "shm", "store", "broadcast"))
        if r.sync_timeout_s <= 0:
            raise ConfigError(f"rollout.sync_timeout_s={r.sync_timeout_s}: the weight sync's "
                              "timeout in seconds must be positive (e.g. 600)")
        one_of("rollout.placement", r.placement, ("colocated", "separate"))
        one_of("rollout.env_errors", r.env_errors, ("skip", "stop"))
        one_of("algo.rollout_is", a.rollout_is, ("auto", "none", "tis", "mis"))
        one_of("algo.overlong", a.overlong, ("none", "filter", "penalty"))
        if r.max_staleness < 0:
            raise ConfigError(f"rollout.max_staleness={r.max_staleness} must be 0 (on-policy) "
                              "or more.")
        if r.partial_rollouts and r.chunk_tokens < 1:
            raise ConfigError("rollout.chunk_tokens must be at least 1 with "
                              "rollout.partial_rollouts.")
        if r.max_turns < 1 or (r.max_turns > 1 and not r.environment):
            raise ConfigError(f"rollout.max_turns={r.max_turns}: more than one turn needs an "
                              "environment (rollout.environment=module:Class) to answer the "
                              "model's turns.")
        if r.env_args and not r.environment:
            raise ConfigError("rollout.env_args is given but no rollout.environment.")
        if r.env_timeout_s <= 0:
            raise ConfigError(f"rollout.env_timeout_s={r.env_timeout_s} must be positive.")
        if a.rollout_is_cap <= 1.0:
            raise ConfigError(f"algo.rollout_is_cap={a.rollout_is_cap} must be above 1 (2 is "
                              "usual): weights above it are truncated or dropped.")
        if a.dynamic_sampling and a.algorithm not in ("grpo", "rloo"):
            raise ConfigError("algo.dynamic_sampling drops prompts whose samples all score the "
                              "same, which carry no signal only for grpo and rloo.")
        rw = self.reward
        if rw.model and rw.models:
            raise ConfigError("reward.model and reward.models are both given: list every "
                              f"reward model in reward.models (e.g. reward.models=[{rw.model}, "
                              f"{rw.models[0]}]).")
        one_of("reward.aggregation", rw.aggregation, AGGREGATIONS)
        if rw.aggregation == "normalise_then_sum" and self.rollout.samples_per_prompt < 2:
            raise ConfigError("reward.aggregation=normalise_then_sum normalises each source "
                              "within a prompt's samples: set rollout.samples_per_prompt >= 2.")
        one_of("reward.remote_errors", rw.remote_errors, ("skip", "stop"))
        if rw.remote_url and not rw.remote_url.startswith(("http://", "https://")):
            raise ConfigError(f"reward.remote_url={rw.remote_url!r}: give an http:// or "
                              "https:// URL.")
        if "@" in rw.remote_url.split("//", 1)[-1].split("/", 1)[0]:
            raise ConfigError("reward.remote_url carries credentials (user:password@host): "
                              "take them out and put the endpoint's token in the "
                              f"environment variable ${rw.remote_auth_env} (sent as a Bearer "
                              "token, never logged).")
        if rw.remote_batch_size < 1:
            raise ConfigError("reward.remote_batch_size must be at least 1.")
        one_of("reward.ensemble", rw.ensemble, ENSEMBLES)  # rlhf.core.reward_ensemble's
        if rw.replicas < 1 or rw.timeout_s <= 0:
            raise ConfigError(f"reward.replicas={rw.replicas} and reward.timeout_s="
                              f"{rw.timeout_s}: at least 1 replica, a positive timeout.")
        if (rw.min_score is not None and rw.max_score is not None
                and rw.min_score > rw.max_score):
            raise ConfigError(f"reward.min_score={rw.min_score} is above reward.max_score="
                              f"{rw.max_score}: no sample could be kept.")
        if a.overlong == "penalty" and a.overlong_buffer < 1:
            raise ConfigError("algo.overlong_buffer must be at least 1 token.")
        one_of("algo.algorithm", a.algorithm,
               ("grpo", "rloo", "reinforce++", "ppo", "rejection", "online_dpo"))
        if a.algorithm == "online_dpo":
            check_online_dpo(self)
        one_of("algo.kl_penalty", a.kl_penalty, ("loss", "reward"))
        if a.algorithm == "rejection" and a.kl_penalty == "reward":
            raise ConfigError("algo.algorithm=rejection trains the SFT loss on the kept "
                              "samples, which has no reward to put a KL penalty in: use "
                              "algo.kl_penalty=loss (or algo.kl_coef=0).")
        if (a.algorithm in ("grpo", "rloo", "rejection", "online_dpo")
                and self.rollout.samples_per_prompt < 2):
            raise ConfigError(f"rollout.samples_per_prompt must be at least 2: "
                              f"{a.algorithm} compares the samples of one prompt.")
        if a.ppo_epochs < 1 or a.mini_batches < 1:
            raise ConfigError("algo.ppo_epochs and algo.mini_batches must be at least 1.")
        lo, hi = self.cluster.worker_range
        for world in range(lo, hi + 1):
            per_worker = self.train.global_batch_size // (self.train.micro_batch_size * world)
            if per_worker % a.mini_batches:
                raise ConfigError(
                    f"algo.mini_batches={a.mini_batches} does not divide the {per_worker} "
                    f"micro-batch(es) each of {world} workers runs per step "
                    f"(train.global_batch_size / (train.micro_batch_size x workers)): lower "
                    f"train.micro_batch_size or algo.mini_batches.")
        if not (rw.functions or rw.model or rw.models or r.environment or rw.remote_url
                or rw.judge):
            raise ConfigError("No reward: give reward.functions (module:function), "
                              "reward.models (reward models exported by rlhf.rm), "
                              "reward.judge, reward.remote_url or rollout.environment "
                              "(module:Class), or several.")
        if a.kl_target is not None and a.kl_penalty != "reward":
            raise ConfigError("algo.kl_target adapts the KL penalty in the reward: set "
                              "algo.kl_penalty=reward too.")


# online DPO's loss types: rlhf.dpo's family, less those that need more than a pair's
# log-probs (sft and the reference-free types with an NLL term belong to rlhf.dpo)
ONLINE_DPO_LOSSES = tuple(t for t in DPO_LOSS_TYPES if t != "sft") + ("simpo",)
PAIRINGS = ("best_worst", "best_random", "all")  # rlhf.core.pairwise's


def check_online_dpo(cfg: PPOConfig) -> None:
    a = cfg.algo
    one_of("algo.dpo_loss", a.dpo_loss, ONLINE_DPO_LOSSES)
    one_of("algo.pairs", a.pairs, PAIRINGS)
    if a.beta <= 0:
        raise ConfigError(f"algo.beta={a.beta} must be positive (0.1 is the usual value).")
    if a.min_pair_gap < 0:
        raise ConfigError(f"algo.min_pair_gap={a.min_pair_gap} must be >= 0.")
    if a.kl_penalty == "reward" or a.dynamic_sampling:
        raise ConfigError("algo.algorithm=online_dpo has no reward to shape and forms its "
                          "own pairs: drop algo.kl_penalty=reward and "
                          "algo.dynamic_sampling.")
    if a.reference_sync_every < 0 or not 0.0 < a.reference_mixup <= 1.0:
        raise ConfigError("algo.reference_sync_every must be >= 0 and algo.reference_mixup "
                          "in (0, 1].")
    if a.reference_sync_every and (a.dpo_loss == "simpo" or cfg.model.lora.enabled):
        raise ConfigError("algo.reference_sync_every moves a frozen reference, and there is "
                          "none (algo.dpo_loss=simpo, or LoRA: the reference is the policy "
                          "with its adapters off): set algo.reference_sync_every=0.")
    if a.ppo_epochs * a.mini_batches > 1:
        raise ConfigError("algo.algorithm=online_dpo makes one update per batch of pairs: "
                          "set algo.ppo_epochs=1 and algo.mini_batches=1.")


def is_function(spec: str) -> bool:
    """Whether a reward spec (reward.gold) names a function (module:function) rather
    than a reward model (a folder, builtin:..., s3://..., a hub id)."""
    module, sep, attr = spec.partition(":")
    return bool(sep) and attr.isidentifier() and not spec.startswith("builtin:") \
        and all(part.isidentifier() for part in module.split(".")) and not Path(spec).exists()


def resolved_rollout_is(cfg: Any) -> str:
    """algo.rollout_is with auto resolved: tis for stale samples, none on-policy."""
    if cfg.algo.rollout_is != "auto":
        return cfg.algo.rollout_is
    return "tis" if cfg.rollout.max_staleness > 0 else "none"

