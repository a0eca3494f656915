"""Trainer -> vLLM engine weight sync, three paths (all reload in place,
cluster.vllm_engines.WeightReloader, then reset the engine's prefix cache):

shm    rank 0 writes the full Hugging Face-named state dict once per iteration as one
       safetensors file in /dev/shm (`publish`, atomic); every engine maps the same file.
       A memory copy on one machine; the engines must share rank 0's machine.
store  the weights travel in buckets of configurable size through Ray's object store:
       every rank walks the weights (ZeRO-3 gathers them one parameter at a time), rank 0
       hands each full bucket to a `WeightStore` actor, which keeps the latest version;
       every engine then pulls the buckets, wherever it runs, and loads them one by one
       (`push_buckets`). The store, not rank 0, owns the buckets, so a restarted engine
       can be re-synced by any worker, and a restarted training worker loses nothing.
broadcast  training rank 0 and every engine worker form a torch.distributed process group
       of their own (NCCL between GPUs, gloo on CPU; beside DeepSpeed's, which it never
       touches), and rank 0 broadcasts the buckets straight into the engines' reload
       (`BroadcastSender`, `receive_buckets`): no copy on disk or in the object store,
       every collective under `rollout.sync_timeout_s`, a failure names the engine.
       Nothing keeps the weights, so an engine that restarts is re-synced by the whole
       training group (ZeRO-3 gathers need every rank) at the start of the next step;
       one lost in the middle of a step ends the attempt and Ray Train resumes from the
       last checkpoint.

Under LoRA the engines hold plain (merged) weights: `policy_weights` merges the adapters
into their base weights.

One weights version is always reloaded in one vLLM `reload_weights` call, whatever the
buckets: vLLM finalises each (fused) layer at the end of a call.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cluster.checkpoints import gather_state_dict, iter_state_dict
from cluster.engine_client import engine_state
from cluster.models import dequantize_4bit, merge_lora_state_dict


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


# ------------------------------------------------------------------ broadcast


def rendezvous(host: str, port: int, world: int, timeout_s: float, host_it: bool = False):
    """The group's rendezvous store: hosted by rank 0 (host_it; port 0 picks a free port,
    read it back from `.port`), joined by the others at (host, port)."""
    import datetime

    import torch.distributed as dist

    return dist.TCPStore(host, port, world, host_it, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def new_group(store, rank: int, world: int, backend: str, timeout_s: float, name: str):
    """A process group of its own (not torch.distributed's default one, which DeepSpeed
    owns), over `store` (see `rendezvous`). Blocks until all `world` ranks have joined
    or `timeout_s` passes; every later collective has the same timeout.
    backend: "nccl" (GPUs) or "gloo" (CPU)."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.PrefixStore(name, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    raise ValueError(f"backend {backend!r}: nccl or gloo")


def _broadcast(group, tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def send_buckets(group, pairs, max_bytes: int, device: str = "cpu") -> dict:
    """Rank 0 of `group`: broadcast `pairs` (name, tensor; None entries skipped) bucket by
    bucket. Each bucket is three broadcasts: a header (int64 [meta bytes, data bytes]),
    the names, dtypes and shapes (JSON, uint8), and the tensors' bytes back to back
    (uint8); a header of zeros ends the version. Returns {"buckets", "bytes"}."""
    import json

    import torch

    n, total = 0, 0
    for bucket in buckets(pairs, max_bytes):
        meta, flat = [], []
        for name, t in bucket.items():
            meta.append([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
            flat.append(t.reshape(-1).view(torch.uint8))
        data = torch.cat(flat).to(device)
        head = torch.frombuffer(bytearray(json.dumps(meta).encode()),
                                dtype=torch.uint8).to(device)
        _broadcast(group, torch.tensor([head.numel(), data.numel()], device=device))
        _broadcast(group, head)
        _broadcast(group, data)
        n, total = n + 1, total + data.numel()
    _broadcast(group, torch.zeros(2, dtype=torch.int64, device=device))
    return {"buckets": n, "bytes": total}


def receive_buckets(group, device: str = "cpu"):
    """An engine worker's side of `send_buckets`: yields (name, tensor) as the buckets
    arrive (one bucket in memory at a time), for vLLM's reload_weights to consume."""
    import json

    import torch

    while True:
        size = torch.zeros(2, dtype=torch.int64, device=device)
        _broadcast(group, size)
        meta_n, data_n = (int(x) for x in size.tolist())
        if meta_n == 0:
            return
        head = torch.empty(meta_n, dtype=torch.uint8, device=device)
        _broadcast(group, head)
        data = torch.empty(data_n, dtype=torch.uint8, device=device)
        _broadcast(group, data)
        offset = 0
        for name, dtype, shape in json.loads(bytes(head.cpu().tolist()).decode()):
            dt = getattr(torch, dtype)
            nbytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dt).element_size()
            yield name, data[offset:offset + nbytes].view(dt).view(shape)
            offset += nbytes


class WeightSyncError(RuntimeError):
    """The weights did not reach an engine; the message names it."""


class BroadcastSender:
    """Training rank 0's end of the broadcast path. The group (rank 0 + every worker of
    every engine; engine i's worker w is rank 1 + i * tp + w) is formed on first use and
    again whenever an engine has lost it (a restarted engine reports another group)."""

    def __init__(self, engines: list, tensor_parallel_size: int, backend: str,
                 timeout_s: float, bucket_bytes: int):
        self.engines, self.tp = engines, tensor_parallel_size
        self.backend, self.timeout_s, self.bucket_bytes = backend, timeout_s, bucket_bytes
        self.device = "cuda" if backend == "nccl" else "cpu"
        self.group, self.name, self.store = None, None, None

    def _connect(self) -> None:
        import uuid

        import ray

        host = ray.util.get_node_ip_address()
        world = 1 + len(self.engines) * self.tp
        self.group, self.name = None, f"rlhf-sync-{uuid.uuid4().hex[:8]}"
        self.store = rendezvous(host, 0, world, self.timeout_s, host_it=True)
        refs = [e.join_group.remote(host, self.store.port, 1 + i * self.tp, world,
                                    self.backend, self.timeout_s, self.name)
                for i, e in enumerate(self.engines)]
        group = new_group(self.store, 0, world, self.backend, self.timeout_s, self.name)
        ray.get(refs, timeout=self.timeout_s)
        self.group = group

    def send(self, pairs, version: int) -> dict:
        """Broadcast one weights version to every engine (`pairs`: see `buckets`; it is
        consumed whatever happens, so ZeRO-3 ranks stay in step); returns
        {"buckets", "bytes"}. Raises WeightSyncError naming the engines that are down."""
        import ray

        what = "forming the weight-sync group"
        try:
            if self.group is None or any(s.get("group") != self.name
                                         for s in self._states()):
                self._connect()
            what = f"broadcasting weights version {version}"
            refs = [e.receive_weights.remote(version) for e in self.engines]
            sent = send_buckets(self.group, pairs, self.bucket_bytes, self.device)
            ray.get(refs, timeout=self.timeout_s)
        except (RuntimeError, TimeoutError, ray.exceptions.RayError) as e:
            self.group = None  # a broken group is formed anew next time
            for _ in pairs:  # the other ranks' gathers go on to the end
                pass
            raise WeightSyncError(self._who_failed(what, e)) from e
        return sent

    def _states(self) -> list[dict]:
        import ray

        return ray.get([e.ready.remote() for e in self.engines], timeout=self.timeout_s)

    def _who_failed(self, what: str, error: Exception) -> str:
        import ray

        down = []
        for i, e in enumerate(self.engines):
            try:
                ray.get(e.ready.remote(), timeout=10)
            except Exception as x:  # noqa: BLE001 - any failure names the engine
                down.append(f"engine {i} ({type(x).__name__})")
        peers = ", ".join(down) if down else "no engine is down; one may be stuck or slow " \
            "(raise rollout.sync_timeout_s, check the engines' logs)"
        return f"weight sync failed while {what}: {peers}. Cause: {error}"



class WeightPublisher:
    """Every training rank's side of the weight sync: the policy's weights as one version,
    by the run's path (rollout.weight_sync resolved: shm, store or broadcast). Rank 0
    writes the file, fills the store or broadcasts; under ZeRO-3 every rank takes part
    in the gathers (one parameter at a time; LoRA policies are merged first, on rank 0)."""

    def __init__(self, cfg, rank: int, sync: str, weights_dir: str, store, engines: list):
        self.cfg, self.rank, self.sync = cfg, rank, sync
        self.weights_dir, self.store, self.engines = Path(weights_dir), store, engines
        self.broadcast = None  # rank 0's BroadcastSender on the broadcast path
        if sync == "broadcast" and rank == 0:
            r = cfg.rollout
            self.broadcast = BroadcastSender(
                engines, r.tensor_parallel_size, "nccl" if cfg.cluster.use_gpu else "gloo",
                r.sync_timeout_s, int(r.sync_bucket_mb * 2**20))
        self.bytes = 0  # the last version's size (rank 0)

    def publish(self, engine, version: int) -> None:
        c, lora = self.cfg.cluster, self.cfg.model.lora
        if self.sync in ("store", "broadcast") and not lora.enabled:  # a bucket at a time
            pairs = iter_state_dict(engine, c.zero_stage)
        else:  # the whole state on rank 0 (LoRA: merged first)
            full = gather_state_dict(engine, c.zero_stage)
            pairs = (policy_weights(full, lora) if self.rank == 0 else {}).items()
        if self.sync == "broadcast":
            if self.broadcast is not None:
                if self.broadcast.group is None:  # about to form it (first sync, or anew)
                    for e in self.engines:  # a slow (re)start is waited for, not timed out
                        engine_state(e)
                self.bytes = self.broadcast.send(pairs, version)["bytes"]
            else:
                for _ in pairs:  # ZeRO-3: rank 0's gathers need every rank
                    pass
            return
        if self.sync == "store":
            sent = push_buckets(self.store, pairs, version,
                                int(self.cfg.rollout.sync_bucket_mb * 2**20))
        elif self.rank == 0:
            sent = {"bytes": publish(dict(pairs), self.weights_dir, version).stat().st_size}
        if self.rank == 0:
            self.bytes = sent["bytes"]
