"""Typed, nested dataclass configs and the one loader that every entry point uses.

A config is a tree of dataclasses. Each field's help text is the string literal written
right under it (an attribute docstring, as in litgpt), read from the source with `ast`, so
the help and the code cannot drift apart. Values come, in order, from the dataclass
defaults, an optional YAML recipe (`--config FILE`), then `key.sub=value` overrides on
the command line. Unknown keys and values of the wrong type fail at once with a message
that says what to change.

This module holds the generic loader and the entry points' configs (DPO, reward model,
SFT); they share most sections.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_DATA = "builtin:demo"
BUILTIN_TOOLS = "builtin:tools"  # the tool demo (rlhf.demo.tool_demo_row)


class ConfigError(ValueError):
    """A config value or combination is wrong; the message says what to change."""


# ---------------------------------------------------------------------------- sections


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters (peft LoRA) instead of all weights. The reference model is
    then the policy with its adapters disabled: no second copy of the model in memory."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Names of the linear modules that get adapters."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base weights in 4-bit NF4 (bitsandbytes). GPU only."""
    merge_on_export: bool = True
    """Merge the adapters into the base weights when exporting `model/`. False saves the
    adapter alone (peft format) next to the tokenizer."""


@dataclass
class ModelConfig:
    name_or_path: str = BUILTIN_MODEL
    """Policy to start from: a local Hugging Face model folder, a hub id (only where the
    hub is reachable), or `builtin:tiny-llama`, a 0.64M-parameter Llama with a byte-level
    BPE tokenizer that the project builds itself (deterministic, cached)."""
    ref_name_or_path: str | None = None
    """Reference model. Empty means the same base as the policy (the usual choice). A
    different model is allowed but must share the tokenizer; you will be warned."""
    dtype: str = "fp32"
    """Weights and compute dtype for every model and adapter: fp32, bf16 or fp16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa, eager or flash_attention_2 (GPU).
    With data.packing, sdpa and eager give way to the project's packed kernel."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA settings."""


@dataclass
class ColumnsConfig:
    prompt: str = "prompt"
    """Column holding the prompt (explicit format). Absent -> implicit prompt format."""
    chosen: str = "chosen"
    """Column holding the preferred response (or whole preferred dialogue)."""
    rejected: str = "rejected"
    """Column holding the dispreferred response (or whole dialogue)."""
    margin: str = ""
    """Optional numeric column: how much better the chosen response is. The reward model
    then needs its score ahead by at least that much (Llama 2's margin loss); DPO ignores
    it. Empty: no margin. Rows where it is missing or not a number are dropped, counted."""


@dataclass
class SourceConfig:
    """Where the rows come from and how they are streamed; shared by every entry point's
    data section (DataConfig for preference pairs, SFTDataConfig for SFT examples)."""

    path: str = BUILTIN_DATA
    """Training data: a .jsonl/.json/.parquet/.csv file (.gz allowed for JSON), a folder
    of them, a folder written by `datasets.save_to_disk`, a hub dataset id (owner/name,
    through datasets.load_dataset and the hub cache; HF_HUB_OFFLINE=1 for the cache
    alone) or a folder laid out as one, an object-storage path (s3://bucket/prefix,
    gs://...; credentials and endpoint from the usual AWS_* / GOOGLE_* variables), or
    `builtin:demo` (pairs the project generates, with a held-out split of unseen
    topics). UltraFeedback (argilla's and HuggingFaceH4's binarized sets) and
    OpenAssistant message tables (oasst1/oasst2) are recognised by their columns."""
    eval_path: str | None = None
    """Held-out data, same forms as `path`. Empty: the held-out split of a multi-split
    data set (test_prefs/test_sft/test_gen for DPO/SFT/PPO, else test, validation,
    eval), the demo's own held-out split, or else `eval_fraction` of `path`, chosen by a
    hash of each row's position (of each tree, for OpenAssistant; stable across runs)."""
    split: str = ""
    """Training split of a multi-split data set (hub id, saved DatasetDict). Empty: the
    entry point's own (train_prefs for DPO and the reward model, train_sft for SFT,
    train_gen for PPO), else train, else the only split."""
    eval_split: str = ""
    """Held-out split of a multi-split data set. Empty: the training split's test_
    counterpart (train_prefs -> test_prefs), else test, validation or eval."""
    subset: str = ""
    """Hub data sets with several configurations: which one (load_dataset's `name`)."""
    revision: str = ""
    """Hub data sets: a branch, tag or commit to load. Empty: the default branch."""
    lang: str = ""
    """OpenAssistant data: keep messages in these languages (comma-separated codes, e.g.
    en or en,de); other messages and what follows them are left out, counted. Empty:
    every language."""
    eval_fraction: float = 0.05
    """Share of `path` held out for evaluation when no held-out data is given."""
    assistant_marker: str = "\n\nAssistant:"
    """Implicit preference format: the text that opens an assistant turn (hh-rlhf's)."""
    preserve_order: bool = False
    """Keep the source order through the pipeline: with one worker, batches (and so runs)
    are reproducible step for step. Costs some pipelining."""
    packing: bool = True
    """Put each micro-batch's sequences back to back in one row with no padding;
    attention stays inside each sequence (flash_attention_2's varlen kernel on a GPU,
    otherwise the project's per-sequence SDPA kernel, which replaces sdpa or eager, and
    which runs a DPO pair's prompt once for both responses). Same log-probs as the
    padded layout, no compute spent on padding."""
    demo_pairs: int = 2400
    """builtin:demo only: number of training pairs to generate (SFT trains on their
    chosen answers)."""
    demo_eval_pairs: int = 256
    """builtin:demo only: number of held-out pairs (topics unseen in training)."""


@dataclass
class DataConfig(SourceConfig):
    """Preference pairs (DPO, reward model)."""

    format: str = "auto"
    """explicit (prompt/chosen/rejected), implicit (two whole dialogues; the prompt is
    their shared prefix up to the last assistant marker), conversational (lists of
    {role, content} messages, rendered with the chat template), or auto (detect)."""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    """Column names in the source; e.g. data.columns.chosen=preferred."""
    max_length: int = 1024
    """Longest prompt + response in tokens."""
    max_prompt_length: int = 512
    """Longest prompt in tokens; longer prompts lose their beginning."""
    truncation: str = "truncate"
    """What to do with pairs over the limits: truncate (prompt from the left, responses
    from the right) or drop. Either way the count is reported."""
    min_score_gap: float = 0.0
    """Data with ratings (UltraFeedback's, or any score_chosen/score_rejected or
    score_gap columns): drop pairs whose chosen score is ahead by less than this, ties
    included, counted. 0 keeps ties. Pairs whose chosen side scored lower are always
    dropped, counted. data.columns.margin=score_gap passes the difference to the
    reward model as its margin."""


@dataclass
class SFTColumnsConfig:
    prompt: str = "prompt"
    """Prompt column (prompt/completion and explicit preference data)."""
    completion: str = "completion"
    """Completion column (prompt/completion data): the text, or the assistant messages,
    the loss is computed on."""
    messages: str = "messages"
    """Conversation column (conversational data): a list of {role, content} messages;
    the loss is computed on the assistant messages."""
    text: str = "text"
    """Plain-text column (text data): the loss is computed on all of it."""
    chosen: str = "chosen"
    """Preference data: the preferred response (or dialogue), trained on as the completion."""
    rejected: str = "rejected"
    """Preference data: the other response; not trained on, but needed to find the
    prompt of implicit (hh-rlhf style) dialogues."""


@dataclass
class SFTDataConfig(SourceConfig):
    """Supervised examples (SFT)."""

    format: str = "auto"
    """prompt_completion (a prompt and its completion, text or messages), conversational
    (a list of messages), text (plain text), preference (the chosen side of preference
    pairs, in any format rlhf.dpo reads), or auto: detect from the first row's columns
    (messages, then completion, then chosen, then text)."""
    columns: SFTColumnsConfig = field(default_factory=SFTColumnsConfig)
    """Column names in the source; e.g. data.columns.completion=response."""
    max_length: int = 1024
    """Longest example in tokens (prompt and completion together)."""
    truncation: str = "keep_start"
    """Examples over max_length: keep_start (their first max_length tokens, as TRL does),
    keep_end (their last ones: long prompts lose their beginning, the completion stays),
    or drop. Either way the count is reported; an example left with no completion token
    is dropped, counted."""
    chat_template: str = ""
    """A Jinja chat template (or a file holding one) for conversational data, when the
    tokenizer has none (most base models) or to replace its own. The export saves it
    with the tokenizer, so DPO, the reward model and PPO on the SFT model render chats
    the same way. Empty: the tokenizer's own."""
    completion_only: bool = True
    """Compute the loss on completion tokens only (the assistant messages of a
    conversation); false: on every token, prompt included. Plain-text data is all
    completion either way."""


@dataclass
class PromptDataConfig(SourceConfig):
    """Prompts for online RL (rlhf.ppo); generation makes the responses."""

    prompt_column: str = "prompt"
    """Column holding the prompt: text, or a list of {role, content} messages (rendered
    with the chat template and its generation prompt). Every other column travels with
    the prompt as metadata for reward functions (e.g. the expected answer)."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens are dropped and counted (cutting a prompt
    would change the task it poses)."""


@dataclass
class LossConfig:
    type: str = "sigmoid"
    """sigmoid (DPO), ipo, hinge, or simpo (reference-free, length-normalised)."""
    beta: float = 0.1
    """Strength of the pull towards the reference (DPO's beta); 0.1 is the usual start,
    raise to 0.2-0.5 if the model drifts or repeats itself."""
    label_smoothing: float = 0.0
    """Conservative DPO (cDPO): assumed probability that a label is flipped, in [0, 0.5)."""
    rpo_alpha: float = 0.0
    """Weight of an NLL term on the chosen response (RPO); 0 disables it."""
    precompute_reference: bool = False
    """Compute the reference log-probs once, in a Ray Data pass over an actor pool
    (cluster.reference_actors), and stream them with the pairs: the training workers
    then hold no reference model and run no reference forward."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin, as a fraction of beta (TRL's gamma_beta_ratio)."""


@dataclass
class TrainConfig:
    learning_rate: float | None = None
    """Peak learning rate. Empty: the usual setting for a pretrained model (DPO 5e-7,
    reward model 1e-5, SFT 2e-5), or 1e-3 for builtin:tiny-llama, which starts from
    random weights."""
    epochs: int = 1
    """Passes over the training data."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run the epochs)."""
    micro_batch_size: int = 4
    """Rows (preference pairs, or SFT examples) per worker per forward pass; a pair is
    two sequences."""
    global_batch_size: int = 8
    """Rows per optimizer step over all workers; gradient accumulation makes up the
    rest: global = micro_batch_size x workers x accumulation steps."""
    warmup_ratio: float = 0.1
    """Share of the steps spent warming the learning rate up linearly from 0."""
    lr_scheduler: str = "cosine"
    """After warm-up: cosine, linear (both decay to 0) or constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    seed: int = 42
    """Seed for weights of new parts (LoRA), dropout and the eval split."""
    eval_every: int = 100
    """Evaluate on the held-out data every N steps (and always at the end); 0: only at
    the end."""
    checkpoint_every: int = 200
    """Save a resumable checkpoint every N steps (and at the end); 0: only at the end."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    resume: bool = False
    """Continue the run named output.name (or the newest run in output.dir) from its last
    checkpoint, without repeating or skipping rows."""
    log_every: int = 1
    """Print and record training metrics every N steps."""


@dataclass
class ClusterConfig:
    address: str | None = None
    """Ray cluster to join. Empty: the one in RAY_ADDRESS (set by `ray job submit`) or
    else a new local Ray started by this process. `auto` joins a running local cluster."""
    num_workers: int | list[int] = 2
    """Training workers (one per GPU on GPU clusters). A range [min, max] makes the run
    elastic: it starts with what the cluster has (at least min), grows when nodes are
    added and goes on at a smaller size when nodes are lost, each time from the latest
    checkpoint; gradient accumulation keeps train.global_batch_size at every size."""
    resize_check_s: float = 60.0
    """Elastic runs: how often Ray Train looks for room for more workers. A resize
    restarts from the latest checkpoint, so keep train.checkpoint_every short enough."""
    use_gpu: bool = False
    """Give each worker one GPU."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per training worker."""
    data_cpus: float = 2.0
    """Logical CPUs added for the Ray Data pipeline when this process starts Ray itself;
    without them the pipeline cannot run beside the workers and training waits forever."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1, 2 or 3 (shards parameters too)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO 1-3; uses DeepSpeed's CPU Adam)."""
    offload_params: bool = False
    """Keep parameters in CPU memory between uses (ZeRO-3 only)."""
    offload_frozen: bool = False
    """Keep the frozen models (reference, PPO's reward model) in CPU memory, streamed to
    the GPU layer by layer at each forward, whatever the policy's ZeRO stage: they only
    run forwards, so this frees their whole weights for the trained models' states at
    the cost of a host-to-GPU copy per forward."""
    reference_actors: int = 1
    """loss.precompute_reference: Ray Data actors holding the reference model."""
    reference_gpus_per_actor: float = 0.0
    """loss.precompute_reference: GPUs per reference actor (0 on CPU)."""
    max_failures: int = 0
    """Restart the workers from the last checkpoint this many times after a failure."""
    storage_path: str | None = None
    """Where Ray Train writes checkpoints. Empty: inside the run directory (fine on one
    machine); multi-node runs need storage every node reaches (s3://bucket/prefix,
    gs://..., NFS). Object storage is reached with the launching machine's credentials
    and endpoint (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for
    S3-compatible stores, GOOGLE_APPLICATION_CREDENTIALS); checkpoints land under
    <storage_path>/<run name>/, and train.resume=true output.name=<run name> continues
    from the newest one there."""

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) training workers; equal unless the run is elastic."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (n[0], n[1])

    @property
    def elastic(self) -> bool:
        lo, hi = self.worker_range
        return lo != hi


@dataclass
class OutputConfig:
    dir: str = "runs"
    """Folder that holds one sub-folder per run."""
    name: str | None = None
    """Run name. Empty: dpo-<date>-<time> (with train.resume: the newest run in `dir`)."""
    push_to_hub: bool = False
    """Upload model/ (weights, tokenizer, model card) to the hub at the end, as
    output.hub_model_id. Credentials from HF_TOKEN (or `hf auth login`), never the
    config. A failed upload is reported with the command to retry; the run stays."""
    hub_model_id: str = ""
    """The hub repository to push to (owner/name)."""
    hub_private: bool = True
    """Create the hub repository private."""

    def __post_init__(self) -> None:
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("output.push_to_hub=true needs output.hub_model_id=<owner/name>.")


@dataclass
class AfterTrainingConfig:
    """Evaluation at the end of a training run (rlhf.evaluate against the run's base)."""

    after_training: bool = False
    """Run rlhf.evaluate on the exported model once training ends; the report lands in
    the run directory's eval/."""
    reward_model: str = ""
    """Judge: a reward model exported by rlhf.rm. Empty: the built-in demo reward model
    on builtin:demo data (otherwise a judge must be given)."""
    max_prompts: int = 128
    """Held-out prompts to compare the two models on."""


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
    """A multi-turn environment as module:Class (rlhf.environments; e.g.
    rlhf.tasks:BoxLookupEnv for the tool demo): its rewards join reward.functions'."""
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
    (batch-whitened returns), all without a critic; or ppo (GAE with a critic)."""
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


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: ["rlhf.tasks:demo_opening"])
    """Reward functions as module:function or module:function=weight, summed."""
    model: str | None = None
    """A reward model exported by rlhf.rm, added to the functions' sum."""
    model_weight: float = 1.0
    """Weight of the reward model's score."""
    clip: float | None = None
    """Clip each response's total reward to [-clip, clip]."""


@dataclass
class PPOConfig:
    """Online RL (GRPO, RLOO, REINFORCE++, PPO with a critic) with vLLM rollout engines on
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
        _one_of("rollout.weight_sync", r.weight_sync, ("auto", "shm", "store", "broadcast"))
        if r.sync_timeout_s <= 0:
            raise ConfigError(f"rollout.sync_timeout_s={r.sync_timeout_s}: the weight sync's "
                              "timeout in seconds must be positive (e.g. 600)")
        _one_of("rollout.placement", r.placement, ("colocated", "separate"))
        _one_of("rollout.env_errors", r.env_errors, ("skip", "stop"))
        _one_of("algo.rollout_is", a.rollout_is, ("auto", "none", "tis", "mis"))
        _one_of("algo.overlong", a.overlong, ("none", "filter", "penalty"))
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
        if a.dynamic_sampling and self.reward.model:
            raise ConfigError("algo.dynamic_sampling filters on rewards known when a sample is "
                              "made (reward.functions, the environment); reward.model scores "
                              "on the trainers, after the filter. Drop one of the two.")
        if a.overlong == "penalty" and a.overlong_buffer < 1:
            raise ConfigError("algo.overlong_buffer must be at least 1 token.")
        _one_of("algo.algorithm", a.algorithm, ("grpo", "rloo", "reinforce++", "ppo"))
        _one_of("algo.kl_penalty", a.kl_penalty, ("loss", "reward"))
        if a.algorithm in ("grpo", "rloo") and self.rollout.samples_per_prompt < 2:
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
        if not self.reward.functions and not self.reward.model and not r.environment:
            raise ConfigError("No reward: give reward.functions (module:function), "
                              "reward.model (a reward model exported by rlhf.rm) or "
                              "rollout.environment (module:Class), or several.")
        if a.kl_target is not None and a.kl_penalty != "reward":
            raise ConfigError("algo.kl_target adapts the KL penalty in the reward: set "
                              "algo.kl_penalty=reward too.")


# ------------------------------------------------------------------------ evaluation


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
        _one_of("dtype", self.dtype, ("fp32", "bf16", "fp16"))
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
        _one_of("general.backend", gt.backend, ("hf", "vllm"))
        if gt.tasks:
            import importlib.util

            if importlib.util.find_spec("lm_eval") is None:
                raise ConfigError("general.tasks needs lm-evaluation-harness: pip install "
                                  "lm-eval (0.4.13 is tested).")
            if gt.include_path and not Path(gt.include_path).expanduser().is_dir():
                raise ConfigError(f"general.include_path={gt.include_path}: no such folder "
                                  "(give the folder holding your lm-eval task YAML files).")


# ------------------------------------------------------------------- cross-field checks


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}.")


def check_common(cfg: Any) -> None:
    """Checks shared by every entry point that has model/data/train/cluster sections."""
    m, d, t, c = cfg.model, cfg.data, cfg.train, cfg.cluster
    _one_of("model.dtype", m.dtype, ("fp32", "bf16", "fp16"))
    _one_of("model.attn_implementation", m.attn_implementation,
            ("sdpa", "eager", "flash_attention_2"))
    _one_of("train.lr_scheduler", t.lr_scheduler, ("cosine", "linear", "constant"))
    _one_of("cluster.zero_stage", c.zero_stage, (0, 1, 2, 3))
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1).")
    if isinstance(c.num_workers, list) and (len(c.num_workers) != 2
                                            or c.num_workers[0] > c.num_workers[1]):
        raise ConfigError(f"cluster.num_workers={c.num_workers}: give one number or a range "
                          "[min, max] with min <= max, e.g. cluster.num_workers=[2,8].")
    lo, hi = c.worker_range
    if lo < 1:
        raise ConfigError(f"cluster.num_workers={c.num_workers} must be at least 1.")
    if t.micro_batch_size < 1:
        raise ConfigError("train.micro_batch_size must be at least 1.")
    if lo == hi and t.global_batch_size % (t.micro_batch_size * lo):
        per_step = t.micro_batch_size * lo
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x cluster.num_workers = {t.micro_batch_size} x {lo} = "
            f"{per_step}: set train.global_batch_size to a multiple of {per_step} (e.g. "
            f"{max(per_step, t.global_batch_size // per_step * per_step)}).")
    # an elastic run may run at any size in its range: the batch must split at each
    bad = [w for w in range(lo, hi + 1) if t.global_batch_size % (t.micro_batch_size * w)]
    if bad:
        import math

        good = [w for w in range(lo, hi + 1) if w not in bad]
        every = t.micro_batch_size * math.lcm(*range(lo, hi + 1))
        raise ConfigError(
            f"cluster.num_workers={c.num_workers}: Ray Train may run this elastic job with "
            f"any number of workers in the range, and train.global_batch_size="
            f"{t.global_batch_size} does not split into micro-batches of "
            f"{t.micro_batch_size} over {', '.join(map(str, bad))} of them. Use a range "
            f"of sizes that divide it ({', '.join(map(str, good)) or 'none here'} do), or a "
            f"global batch size that is a multiple of {every}.")
    if c.offload_params and c.zero_stage != 3:
        raise ConfigError("cluster.offload_params needs cluster.zero_stage=3.")
    if c.offload_optimizer and c.zero_stage == 0:
        raise ConfigError("cluster.offload_optimizer needs cluster.zero_stage 1, 2 or 3.")
    if m.dtype == "fp16" and not c.use_gpu:
        raise ConfigError("model.dtype=fp16 needs GPUs (cluster.use_gpu=true); on CPU use "
                          "fp32 or bf16.")
    if m.lora.load_in_4bit and not m.lora.enabled:
        raise ConfigError("model.lora.load_in_4bit (QLoRA) trains adapters only: also set "
                          "model.lora.enabled=true.")
    if m.lora.load_in_4bit and not c.use_gpu:
        raise ConfigError("model.lora.load_in_4bit needs GPUs: bitsandbytes 4-bit kernels do "
                          "not run on CPU. Set cluster.use_gpu=true on a GPU cluster, or "
                          "drop load_in_4bit (plain LoRA works on CPU).")
    if m.lora.load_in_4bit and c.zero_stage == 3:
        raise ConfigError("4-bit weights cannot be sharded by ZeRO-3: use "
                          "cluster.zero_stage=2 with model.lora.load_in_4bit.")
    if t.learning_rate is not None and t.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate={t.learning_rate} must be positive.")


def check_pairs(cfg: Any) -> None:
    """check_common plus the preference-pair data section."""
    check_common(cfg)
    d = cfg.data
    _one_of("data.format", d.format, ("auto", "explicit", "implicit", "conversational"))
    _one_of("data.truncation", d.truncation, ("truncate", "drop"))
    if d.min_score_gap < 0:
        raise ConfigError(f"data.min_score_gap={d.min_score_gap} must be >= 0 (0 keeps "
                          "ties; 1 drops pairs rated less than a point apart).")
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(
            f"data.max_prompt_length={d.max_prompt_length} leaves no room for a response "
            f"within data.max_length={d.max_length}: lower max_prompt_length or raise "
            "max_length.")


def check_dpo(cfg: DPOConfig) -> None:
    check_pairs(cfg)
    lo = cfg.loss
    _one_of("loss.type", lo.type, ("sigmoid", "ipo", "hinge", "simpo"))
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


def check_rm(cfg: RMConfig) -> None:
    check_pairs(cfg)
    if cfg.model.lora.enabled and not cfg.model.lora.merge_on_export:
        raise ConfigError("A reward model is exported merged, so that it loads as "
                          "AutoModelForSequenceClassification and scores through "
                          "rlhf.scoring: drop model.lora.merge_on_export=false.")
    if cfg.loss.center_coefficient < 0:
        raise ConfigError(f"loss.center_coefficient={cfg.loss.center_coefficient} must be "
                          ">= 0 (0.01 is the usual value, 0 disables centering).")


def check_sft(cfg: SFTConfig) -> None:
    check_common(cfg)
    _one_of("data.format", cfg.data.format,
            ("auto", "prompt_completion", "conversational", "text", "preference"))
    _one_of("data.truncation", cfg.data.truncation, ("keep_start", "keep_end", "drop"))
    if cfg.data.max_length < 2:
        raise ConfigError(f"data.max_length={cfg.data.max_length}: an example needs at "
                          "least 2 tokens (one to predict from, one to predict).")


def resolved_rollout_is(cfg: Any) -> str:
    """algo.rollout_is with auto resolved: tis for stale samples, none on-policy."""
    if cfg.algo.rollout_is != "auto":
        return cfg.algo.rollout_is
    return "tis" if cfg.rollout.max_staleness > 0 else "none"


def resolved_learning_rate(cfg: Any) -> float:
    """The learning rate a run uses (see TrainConfig.learning_rate)."""
    if cfg.train.learning_rate is not None:
        return cfg.train.learning_rate
    return 1e-3 if cfg.model.name_or_path == BUILTIN_MODEL else cfg.PRETRAINED_LR


# ----------------------------------------------------------------- loading and help


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: the string literal under it},
    inherited fields included."""
    docs: dict[str, str] = {}
    for base in cls.__mro__[:0:-1]:
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    source = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(source).body[0].body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert) one value against its annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "null", "none")):
            return None
        lists = [a for a in args if typing.get_origin(a) is list]
        if isinstance(value, list) and lists:  # e.g. int | list[int]: a range
            return _coerce(key, value, lists[0])
        return _coerce(key, value, args[0])
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (e.g. {key}='{{a: 1}}'), got "
                              f"{value!r}.")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}.")
        return [_coerce(key, v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key} must be an integer, got {value!r}.")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}.") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}.") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}.")
        return str(value)
    return value


# Common flags of TRL's trainers (DPOConfig, SFTConfig, RewardConfig, GRPOConfig, ...)
# and OpenRLHF's CLI, and their keys here: unknown keys are pointed at them, and the
# README's table is this one. A value with "=" names the setting, not only the key.
PEER_FLAGS = {
    "beta": "loss.beta", "loss_type": "loss.type", "label_smoothing": "loss.label_smoothing",
    "rpo_alpha": "loss.rpo_alpha", "simpo_gamma": "loss.simpo_gamma",
    "learning_rate": "train.learning_rate", "lr": "train.learning_rate",
    "actor_learning_rate": "train.learning_rate",
    "critic_learning_rate": "algo.critic_learning_rate",
    "num_train_epochs": "train.epochs", "max_epochs": "train.epochs",
    "max_steps": "train.max_steps", "per_device_train_batch_size": "train.micro_batch_size",
    "micro_train_batch_size": "train.micro_batch_size", "train_batch_size":
    "train.global_batch_size", "gradient_accumulation_steps": "train.global_batch_size",
    "warmup_ratio": "train.warmup_ratio", "lr_warmup_ratio": "train.warmup_ratio",
    "lr_scheduler_type": "train.lr_scheduler",
    "lr_scheduler": "train.lr_scheduler", "weight_decay": "train.weight_decay",
    "l2": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "max_norm": "train.max_grad_norm", "seed": "train.seed", "logging_steps":
    "train.log_every", "eval_steps": "train.eval_every", "save_steps":
    "train.checkpoint_every", "save_total_limit": "train.keep_checkpoints",
    "resume_from_checkpoint": "train.resume", "load_checkpoint": "train.resume",
    "max_length": "data.max_length", "max_len": "data.max_length",
    "max_prompt_length": "data.max_prompt_length", "prompt_max_len":
    "data.max_prompt_length", "max_completion_length": "rollout.max_new_tokens",
    "generate_max_len": "rollout.max_new_tokens", "dataset": "data.path",
    "dataset_name": "data.path", "prompt_data": "data.path", "eval_dataset":
    "data.eval_path", "dataset_text_field": "data.columns.text", "chosen_key":
    "data.columns.chosen", "rejected_key": "data.columns.rejected", "prompt_key":
    "data.columns.prompt", "input_key": "data.prompt_column", "padding_free": "data.packing",
    "packing": "data.packing", "packing_samples": "data.packing", "model_name_or_path": "model.name_or_path", "pretrain":
    "model.name_or_path", "ref_model": "model.ref_name_or_path", "ref_pretrain":
    "model.ref_name_or_path", "reward_pretrain": "reward.model", "reward_model":
    "reward.model", "critic_pretrain": "algo.critic_model", "lora_r": "model.lora.r",
    "lora_rank": "model.lora.r", "lora_alpha": "model.lora.alpha", "lora_dropout":
    "model.lora.dropout", "lora_target_modules": "model.lora.target_modules",
    "target_modules": "model.lora.target_modules", "use_peft": "model.lora.enabled",
    "load_in_4bit": "model.lora.load_in_4bit", "gradient_checkpointing":
    "model.gradient_checkpointing", "bf16": "model.dtype=bf16", "fp16": "model.dtype=fp16",
    "torch_dtype": "model.dtype", "attn_implementation": "model.attn_implementation",
    "flash_attn": "model.attn_implementation=flash_attention_2", "zero_stage":
    "cluster.zero_stage", "adam_offload": "cluster.offload_optimizer", "output_dir":
    "output.dir", "save_path": "output.dir", "run_name": "output.name", "num_generations":
    "rollout.samples_per_prompt", "n_samples_per_prompt": "rollout.samples_per_prompt",
    "temperature": "rollout.temperature", "top_p": "rollout.top_p", "init_kl_coef":
    "algo.kl_coef", "kl_coef": "algo.kl_coef", "advantage_estimator": "algo.algorithm",
    "eps_clip": "algo.clip_low", "epsilon": "algo.clip_low", "epsilon_high":
    "algo.clip_high", "ppo_epochs": "algo.ppo_epochs", "num_iterations": "algo.ppo_epochs",
    "gamma": "algo.gamma", "lambd": "algo.lam", "vllm_num_engines": "rollout.engines",
    "vllm_tensor_parallel_size": "rollout.tensor_parallel_size",
    "vllm_gpu_memory_utilization": "rollout.kv_cache_fraction",
}


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every setting of a config tree, dotted (e.g. loss.beta)."""
    hints, out = _hints(cls), []
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            out += _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def suggest(key: str, root: type) -> list[str]:
    """Known keys of `root` an unknown dotted key may mean: the same last name in another
    section (beta -> loss.beta), the key's TRL/OpenRLHF name (per_device_train_batch_size
    -> train.micro_batch_size), then near spellings of the whole key or its last name."""
    import difflib

    known = _leaf_keys(root)
    last = key.rsplit(".", 1)[-1]
    out = [k for k in known if k.rsplit(".", 1)[-1] == last and k != key]
    peer = PEER_FLAGS.get(last.replace("-", "_"))
    if peer and peer.split("=")[0] in known:
        out.append(peer)
    out += difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    lasts: dict[str, list[str]] = {}
    for k in known:
        lasts.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    for name in difflib.get_close_matches(last, list(lasts), n=3, cutoff=0.75):
        out += lasts[name]
    return list(dict.fromkeys(k for k in out if k != key))[:5]


def _build(cls: type, values: dict[str, Any], prefix: str = "",
           root: type | None = None) -> Any:
    """Instantiate a nested dataclass from a nested dict; unknown keys fail, with the
    known keys they may mean (`suggest`)."""
    root = root or cls
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = suggest(full, root)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"Unknown config key '{full}'.{hint} Known keys here: "
                              f"{', '.join(prefix + n for n in names)}.")
        tp = hints[key]
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' is a section; give its keys, e.g. "
                                  f"{full}.{dataclasses.fields(tp)[0].name}=...")
            # Overrides go on top of this section's own default (an entry point may give
            # a section other defaults than the section class has, e.g. rlhf.ppo's train).
            f = next(f for f in dataclasses.fields(cls) if f.name == key)
            if f.default_factory is not dataclasses.MISSING:
                value = _merge(dataclasses.asdict(f.default_factory()), value)
            kwargs[key] = _build(tp, value, full + ".", root)
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{dotted}': '{p}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def help_text(cls: type, prog: str) -> str:
    lines = [f"usage: python -m {prog} [--config RECIPE.yaml] [key.sub=value ...]", "",
             (cls.__doc__ or "").strip(), "",
             "Every field, with its default:"]

    def walk(c: type, prefix: str, default: Any) -> None:
        docs, hints = field_docs(c), _hints(c)
        for f in dataclasses.fields(c):
            val = getattr(default, f.name)
            if _is_section(hints[f.name]):
                lines.append(f"\n  [{prefix}{f.name}] {docs.get(f.name, '')}")
                walk(hints[f.name], f"{prefix}{f.name}.", val)
            else:
                lines.append(f"  {prefix}{f.name} = {val!r}")
                lines.append(textwrap.fill(docs.get(f.name, ""), 88, initial_indent=" " * 6,
                                           subsequent_indent=" " * 6))

    walk(cls, "", cls())
    return "\n".join(lines)


def parse_args(cls: type, argv: list[str], prog: str) -> Any:
    """`--config FILE` and `a.b=value` arguments -> a checked config instance.

    Raises ConfigError with a message meant for the user; prints help and exits on -h.
    """
    import yaml

    if any(a in ("-h", "--help") for a in argv):
        print(help_text(cls, prog))
        raise SystemExit(0)
    tree: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    it = iter(argv)
    for arg in it:
        if arg == "--config" or arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1] if "=" in arg else next(it, ""))
            if not path.is_file():
                raise ConfigError(f"--config {path}: no such file.")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: a recipe must be a mapping of sections.")
            tree = _merge(tree, loaded)
        elif "=" in arg and not arg.startswith("-"):
            key, raw = arg.split("=", 1)
            _set_dotted(overrides, key.lstrip("-"), yaml.safe_load(raw) if raw else None)
        else:
            raise ConfigError(f"Cannot read argument '{arg}': use --config FILE or "
                              "key.sub=value (see --help).")
    try:
        return _build(cls, _merge(tree, overrides))
    except TypeError as e:  # a dataclass rejected something _build let through
        raise ConfigError(str(e)) from None


def load_yaml_config(cls: type, path: str | Path) -> Any:
    return parse_args(cls, ["--config", str(path)], prog="")
