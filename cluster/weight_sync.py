"""Trainer -> vLLM engine weight sync, two CPU-side paths (both reload in place,
cluster.rollout.WeightReloader, then reset the engine's prefix cache):

shm    rank 0 writes the full Hugging Face-named state dict once per iteration as one
       safetensors file in /dev/shm (`publish`, atomic); every engine maps the same file.
       A memory copy on one machine; the engines must share rank 0's machine.
store  the weights travel in buckets of configurable size through Ray's object store:
       every rank walks the weights (ZeRO-3 gathers them one parameter at a time), rank 0
       hands each full bucket to a `WeightStore` actor, which keeps the latest version;
       every engine then pulls the buckets, wherever it runs, and loads them one by one
       (`push_buckets`). The store, not rank 0, owns the buckets, so a restarted engine
       can be re-synced by any worker, and a restarted training worker loses nothing.

Under LoRA the engines hold plain (merged) weights: `policy_weights` merges the adapters
into their base weights.

One weights version is always reloaded in one vLLM `reload_weights` call, whatever the
buckets: vLLM finalises each (fused) layer at the end of a call.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def shm_dir(run_name: str) -> Path:
    """Where a run's weight files live: /dev/shm when it exists (Linux), else tmp."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    d = root / f"rlhf-weights-{run_name}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def policy_weights(state_dict: dict, lora) -> dict:
    """The trainer's gathered state dict as the engines load it: as is for a fully
    trained model; under LoRA (`lora`: the model.lora config section) every weight under
    the base model's names, the adapted ones merged (W + alpha/r * B @ A). All of them,
    not only the adapted: vLLM fuses q/k/v (and gate/up) into one layer and finalises a
    layer once per reload, so a reload with q and v but not k would leave k unset."""
    if not lora.enabled:
        return state_dict
    from cluster.models import dequantize_4bit, merge_lora_state_dict

    return merge_lora_state_dict(dequantize_4bit(state_dict), lora.alpha / lora.r)


def publish(state_dict: dict, directory: Path, version: int) -> Path:
    """Write version `version` of the weights (full tensors, HF names) atomically;
    returns its path. Older versions in `directory` are removed."""
    from safetensors.torch import save_file

    path = directory / f"weights-{version:06d}.safetensors"
    tmp = directory / f".{path.name}.tmp"
    # safetensors wants contiguous tensors that share no memory (tied embeddings do)
    shared = _shared(state_dict)
    tensors = {k: v.detach().contiguous().clone() if v.data_ptr() in shared
               else v.detach().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    for old in directory.glob("weights-*.safetensors"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def _shared(state_dict: dict) -> set[int]:
    seen, shared = set(), set()
    for v in state_dict.values():
        p = v.data_ptr()
        (shared if p in seen else seen).add(p)
    return shared


class WeightStore:
    """Ray actor: the buckets of the latest weights version, as object refs it owns."""

    def __init__(self):
        self.version, self.refs, self.building = 0, [], {}

    def put(self, version: int, index: int, bucket: dict) -> int:
        import ray

        self.building.setdefault(version, {})[index] = ray.put(bucket)
        return sum(int(t.numel()) * t.element_size() for t in bucket.values())

    def seal(self, version: int) -> int:
        """`version` is complete: it replaces the previous one (whose buckets Ray frees)."""
        parts = self.building.pop(version)
        self.version, self.refs = version, [parts[i] for i in sorted(parts)]
        self.building = {v: b for v, b in self.building.items() if v > version}
        return len(self.refs)

    def latest(self) -> tuple[int, list]:
        """(version, [bucket refs]); refs inside a list reach the caller unresolved."""
        return self.version, list(self.refs)


def weight_store():
    """A WeightStore actor on the driver's node (which lives as long as the run, unlike
    a worker node that may be preempted), restarted by Ray if its process dies (it then
    holds version 0, and the next sync refills it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ray.remote(WeightStore).options(
        num_cpus=0, max_restarts=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


def buckets(pairs, max_bytes: int):
    """Group (name, tensor) pairs into dicts of about max_bytes (a tensor larger than
    that gets a bucket of its own). Pairs with tensor None (ZeRO-3 ranks other than 0)
    are consumed and yield nothing, so every rank walks the same gathers."""
    bucket, size = {}, 0
    for name, t in pairs:
        if t is None:
            continue
        n = t.numel() * t.element_size()
        if bucket and size + n > max_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = t.contiguous()
        size += n
    if bucket:
        yield bucket


def push_buckets(store, pairs, version: int, max_bytes: int) -> dict:
    """Rank 0 (the others pass pairs whose tensors are None): hand `pairs` to the store
    bucket by bucket, seal the version. Returns {"buckets", "bytes"}."""
    import ray

    total, n = 0, 0
    for i, bucket in enumerate(buckets(pairs, max_bytes)):
        total += ray.get(store.put.remote(version, i, bucket))  # one bucket in flight
        n += 1
    if n:
        ray.get(store.seal.remote(version))
    return {"buckets": n, "bytes": total}
