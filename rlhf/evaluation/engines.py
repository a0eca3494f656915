"""The evaluation's vLLM engine: one at a time (`EngineSlot`, so one GPU is enough), and
one model's pass over the held-out prompts (`model_pass`: samples, their log-probs, the
pairs' log-probs, another model's samples scored).

    engines = EngineSlot(cfg)
    aligned = model_pass(cfg, setup, engines, setup.aligned, items)
    base = model_pass(cfg, setup, engines, setup.base, items, score=aligned["samples"])
"""

from __future__ import annotations

import time

from cluster.vllm_engines import (VLLM_DTYPES, RolloutSettings, rollout_actor,
                                  same_architecture, sample_seed, weight_files)
from rlhf.config import EvalConfig
from rlhf.evaluation.setup import Setup


class EngineSlot:
    """One vLLM engine at a time, so one GPU is enough. The next model reuses the engine
    with its weights reloaded in place (cluster.vllm_engines.WeightReloader, as PPO's weight
    sync does) when it has the same architecture and tokenizer and fits the engine's
    context length; otherwise the engine is killed and another started. A start costs
    ~12 s on 2 CPU cores and more with CUDA graphs; a reload of a small model well under
    a second. `started` and `reloaded` count both, for the results."""

    def __init__(self, cfg: EvalConfig):
        self.cfg, self.actor, self.path, self.max_model_len = cfg, None, None, 0
        self.started = self.reloaded = 0

    def get(self, path: str, max_model_len: int | None = None):
        """The engine, serving `path`, at least max_model_len tokens long and never
        shorter than a prompt with its response, or a held-out pair."""
        import ray

        need = max(max_model_len or 0, self._default_len())
        if self.actor is not None and need <= self.max_model_len:
            if path == self.path:
                return self.actor
            files = weight_files(path)
            if files and same_architecture(self.path, path):
                self.reloaded += 1
                ray.get(self.actor.load_weights.remote(files, self.reloaded))
                self.path = path
                return self.actor
        self.close()
        self.actor = self._start(path, need)
        ray.get(self.actor.ready.remote())
        self.path, self.max_model_len = path, need
        self.started += 1
        return self.actor

    def _default_len(self) -> int:
        d, g = self.cfg.data, self.cfg.generation
        return max(d.max_length, d.max_prompt_length + g.max_new_tokens)

    def _start(self, path: str, max_model_len: int):
        cfg, g = self.cfg, self.cfg.generation
        return rollout_actor(path, RolloutSettings(
            dtype=VLLM_DTYPES[cfg.dtype], max_model_len=max_model_len,
            kv_cache_fraction=g.kv_cache_fraction, tensor_parallel_size=g.tensor_parallel_size,
            seed=cfg.seed), num_cpus=g.cpus_per_engine,
            num_gpus=g.tensor_parallel_size if cfg.cluster.use_gpu else 0)

    def close(self) -> None:
        import ray

        if self.actor is not None:
            ray.kill(self.actor)
        self.actor, self.path, self.max_model_len = None, None, 0


def model_pass(cfg: EvalConfig, setup: Setup, engines: EngineSlot, path: str,
               items: list[dict], score: list[list[dict]] | None = None) -> dict:
    """One model in one engine: its samples for every prompt ({"token_ids", "finish",
    "logp": summed log-prob under this model}), the summed log-probs of each held-out
    pair's chosen and rejected responses, and (score) of other responses."""
    import ray

    g = cfg.generation
    engine = engines.get(path)
    t0 = time.time()
    prompts = [it["prompt_ids"] for it in items]
    seeds = [sample_seed(setup.seed, "evaluate", it["id"], g.samples_per_prompt)
             for it in items]
    outs = ray.get(engine.generate.remote(
        prompts, n=g.samples_per_prompt, temperature=g.temperature, top_p=g.top_p,
        max_tokens=g.max_new_tokens, seeds=seeds))
    gen_s = time.time() - t0

    def summed(pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        lps = ray.get(engine.sequence_logprobs.remote([p + r for p, r in pairs],
                                                      [len(p) for p, _ in pairs]))
        return [sum(x) for x in lps]

    samples = [[{"token_ids": s["token_ids"], "finish": s["finish_reason"]} for s in o]
               for o in outs]
    own = summed([(p, s["token_ids"]) for p, o in zip(prompts, samples) for s in o])
    flat = iter(own)
    for o in samples:
        for s in o:
            s["logp"] = next(flat)
    with_pair = [it["pair"] for it in items if it["pair"] is not None]
    out = {"samples": samples, "generate_s": gen_s,
           "chosen": summed([(p, c) for p, c, _ in with_pair]) if with_pair else [],
           "rejected": summed([(p, r) for p, _, r in with_pair]) if with_pair else []}
    if score is not None:
        out["other"] = summed([(p, s["token_ids"]) for p, o in zip(prompts, score)
                               for s in o])
    return out

