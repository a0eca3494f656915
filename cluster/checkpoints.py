"""Checkpoints of a training run through Ray Train: DeepSpeed's sharded engine state with
each rank's data position, restored at the same or (elastic) another number of workers;
and the full weights gathered for export or weight sync.

    save_checkpoint(engine, worker_state, metrics, step, extra=write_more_files)
    restored = load_checkpoint(engine, folder, universal=saved_world_size(folder) != world)
    full = gather_state_dict(engine, zero_stage)          # rank 0: {name: tensor}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cluster.worker import all_gather_objects, all_sum, rank_world, say


def save_checkpoint(engine, worker_state: dict, metrics: dict, step: int,
                    extra=None) -> None:
    """Every rank: DeepSpeed's sharded state + this rank's data position -> Ray Train.

    Ray Train merges the ranks' folders into one checkpoint. `extra(folder)` may add
    files (the final export).
    """
    import ray.train

    rank, _ = rank_world()
    with tempfile.TemporaryDirectory(prefix="rlhf-ckpt-") as tmp:
        # Frozen weights (a LoRA base) are reloaded from the model path, not saved.
        engine.save_checkpoint(tmp, tag="deepspeed", exclude_frozen_parameters=True)
        if extra is not None:
            extra(Path(tmp))
        state = dict(worker_state)
        consumed = np.asarray(state.pop("consumed"), dtype=np.int64)
        np.save(Path(tmp) / f"consumed_rank{rank}.npy", consumed)
        (Path(tmp) / f"state_rank{rank}.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{step:07d}")


def saved_world_size(path: str) -> int:
    """How many workers saved the checkpoint at `path` (one state file each)."""
    return len(list(Path(path).glob("state_rank*.json")))


def load_engine_state(engine, path: str, tag: str, universal: bool = False) -> None:
    """engine.load_checkpoint(path, tag), or, when the checkpoint was saved by another
    number of workers (an elastic resize), through DeepSpeed's universal checkpoint: ZeRO
    partitions optimizer states (and, at stage 3, weights) by world size, so the saved
    shards are first merged per parameter (deepspeed.checkpoint.ds_to_universal), once
    per node, and the engine (built with checkpoint.load_universal) re-partitions them
    for its own world. Stage 0 keeps whole states and loads at any size as it is."""
    if not universal:
        _load(engine, path, tag)
        return
    import ray

    key = hashlib.sha1(f"{Path(path).resolve()}/{tag}".encode()).hexdigest()[:16]
    # The first rank on each Ray node converts. Not "local rank 0": Ray Train numbers
    # local ranks per IP, and nodes may share one (and /tmp) on a test machine.
    node = ray.get_runtime_context().get_node_id()
    converts = all_gather_objects(node).index(node) == rank_world()[0]
    root = Path(tempfile.gettempdir()) / "rlhf-universal" / f"{key}-{node[:12]}"
    out = root / f"{tag}_universal"
    if converts and not out.is_dir():
        tmp = root / f"{tag}_converting"
        shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted conversion left
        t0 = time.time()
        procs = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
        done = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
             "--input_folder", str(Path(path) / tag), "--output_folder", str(tmp),
             "--inject_missing_state", "--num_extract_workers", procs,
             "--num_merge_workers", procs], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"converting checkpoint {path}/{tag} for a new number of workers failed "
                f"(deepspeed.checkpoint.ds_to_universal):\n{done.stdout[-2000:]}"
                f"{done.stderr[-2000:]}")
        tmp.rename(out)
        say(f"checkpoint {tag} re-sharded for {rank_world()[1]} workers in "
            f"{time.time() - t0:.0f} s")
    all_sum([0.0])  # a barrier: every node's copy is ready
    _load(engine, str(root), out.name)
    all_sum([0.0])  # every rank has read it: the copy (a whole model's states) can go
    if converts:
        shutil.rmtree(root, ignore_errors=True)


def _load(engine, path: str, tag: str) -> None:
    """engine.load_checkpoint, failing where DeepSpeed would only warn (a missing folder
    makes it skip the load and return None)."""
    load_path, _ = engine.load_checkpoint(path, tag=tag, load_module_strict=False)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {path}")


def load_checkpoint(engine, path: str, universal: bool = False) -> dict:
    """Restore engine state (see load_engine_state); return {"consumed": set of ids,
    "states": [per-rank dicts]}."""
    load_engine_state(engine, path, "deepspeed", universal)
    root = Path(path)
    consumed: set[int] = set()
    for f in sorted(root.glob("consumed_rank*.npy")):
        consumed.update(int(x) for x in np.load(f))
    states = [json.loads(f.read_text()) for f in sorted(root.glob("state_rank*.json"))]
    return {"consumed": consumed, "states": states}


def iter_state_dict(engine, zero_stage: int):
    """(name, full tensor on CPU) for every weight of the engine's module, on rank 0;
    (name, None) on the other ranks, which must iterate too (under ZeRO-3 each parameter
    is gathered by all ranks together, one at a time, so no rank ever holds more than one
    unsharded parameter beyond what it already has)."""
    rank, _ = rank_world()
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name, (p.data.detach().cpu().clone() if rank == 0 else None)
        keys = module.state_dict().keys()
        for name, b in module.named_buffers():
            if name in keys:
                yield name, (b.detach().cpu().clone() if rank == 0 else None)
    elif rank == 0:
        for k, v in module.state_dict().items():
            yield k, v.detach().cpu().clone()


def gather_state_dict(engine, zero_stage: int) -> dict | None:
    """Full weights of the engine's module on rank 0's CPU (None on other ranks); see
    `iter_state_dict`."""
    rank, _ = rank_world()
    out = dict(iter_state_dict(engine, zero_stage))
    return out if rank == 0 else None

