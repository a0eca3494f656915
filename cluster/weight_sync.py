"""Trainer -> vLLM engine weight sync, CPU path: a safetensors file in shared memory.

The trainer's rank 0 writes the full Hugging Face-named state dict once per iteration
(`publish`), every engine maps the same file and reloads in place
(cluster.rollout.RolloutEngine.load_weights), and the previous version's file is
removed. On one machine /dev/shm makes this a memory copy; engines on other nodes need
the directory on storage they all reach (or the GPU path: a NCCL group, next step).

Under LoRA the engines hold plain (merged) weights: `policy_weights` merges the adapters
into their base weights and keeps only the modules LoRA changes, since the rest of the
engines' weights stay the base model's for the whole run.
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
    trained model; under LoRA (`lora`: the model.lora config section) the merged weights
    W + alpha/r * B @ A of the adapted modules (and peft's fully trained copies, if
    any), under the base model's names."""
    if not lora.enabled:
        return state_dict
    from cluster.models import dequantize_4bit, merge_lora_state_dict

    prefix = "base_model.model."
    changed = set()
    for key in state_dict:
        key = key[len(prefix):] if key.startswith(prefix) else key
        if ".lora_A." in key:
            changed.add(key.split(".lora_A.")[0] + ".weight")
        elif ".modules_to_save.default." in key:
            changed.add(key.replace(".modules_to_save.default.", "."))
    merged = merge_lora_state_dict(dequantize_4bit(state_dict), lora.alpha / lora.r)
    return {k: merged[k] for k in sorted(changed)}


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
