"""What a recipe asks of a cluster, before anything is launched: Ray resources, a per-GPU
memory estimate for each model, and whether both fit the node types of ray-cluster.yaml.

    python -m launch plan launch/recipes/dpo-llama3-8b.yaml [key=value ...]

The memory model (bytes per GPU; P parameters, b bytes per weight in model.dtype, N the
training workers, T the LoRA parameters):
    weights     b*P, /N under ZeRO-3, 0 with parameter offload; LoRA: the frozen base at
                b*P (QLoRA: ~0.55 bytes per parameter) plus b*T
    gradients   b*P (LoRA: b*T), /N from ZeRO-2 on
    optimizer   Adam: 12 bytes per trained parameter in bf16/fp16 (fp32 master + 2
                moments), 8 in fp32; /N from ZeRO-1 on; 0 with optimizer offload
    activations per micro-batch, t tokens: without gradient checkpointing t * layers *
                (6h + 2kv + 4i) * b (a Llama block's saved tensors with fused attention);
                with it t * layers * h * b plus one block's; logits t * vocab * (b + 4)
                (the fp32 log-softmax)
    overhead    2.5 GiB (CUDA context, NCCL) + 5% for allocator fragmentation
Models on one worker hold their states together; activations peak with the largest one
(they train one after the other).
A frozen model (DPO's reference, PPO's reference) counts its weights
alone, /N under ZeRO-3 or cluster.offload_frozen, in host memory with offload; vLLM engines hold the weights / tensor_parallel_size and give the KV cache what
rollout.kv_cache_fraction leaves. These are estimates to catch the run that cannot fit
before it is launched, not a promise that one which fits will: leave a margin.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.deepspeed import frozen_config_for
from rlhf.config import BUILTIN_MODEL, ConfigError, parse_args
from rlhf.config.entry_points import ENTRY_POINTS, TRAINING
from rlhf.data.demo import ensure_tiny_model

GIB = 2**30
OVERHEAD_BYTES = 2.5 * GIB
FRAGMENTATION = 1.05
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Arch:
    """The shape numbers the estimate needs (a Llama-style decoder)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        block = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * block + h

    def module_shape(self, name: str) -> tuple[int, int]:
        """(in, out) of a linear module, for LoRA's r * (in + out) parameters."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[name]


# Architectures of common hub models, so that `plan` needs no download.
KNOWN = {
    "meta-llama/Llama-3.1-8B": Arch(4096, 32, 32, 8, 14336, 128256),
    "meta-llama/Llama-3.1-70B": Arch(8192, 80, 64, 8, 28672, 128256),
    "meta-llama/Llama-3.2-1B": Arch(2048, 16, 32, 8, 8192, 128256, tied=True),
    "meta-llama/Llama-3.2-3B": Arch(3072, 28, 24, 8, 8192, 128256, tied=True),
    "Qwen/Qwen2.5-0.5B": Arch(896, 24, 14, 2, 4864, 151936, tied=True),
    "Qwen/Qwen2.5-7B": Arch(3584, 28, 28, 4, 18944, 152064),
    "Qwen/Qwen2.5-72B": Arch(8192, 80, 64, 8, 29568, 152064),
    "mistralai/Mistral-7B-v0.3": Arch(4096, 32, 32, 8, 14336, 32768),
}


def known_arch(name: str) -> Arch | None:
    """A KNOWN entry by exact hub id, or with an -Instruct/-Chat suffix dropped."""
    return KNOWN.get(name) or KNOWN.get(re.sub(r"-(Instruct|Chat|it)$", "", name))


def arch_from_config(cfg: dict) -> Arch:
    return Arch(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
                heads=cfg["num_attention_heads"],
                kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                tied=bool(cfg.get("tie_word_embeddings", False)))


def resolve_arch(name_or_path: str, arch: str | None = None) -> Arch:
    """The model's shape: `arch` (a hub id in KNOWN or a local folder) if given, else the
    model's own config.json, else KNOWN; a clear error otherwise."""
    for name in ([arch] if arch else []) + [name_or_path]:
        if name == BUILTIN_MODEL:
            name = str(ensure_tiny_model())
        config = Path(name).expanduser() / "config.json"
        if config.is_file():
            return arch_from_config(json.loads(config.read_text()))
        if known_arch(name):
            return known_arch(name)
    raise ConfigError(
        f"cannot tell the shape of {arch or name_or_path}: it is not a local model folder "
        f"here, nor one of {', '.join(sorted(KNOWN))}. Pass --arch with one of those (e.g. "
        "the base model an SFT output path was trained from) or a local folder holding "
        "its config.json.")


# ------------------------------------------------------------------------ memory


@dataclass
class ModelMemory:
    """Bytes per GPU of one model on the training workers."""

    role: str
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    cpu: float = 0.0  # offloaded to host memory (per worker)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def lora_params(arch: Arch, lora: Any) -> int:
    return arch.layers * sum(lora.r * sum(arch.module_shape(m)) for m in lora.target_modules)


def trained_model(role: str, arch: Arch, cfg: Any, world: int, tokens: int,
                  logits: bool = True) -> ModelMemory:
    """A model trained by DeepSpeed: weights, gradients, Adam, activations of one
    micro-batch of `tokens` tokens (logits: a causal LM's log-softmax over the vocab)."""
    b = DTYPE_BYTES[cfg.model.dtype]
    c, lora = cfg.cluster, cfg.model.lora
    P = arch.params
    trained = lora_params(arch, lora) if lora.enabled else P
    opt_per_param = 12 if b == 2 else 8
    stage = c.zero_stage
    m = ModelMemory(role)
    base = 0.55 * P if lora.enabled and lora.load_in_4bit else b * P
    if lora.enabled:
        m.weights = base / (world if stage == 3 else 1) + b * trained
    else:
        m.weights = base / (world if stage == 3 else 1)
    if c.offload_params:
        m.cpu += m.weights
        m.weights = 0.0
    m.gradients = b * trained / (world if stage >= 2 else 1)
    opt = opt_per_param * trained / (world if stage >= 1 else 1)
    if c.offload_optimizer:
        m.cpu += opt
    else:
        m.optimizer = opt
    m.activations = activation_bytes(arch, tokens, b, cfg.model.gradient_checkpointing,
                                     logits)
    return m


def activation_bytes(arch: Arch, tokens: int, b: int, checkpointing: bool,
                     logits: bool = True) -> float:
    h, kv, i = arch.hidden, arch.kv_heads * arch.head_dim, arch.intermediate
    block = tokens * (6 * h + 2 * kv + 4 * i) * b
    saved = arch.layers * tokens * h * b + block if checkpointing else arch.layers * block
    return saved + (tokens * arch.vocab * (b + 4) if logits else 0)


def frozen_model(role: str, arch: Arch, cfg: Any, world: int) -> ModelMemory:
    """A frozen DeepSpeed engine (cluster.deepspeed.frozen_config): sharded under ZeRO-3
    or offload, kept in host memory with offload."""
    zero = frozen_config_for(cfg, world)["zero_optimization"]
    b = DTYPE_BYTES[cfg.model.dtype]
    w = b * arch.params / (world if zero["stage"] == 3 else 1)
    if "offload_param" in zero:
        return ModelMemory(role, cpu=w)
    return ModelMemory(role, weights=w)


def memory_plan(kind: str, cfg: Any, arch: Arch) -> list[ModelMemory]:
    """Per-GPU memory of every model a training worker holds, for entry point `kind`
    (dpo, rm, sft, ppo). An elastic run is planned at its smallest size, where each
    GPU holds the largest ZeRO shards."""
    world, mb = cfg.cluster.worker_range[0], cfg.train.micro_batch_size
    if kind == "ppo":
        tokens = mb * cfg.rollout.samples_per_prompt * (cfg.data.max_prompt_length
                                                        + cfg.rollout.max_new_tokens)
    else:
        tokens = mb * cfg.data.max_length * (2 if kind in ("dpo", "rm") else 1)
    out = [trained_model({"rm": "reward model"}.get(kind, "policy"), arch, cfg, world, tokens,
                         logits=kind != "rm")]
    if kind in ("dpo", "kto") and not getattr(cfg.loss, "reference_free", False) \
            and not cfg.model.lora.enabled \
            and not getattr(cfg.loss, "precompute_reference", False):
        out.append(frozen_model("reference", arch, cfg, world))
    if kind == "ppo":
        if cfg.algo.kl_coef:
            out.append(frozen_model("reference", arch, cfg, world))
        if cfg.algo.algorithm == "ppo":
            out.append(trained_model("critic", arch, cfg, world, tokens, logits=False))
    return out


def gpu_need(models: list[ModelMemory]) -> float:
    """Bytes one training GPU needs: the models' states, the largest model's activations
    (models train one after the other: PPO's critic updates before the policy's
    forward), fragmentation and a fixed overhead."""
    states = sum(m.total - m.activations for m in models)
    peak = max((m.activations for m in models), default=0.0)
    return (states + peak) * FRAGMENTATION + OVERHEAD_BYTES


def engine_need(cfg: Any, arch: Arch) -> float:
    """Bytes per GPU a vLLM engine's weights take (the KV cache gets the rest of
    rollout.kv_cache_fraction)."""
    return DTYPE_BYTES[cfg.model.dtype] * arch.params / cfg.rollout.tensor_parallel_size


# ------------------------------------------------------------------------ resources


@dataclass
class NodeType:
    name: str
    cpus: float
    gpus: int
    gpu_memory: float | None  # bytes per GPU (from labels.gpu, e.g. "H100-80GB")
    max_workers: int
    rollout: bool = False  # labelled rlhf-role=rollout: kept for vLLM engines (placement)


def node_types(cluster_yaml: Path) -> list[NodeType]:
    """The node types of a Ray cluster launcher config that can run work (CPU > 0)."""
    import yaml

    cfg = yaml.safe_load(cluster_yaml.read_text())
    out = []
    for name, t in cfg["available_node_types"].items():
        res = t.get("resources", {})
        if not res.get("CPU"):
            continue
        labels = t.get("labels") or {}
        found = re.search(r"(\d+)\s*GB", labels.get("gpu", ""))
        out.append(NodeType(name, float(res["CPU"]), int(res.get("GPU", 0)),
                            int(found.group(1)) * 10**9 if found else None,
                            int(t.get("max_workers", 0)),
                            labels.get("rlhf-role") == "rollout"))
    return out


@dataclass
class Bundle:
    what: str
    cpus: float
    gpus: float
    count: int = 1
    side: str = "training"  # or "rollout": the vLLM engines


def resource_bundles(kind: str, cfg: Any) -> list[Bundle]:
    """What the run asks of Ray: one bundle per training worker, the data pipeline's
    CPUs, and for PPO one bundle per vLLM engine (all its GPUs on one node) and per
    served reward model replica."""
    c = cfg.cluster
    out = [Bundle("training worker", c.cpus_per_worker, 1 if c.use_gpu else 0,
                  c.worker_range[1])]  # elastic: what the run grows to
    if kind == "ppo":
        r = cfg.rollout
        out.append(Bundle("vLLM engine", r.cpus_per_engine,
                          r.tensor_parallel_size if c.use_gpu else 0, r.engines, "rollout"))
        rw = cfg.reward
        models = rw.served_replicas()
        if models:  # served beside the engines (on rollout nodes when separate)
            out.append(Bundle("reward model replica", rw.cpus_per_replica,
                              rw.gpus_per_replica, models, "rollout"))
    if kind in ("dpo", "kto") and cfg.loss.precompute_reference:
        out.append(Bundle("reference actor", 1, c.reference_gpus_per_actor,
                          c.reference_actors))
    out.append(Bundle("data pipeline", c.data_cpus, 0))
    return out


def nodes_needed(bundles: list[Bundle], node: NodeType) -> int | None:
    """First-fit-decreasing packing of the bundles onto nodes of one type; None when a
    bundle fits no node of that type."""
    items = sorted(((b.gpus, b.cpus) for b in bundles for _ in range(b.count)),
                   reverse=True)
    free: list[list[float]] = []
    for g, c in items:
        if g > node.gpus or c > node.cpus:
            return None
        for f in free:
            if f[0] >= g and f[1] >= c:
                f[0] -= g
                f[1] -= c
                break
        else:
            free.append([node.gpus - g, node.cpus - c])
    return len(free)


@dataclass
class Plan:
    kind: str
    arch: Arch
    models: list[ModelMemory]
    bundles: list[Bundle]
    per_gpu: float
    engine_per_gpu: float | None
    fits: dict[str, str] = field(default_factory=dict)  # node type -> verdict
    ok: bool = False


def make_plan(kind: str, cfg: Any, arch: Arch, types: list[NodeType]) -> Plan:
    models = memory_plan(kind, cfg, arch)
    bundles = resource_bundles(kind, cfg)
    plan = Plan(kind, arch, models, bundles, gpu_need(models),
                engine_need(cfg, arch) if kind == "ppo" else None)
    separate = kind == "ppo" and cfg.rollout.placement == "separate"
    if separate:  # engines on rollout nodes only, training workers on the others
        _fit_separately(plan, cfg, types)
        return plan
    for t in types:
        if cfg.cluster.use_gpu and not t.gpus:
            continue
        verdict = _fits(plan, cfg, t, bundles, engines=kind == "ppo")
        plan.fits[t.name] = verdict
        plan.ok = plan.ok or verdict.startswith("yes")
    return plan


def _fits(plan: Plan, cfg: Any, t: NodeType, bundles: list[Bundle], engines: bool) -> str:
    """Whether `bundles` fit nodes of type t: "yes: N node(s)" or "no: why"."""
    n = nodes_needed(bundles, t)
    if n is None:
        return "no: a single worker or engine does not fit one node"
    if n > t.max_workers:
        return f"no: needs {n} nodes, max_workers is {t.max_workers}"
    trains = any(b.side == "training" for b in bundles)
    if trains and cfg.cluster.use_gpu and t.gpu_memory and plan.per_gpu > t.gpu_memory:
        return (f"no: {plan.per_gpu / GIB:.1f} GiB per training GPU > "
                f"{t.gpu_memory / GIB:.1f} GiB")
    if (engines and plan.engine_per_gpu and t.gpu_memory and cfg.cluster.use_gpu
            and plan.engine_per_gpu > cfg.rollout.kv_cache_fraction * t.gpu_memory):
        return "no: the engine's weights exceed rollout.kv_cache_fraction"
    return f"yes: {n} node(s)"


def _fit_separately(plan: Plan, cfg: Any, types: list[NodeType]) -> None:
    """rollout.placement=separate: the training side on node types without the rollout
    label, the engines on those with it; the plan fits when both sides fit somewhere."""
    sides = {"training": [b for b in plan.bundles if b.side == "training"],
             "rollout": [b for b in plan.bundles if b.side == "rollout"]}
    ok = {}
    for t in types:
        if cfg.cluster.use_gpu and not t.gpus:
            continue
        side = "rollout" if t.rollout else "training"
        verdict = _fits(plan, cfg, t, sides[side], engines=side == "rollout")
        plan.fits[t.name] = f"{side} side: {verdict}"
        ok[side] = ok.get(side, False) or verdict.startswith("yes")
    if not ok.get("rollout"):
        plan.fits["(rollout nodes)"] = ("no node type is labelled rlhf-role: rollout (see "
                                        "ray-cluster.yaml) for rollout.placement=separate")
    plan.ok = ok.get("training", False) and ok.get("rollout", False)


OOM_ADVICE = ("To fit: cluster.zero_stage=3 (shards weights, gradients and optimizer over "
              "the workers), model.lora.enabled=true (LoRA: trains ~1% of the weights; "
              "load_in_4bit for QLoRA), model.gradient_checkpointing=true, a smaller "
              "train.micro_batch_size (the global batch stays, accumulation grows) or "
              "data.max_length, cluster.offload_optimizer=true, or more workers.")


def describe(plan: Plan, cfg: Any) -> str:
    a = plan.arch
    lines = [f"{plan.kind}: {a.params / 1e9:.2f}B parameters ({a.layers} layers, hidden "
             f"{a.hidden}, vocab {a.vocab}), {cfg.model.dtype}, ZeRO-{cfg.cluster.zero_stage}"
             f"{', LoRA r=' + str(cfg.model.lora.r) if cfg.model.lora.enabled else ''}"
             f"{' (4-bit base)' if cfg.model.lora.load_in_4bit else ''}, gradient "
             f"checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}", "",
             "asks Ray for:"]
    for side in ("training", "rollout"):
        group = [b for b in plan.bundles if b.side == side]
        if not group:
            continue
        where = ""
        if side == "rollout":
            where = (" (rollout.placement=separate: nodes labelled rlhf-role=rollout)"
                     if cfg.rollout.placement == "separate" else
                     " (rollout.placement=colocated: wherever there is room)")
            where += (f"; rollouts up to {cfg.rollout.max_staleness} weights version(s) "
                      "behind the policy")
        lines.append(f"  {side} side{where}:")
        for b in group:
            lines.append(f"    {b.count} x {b.what}: {b.cpus:g} CPU" +
                         (f", {b.gpus:g} GPU" if b.gpus else "") +
                         (f" ({b.count * b.gpus:g} GPUs in all)" if b.gpus and b.count > 1
                          else ""))
    lo, hi = cfg.cluster.worker_range
    if lo != hi:
        lines.append(f"  (elastic: {lo} to {hi} training workers, as many as the cluster has "
                     f"room for; nodes are counted for {hi}, memory per GPU at {lo})")
    lines += ["", "per training GPU (estimate):"]
    for m in plan.models:
        parts = [f"weights {m.weights / GIB:.1f}", f"gradients {m.gradients / GIB:.1f}",
                 f"optimizer {m.optimizer / GIB:.1f}", f"activations {m.activations / GIB:.1f}"]
        lines.append(f"  {m.role:<24} {m.total / GIB:6.1f} GiB  (" + ", ".join(parts) + ")"
                     + (f"; {m.cpu / GIB:.1f} GiB offloaded to CPU" if m.cpu else ""))
    lines.append(f"  {'total with overhead':<24} {plan.per_gpu / GIB:6.1f} GiB")
    if plan.engine_per_gpu is not None:
        lines.append(f"  vLLM engine weights per GPU: {plan.engine_per_gpu / GIB:.1f} GiB "
                     f"(KV cache: the rest of rollout.kv_cache_fraction="
                     f"{cfg.rollout.kv_cache_fraction})")
    lines += ["", "node types:"]
    lines += [f"  {k:<20} {v}" for k, v in plan.fits.items()] or ["  (none)"]
    lines.append("")
    lines.append("fits: yes" if plan.ok else "fits: NO. " + OOM_ADVICE)
    return "\n".join(lines)


def plan_recipe(recipe: Path, overrides: list[str], cluster_yaml: Path,
                arch: str | None = None, kind: str | None = None) -> tuple[Plan, Any]:
    """Parse a recipe (plus overrides) as its entry point would and plan it; returns
    (plan, config)."""
    kind = kind or recipe.name.split("-")[0]
    if kind not in TRAINING:
        raise ConfigError(f"{recipe.name}: cannot tell the entry point (the file name starts "
                          f"with one of {', '.join(TRAINING)}, or pass --entry).")
    entry = ENTRY_POINTS[kind]
    cfg = parse_args(entry.config, ["--config", str(recipe), *overrides], entry.module)
    return make_plan(kind, cfg, resolve_arch(cfg.model.name_or_path, arch),
                     node_types(cluster_yaml)), cfg

