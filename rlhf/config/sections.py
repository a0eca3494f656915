"""The sections the entry points share: model (and LoRA), data (pairs, SFT examples,
prompts), loss, train, cluster, output, and the after-training evaluation; the checks
across them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from rlhf.config.base import BUILTIN_DATA, BUILTIN_MODEL, ConfigError, one_of


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
    eval_max_rows: int = 2000
    """At most about this many rows of `path` are held out that way (2,000 pairs give an
    accuracy to +-2%); the rest train. 0: no cap."""
    assistant_marker: str = "\n\nAssistant:"
    """Implicit preference format: the text that opens an assistant turn (hh-rlhf's)."""
    shuffle_buffer: int = 10000
    """Training rows (online RL: prompts) reach each worker shuffled, every epoch in
    another order drawn from `train.seed`: a streaming shuffle through a buffer of this
    many rows per worker, so training starts at once on data of any size (a data set
    smaller than the buffer is shuffled whole, as TRL's sampler does). Data sorted by
    topic or source and larger than the buffer: shuffle the file beforehand. The buffer
    holds tokenised rows in each worker's memory (10,000 pairs of 1,024 tokens: ~250 MB
    of token ids); lower it for very long rows. 0: the source's order."""
    preserve_order: bool = False
    """Keep the source order through the pipeline: with one worker, batches (and so runs,
    shuffled or not: the shuffle is seeded) are reproducible step for step. Costs some
    pipelining."""
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


# The preference objectives (rlhf.core.losses computes them). The DPO family as TRL 1.16's
# DPOTrainer names it (loss_type), all with a reference:
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                  "sft", "sigmoid_norm")
# Paired objectives on the policy alone: no reference is loaded and none runs.
REFERENCE_FREE_TYPES = ("simpo", "cpo", "cpo_hinge", "cpo_ipo", "orpo")
# The types built on the chosen-minus-rejected score, which an f-divergence generalises.
F_DIVERGENCE_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                      "discopop", "sft")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Types that read label_smoothing (cDPO's flip rate, rDPO's, EXO's epsilon).
SMOOTHED_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo")
# Types whose per-pair term depends on the batch's other pairs (they sort over it): on a
# cluster each micro-batch is such a batch, as each device's is in TRL.
BATCH_COUPLED_TYPES = ("aot", "aot_unpaired")
# Types trained with an NLL term on the chosen response unless rpo_alpha says otherwise
# (CPO's cpo_alpha is 1.0 in TRL; ORPO's loss is NLL + lambda * odds-ratio term).
NLL_BY_DEFAULT = ("cpo", "cpo_hinge", "cpo_ipo", "orpo")


@dataclass
class LossConfig:
    type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """The preference objective. With a reference: TRL's DPO family, sigmoid (DPO),
    hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired,
    apo_zero, apo_down, discopop, sft (the chosen NLL), sigmoid_norm; several,
    comma-separated, are summed with loss.weights (MPO: sigmoid,bco_pair,sft). Without
    one (no reference model loaded): simpo, cpo, cpo_hinge, cpo_ipo, orpo (each alone).
    docs/dpo.md says what each does and when to pick it."""
    weights: list[float] | None = None
    """Weight of each loss.type (empty: 1 each), e.g. 0.8,0.2,1.0."""
    beta: float = 0.1
    """Strength of the pull towards the reference (DPO's beta); 0.1 is the usual start,
    raise to 0.2-0.5 if the model drifts or repeats itself. IPO's tau; ORPO's lambda."""
    label_smoothing: float = 0.0
    """Assumed probability that a label is flipped, in [0, 0.5): cDPO for sigmoid, simpo
    and cpo; robust's flip rate; EXO's epsilon (exo_pair needs it > 0, 1e-3 is usual)."""
    rpo_alpha: float | None = None
    """Weight of an NLL term on the chosen response (RPO; CPO's cpo_alpha). Empty: 1 for
    cpo, cpo_hinge, cpo_ipo and orpo, 0 otherwise."""
    precompute_reference: bool = False
    """Compute the reference log-probs once, in a Ray Data pass over an actor pool
    (cluster.reference_actors), and stream them with the pairs: the training workers
    then hold no reference model and run no reference forward."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin, as a fraction of beta (TRL's gamma_beta_ratio; TRL's
    CPO simpo_gamma is this times beta)."""
    f_divergence: str = "reverse_kl"
    """The divergence that holds the policy to the reference (f-DPO): reverse_kl
    (standard DPO), forward_kl, js_divergence, alpha_divergence; the last three for
    sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop and sft."""
    f_alpha: float = 0.5
    """alpha of f_divergence=alpha_divergence."""
    ld_alpha: float | None = None
    """LD-DPO: weight, in [0, 1], of the tokens of the longer response past the shorter
    one's length (against verbosity); empty: every token counts fully."""
    discopop_tau: float = 0.05
    """Temperature of loss.type=discopop (the paper's 0.05)."""
    alphapo: float = 0.0
    """AlphaPO's alpha for cpo and simpo: rewards (1 - p^-alpha) / alpha instead of
    log p (0: off; the paper's range is about 0.1 to 0.5, with simpo)."""
    reference_sync_every: int = 0
    """TR-DPO: every N steps the reference moves towards the policy,
    ref = mixup * policy + (1 - mixup) * ref (0: a frozen reference)."""
    reference_mixup: float = 0.6
    """TR-DPO's alpha: how far the reference moves at each sync, in (0, 1]."""

    @property
    def reference_free(self) -> bool:
        """No reference model is needed (SimPO, CPO, ORPO)."""
        return any(t in REFERENCE_FREE_TYPES for t in self.type)

    @property
    def nll_weight(self) -> float:
        """The chosen-NLL weight the loss adds besides an "sft" type's (rpo_alpha)."""
        if self.rpo_alpha is not None:
            return self.rpo_alpha
        return 1.0 if any(t in NLL_BY_DEFAULT for t in self.type) else 0.0


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
    """Keep the frozen models (the reference) in CPU memory, streamed to
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
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that get every metrics record, the resolved config and the
    final summary (from the run log, rank 0 alone): tensorboard (event files in the run
    directory), wandb, mlflow, or none; several comma-separated (tensorboard,wandb).
    Each reads its usual environment variables: WANDB_PROJECT (default rlhf),
    WANDB_ENTITY, WANDB_MODE (offline: files only), WANDB_DIR (default: the run
    directory), WANDB_API_KEY; MLFLOW_TRACKING_URI (needed: an http(s) tracking server,
    spoken to over its REST API with no package; other URIs need the mlflow package),
    MLFLOW_EXPERIMENT_NAME (default rlhf), MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN.
    Credentials live in the environment: nothing that looks like one is written or
    reported. metrics.jsonl is always written; a tracker failing mid-run is counted in
    summary.json, training goes on. wandb: pip install 'rlhf-ray[trackers]'."""

    # tracker -> (module that must import, package that brings it); mlflow needs none
    # for an http(s) server (rlhf/runlog/trackers.py checks the rest when the run starts)
    TRACKERS: ClassVar[dict[str, tuple[str, str] | None]] = {
        "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
        "mlflow": None}

    def __post_init__(self) -> None:
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("output.push_to_hub=true needs output.hub_model_id=<owner/name>.")
        import importlib.util

        given = self.report_to.split(",") if isinstance(self.report_to, str) else self.report_to
        names = [str(n).strip().lower() for n in given if str(n).strip()]
        names = [] if names == ["none"] else list(dict.fromkeys(names))
        for name in names:
            if name not in self.TRACKERS:
                raise ConfigError(
                    f"output.report_to: unknown tracker '{name}'; choose from "
                    f"{', '.join(self.TRACKERS)} (comma-separated), or none.")
            need = self.TRACKERS[name]
            if need is not None and importlib.util.find_spec(need[0]) is None:
                raise ConfigError(
                    f"output.report_to={name} needs the {need[1]} package, which is not "
                    f"installed: pip install 'rlhf-ray[trackers]' (or pip install {need[1]}).")
        self.report_to = names


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


def check_common(cfg: Any) -> None:
    """Checks shared by every entry point that has model/data/train/cluster sections."""
    m, d, t, c = cfg.model, cfg.data, cfg.train, cfg.cluster
    one_of("model.dtype", m.dtype, ("fp32", "bf16", "fp16"))
    one_of("model.attn_implementation", m.attn_implementation,
            ("sdpa", "eager", "flash_attention_2"))
    one_of("train.lr_scheduler", t.lr_scheduler, ("cosine", "linear", "constant"))
    one_of("cluster.zero_stage", c.zero_stage, (0, 1, 2, 3))
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1).")
    if d.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer={d.shuffle_buffer} must be 0 (the source's "
                          "order) or a number of rows (e.g. 10000).")
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
    one_of("data.format", d.format, ("auto", "explicit", "implicit", "conversational"))
    one_of("data.truncation", d.truncation, ("truncate", "drop"))
    if d.min_score_gap < 0:
        raise ConfigError(f"data.min_score_gap={d.min_score_gap} must be >= 0 (0 keeps "
                          "ties; 1 drops pairs rated less than a point apart).")
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(
            f"data.max_prompt_length={d.max_prompt_length} leaves no room for a response "
            f"within data.max_length={d.max_length}: lower max_prompt_length or raise "
            "max_length.")


def check_precomputed_reference(cfg: Any) -> None:
    """loss.precompute_reference (DPO, KTO): what it cannot go with in any task."""
    if cfg.loss.precompute_reference and cfg.model.lora.load_in_4bit:
        raise ConfigError("loss.precompute_reference loads the reference in model.dtype; with "
                          "4-bit QLoRA the on-the-fly reference (adapters off) is the exact "
                          "one: drop loss.precompute_reference.")


def resolved_learning_rate(cfg: Any) -> float:
    """The learning rate a run uses (see TrainConfig.learning_rate)."""
    if cfg.train.learning_rate is not None:
        return cfg.train.learning_rate
    return 1e-3 if cfg.model.name_or_path == BUILTIN_MODEL else cfg.PRETRAINED_LR

