"""DeepSpeed configs built from the project's dataclasses (pure, unit-tested), and
the engines built from them.

The config builders import nothing heavy; `train_engine` / `frozen_engine` import
DeepSpeed when called, inside a training worker.
"""

from __future__ import annotations

from typing import Any

from cluster.worker import rank_world

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _precision(dtype: str) -> dict[str, Any]:
    # DeepSpeed, the model weights and any LoRA adapters must agree on one dtype, or the
    # forward fails with "expected scalar type BFloat16 but found Float"; models.py
    # loads every model in this same dtype.
    return {"bf16": {"enabled": dtype == "bf16"},
            "fp16": {"enabled": dtype == "fp16", "initial_scale_power": 16}}


def train_config(*, zero_stage: int, dtype: str, micro_batch_size: int,
                 grad_accum: int, world_size: int, max_grad_norm: float,
                 offload_optimizer: bool = False, offload_params: bool = False,
                 learning_rate: float = 0.0, weight_decay: float = 0.0) -> dict[str, Any]:
    """DeepSpeed config of a trained model (policy, later critic / reward model).

    Batch sizes count sequences *pairs* as DeepSpeed's "samples": only their product
    matters to DeepSpeed's bookkeeping. With offload_optimizer the optimizer is
    DeepSpeed's CPU Adam (declared here); otherwise the caller passes a torch AdamW.
    """
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True,
                    reduce_bucket_size=5e7, allgather_bucket_size=5e7)
    if zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=1e4,
                    stage3_max_live_parameters=1e9, stage3_prefetch_bucket_size=5e7,
                    stage3_gather_16bit_weights_on_model_save=False)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **_precision(dtype),
    }
    if dtype != "fp32":
        # Keep gradients and the data-parallel reduction in fp32: bf16 all-reduce of
        # small gradients loses the digits DPO's margins live in.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["communication_data_type"] = "fp32"
    if offload_optimizer:
        cfg["optimizer"] = {"type": "AdamW", "params": {
            "lr": learning_rate, "betas": [0.9, 0.999], "eps": 1e-8,
            "weight_decay": weight_decay}}
        cfg["zero_force_ds_cpu_optimizer"] = True
    return cfg


def frozen_config(*, zero_stage: int, dtype: str, micro_batch_size: int, world_size: int,
                  offload_params: bool = False) -> dict[str, Any]:
    """DeepSpeed config of a frozen model (reference, reward model): no optimizer.

    Sharded under ZeRO-3, where the policy is sharded too; otherwise a full copy per
    worker is cheaper than gathering it on every forward. offload_params keeps the
    parameters in CPU memory and streams them to the GPU layer by layer at each
    forward; DeepSpeed offloads only under ZeRO-3, so the frozen model is then sharded
    whatever the policy's stage (a frozen model has no gradients or optimizer states,
    so a ZeRO-3 frozen model beside a ZeRO-2 policy costs only the gathers).
    """
    zero: dict[str, Any] = {"stage": 3 if zero_stage == 3 or offload_params else 0}
    if zero["stage"] == 3:
        zero.update(stage3_param_persistence_threshold=1e4, stage3_prefetch_bucket_size=5e7)
        if offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **_precision(dtype),
    }


def frozen_config_for(cfg: Any, world_size: int) -> dict[str, Any]:
    """frozen_config from an entry point's config: the policy's ZeRO stage, in CPU
    memory with cluster.offload_params or cluster.offload_frozen."""
    c = cfg.cluster
    return frozen_config(zero_stage=c.zero_stage, dtype=cfg.model.dtype,
                         micro_batch_size=cfg.train.micro_batch_size, world_size=world_size,
                         offload_params=c.offload_params or c.offload_frozen)


def lr_lambda(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    import math

    if warmup_steps and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _skip_cpu_inference_kernel() -> None:
    """On the CPU accelerator DeepSpeed's torch backend JIT-compiles a shared-memory
    all-reduce kernel when it starts (about 40 s of g++ on a fresh 2-core machine, and
    a compiler the machine must have), used only by `inference_all_reduce` (its
    tensor-parallel inference), which training never calls: ZeRO's reductions go
    through torch.distributed either way. `build_shm_op` returning None is DeepSpeed's
    own path for a machine where the kernel cannot be built. GPUs are left alone."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import importlib

        # not `import deepspeed.comm.torch as m`: that name resolves to torch itself
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _muon_module_without_compiling() -> None:
    """DeepSpeed imports its Muon optimizer's module in every ZeRO engine (to check that
    the optimizer is one it supports, and in the ZeRO stages' set-up), and that module
    wraps three kernels in torch.compile as it is imported, which loads TorchDynamo and
    Inductor: ~2 s of CPU in every training worker at every start, for an optimizer this
    project never configures (its optimizer is AdamW). Imported once here with
    torch.compile a no-op while it loads, so its kernels stay eager (a Muon run would
    still be correct, only slower); nothing else is compiled or changed."""
    import importlib
    import sys

    import torch

    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name in sys.modules:
        return
    real = torch.compile

    def eager(fn=None, *args, **kwargs):
        return fn if callable(fn) else (lambda f: f)

    torch.compile = eager
    try:
        importlib.import_module(name)
    except ImportError:  # a DeepSpeed without Muon: nothing to do
        pass
    finally:
        torch.compile = real


def train_engine(model, ds_config: dict[str, Any], *, learning_rate: float,
                 weight_decay: float, total_steps: int, warmup_steps: int, schedule: str):
    """Wrap a model in a DeepSpeed training engine with AdamW and the LR schedule."""
    import functools

    import deepspeed
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds_config:
        # A client optimizer: DeepSpeed's fused Adam needs CUDA, torch's runs anywhere.
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay,
                                      betas=(0.9, 0.999), eps=1e-8)
    fn = functools.partial(lr_lambda, total_steps=total_steps, warmup_steps=warmup_steps,
                           schedule=schedule)
    _skip_cpu_inference_kernel()
    _muon_module_without_compiling()

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, fn)

    engine, _, _, sched = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer,
        lr_scheduler=scheduler, config=ds_config)
    return engine, sched


def frozen_engine(model, ds_config: dict[str, Any]):
    import deepspeed

    for p in model.parameters():
        p.requires_grad_(False)
    _skip_cpu_inference_kernel()
    _muon_module_without_compiling()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


# -------------------------------------------- moving one engine's weights towards another


def _local(p):
    """What this rank holds of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _share_of(full, p):
    """This rank's share of the full tensor `full`, laid out as ZeRO-3 parameter p's
    partition (the flattened tensor cut in world-size pieces, the last padded), or
    `full` itself where p is not partitioned."""
    import torch

    if not hasattr(p, "ds_tensor"):
        return full
    rank, _ = rank_world()
    n = p.ds_tensor.numel()
    piece = full.reshape(-1)[rank * n:(rank + 1) * n]
    out = torch.zeros(n, dtype=piece.dtype, device=piece.device)
    out[:piece.numel()] = piece
    return out.view(p.ds_tensor.shape)


def blend_parameters(target, source, weight: float) -> None:
    """target <- weight * source + (1 - weight) * target, parameter by parameter, for two
    DeepSpeed engines of one architecture (TR-DPO's reference update). Each rank updates
    what it holds: under ZeRO-3 its partitions (partitioned alike for two engines of one
    world size), otherwise whole tensors; a partitioned target beside a whole source
    (a ZeRO-3 frozen model offloaded beside a ZeRO-0/1/2 policy) takes its share."""
    import torch

    src = dict(source.module.named_parameters())
    with torch.no_grad():
        for name, p in target.module.named_parameters():
            q = src[name]
            if hasattr(q, "ds_tensor") and not hasattr(p, "ds_tensor"):
                raise RuntimeError("a ZeRO-3 source needs a ZeRO-3 target (frozen_config "
                                   "shards the frozen model where the policy is sharded)")
            mine = _local(p)
            theirs = q.ds_tensor if hasattr(q, "ds_tensor") else _share_of(q.data, p)
            mine.mul_(1.0 - weight).add_(theirs.to(mine.device, mine.dtype), alpha=weight)


def load_parameters(engine, state: dict) -> None:
    """Copy full tensors {name: tensor} (from `cluster.checkpoints.gather_state_dict`)
    into the engine's parameters, each rank its share, whatever world size saved them."""
    import torch

    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            mine = _local(p)
            mine.copy_(_share_of(state[name], p).to(mine.device, mine.dtype))


def training_engine(cfg, model, world: int, accum: int, learning_rate: float,
                    total_updates: int, universal: bool = False):
    """`model` in a DeepSpeed training engine: optimizer, schedule and ZeRO stage from
    cfg's train and cluster sections; `accum` micro-batches per optimizer update.
    universal: it will load a checkpoint saved at another world size (see
    cluster.checkpoints.load_engine_state)."""
    t, c = cfg.train, cfg.cluster
    ds_cfg = train_config(
        zero_stage=c.zero_stage, dtype=cfg.model.dtype, micro_batch_size=t.micro_batch_size,
        grad_accum=accum, world_size=world, max_grad_norm=t.max_grad_norm,
        offload_optimizer=c.offload_optimizer, offload_params=c.offload_params,
        learning_rate=learning_rate, weight_decay=t.weight_decay)
    if universal:
        ds_cfg["checkpoint"] = {"load_universal": True}
    engine, _ = train_engine(model, ds_cfg, learning_rate=learning_rate,
                             weight_decay=t.weight_decay, total_steps=total_updates,
                             warmup_steps=int(t.warmup_ratio * total_updates),
                             schedule=t.lr_scheduler)
    return engine
