"""The training side of online RL (rlhf.ppo): the Task the shared worker loop
(rlhf/train/loop.py) runs on every Ray Train worker, over the rollouts the coordinator
(rlhf/online/coordinator.py) makes.

One step, on every worker, over its share of the step's rollout records; each phase is a
named, timed block (metrics time/<phase>_s), in this order:
    generate      `RolloutFeed` (rlhf/online/feed.py) takes this rank's micro-batches of
                  the step's batch from the coordinator (at max_staleness 0 it waits for
                  their generation; above, they were made while earlier steps trained)
    score         reward.clip on the rollout-side reward (functions, environment, the
                  served reward models, a remote endpoint: scored when the sample was
                  made; the training workers hold no reward model)
    reference     the frozen reference's per-token log-probs (for the KL)
    old_logprobs  with several updates per batch, or the KL in the reward, the proximal
                  policy's log-probs (the policy at the step's start) recomputed
    values        PPO: the critic's values (rlhf/online/critic.py)
    advantages    rlhf/core/rl_advantages.py (grpo, rloo, reinforce++, ppo)
    critic, forward, backward, optimizer
                  algo.ppo_epochs x algo.mini_batches updates: PPO's critic first (its
                  clipped value loss), then `rlhf.core.losses.online_rl_loss`: the clipped
                  ratio to the proximal policy, weighted by the rollout correction
                  pi_prox / mu (algo.rollout_is: tis, mis or none) against the engine's
                  behaviour log-probs, + k3 KL - entropy bonus, the token mean over the
                  (mini-)batch; observation tokens masked out. rejection: the SFT
                  loss on the kept samples; online_dpo: the DPO loss of algo.dpo_loss on
                  the coordinator's (chosen, rejected) pairs against the reference, the
                  mean over the global batch's pairs (stale pairs need no correction:
                  DPO's loss is defined for pairs from any policy)
    sync          the weights are published for the engines (rollout.weight_sync); the
                  coordinator loads them when its staleness bound asks for them (on the
                  broadcast path rank 0 pushes them into the engines itself)
`begin_step` runs score .. advantages, `micro_step` the updates, `end_step` the sync.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import ray
import torch

from cluster.weight_sync import WeightPublisher
from cluster.worker import all_sum, rank_world, say
from rlhf.config import PPOConfig, resolved_rollout_is
from rlhf.core.advantages import AdaptiveKLController, kl_estimate
from rlhf.core.logprobs import (model_inputs, response_batch, right_padded, scored_positions,
                                scored_token_logprobs)
from rlhf.core.losses import dpo_loss, entropy_from_logits, kept_samples_loss, online_rl_loss
from rlhf.core.reward_monitor import hacking_warnings, length_correlation, length_sums
from rlhf.core.rewards import reward_spec, shape_scores
from rlhf.core.rl_advantages import assign_advantages
from rlhf.core.rollouts import RolloutRecord, record_tables, staleness_counts
from rlhf.data.prompts import PROMPTS
from rlhf.online.critic import Critic
from rlhf.online.feed import RolloutFeed
from rlhf.train.moving_reference import MovingReference
from rlhf.train.tasks.base import SequenceTask

BUFFER_FILE = "rollout_buffer.json"


class RLTask(SequenceTask):
    """Online RL from the coordinator's rollouts (rlhf.ppo): GRPO, RLOO, REINFORCE++, PPO,
    rejection sampling, online DPO."""

    config_cls = PPOConfig
    prefix = "ppo"
    rows = PROMPTS
    # the monitor's curves (gold, disagreement, length correlation) where the run has them
    plot_keys = ("loss", "reward", "kl", "reward[gold]", "reward[ensemble_std]",
                 "reward_length_corr")
    name = "prompts"
    eval_at_start = True  # the reward before training, to compare the end with
    train_from_shard = False  # the coordinator reads the prompts

    # per-step sums; every rank reports every key (they are all-reduced by position)
    SUMS = ("loss", "kl", "tokens", "reward", "reward_sq", "responses", "response_tokens",
            "gap", "gap_tokens", "gap_fresh", "fresh_tokens", "clipped", "entropy",
            "value_loss", "value_clipped", "is_weight", "is_limited", "turns",
            "tool_calls", "tool_episodes", "partial", "staleness", "length", "length_sq",
            "reward_length", "pairs", "pair_loss", "pair_accuracy", "pair_margin",
            "pair_score_gap")
    MAXES = ("max:is_weight", "max:staleness", "max:gap")
    # the coordinator's, per step
    BATCH_STATS = ("generate_s", "env_s", "env_failures", "outside_thresholds", "rejected",
                   "pairs", "pairs_dropped", "paired_groups_reward", "paired_groups_samples")

    @property
    def updates_per_step(self) -> int:
        return self.cfg.algo.ppo_epochs * self.cfg.algo.mini_batches

    def updates(self, micro_batches: list[list]) -> list[list[list]]:
        """ppo_epochs passes, each of mini_batches updates over consecutive micro-batches
        (every worker holds the same number, so the updates stay in lock-step)."""
        m = self.cfg.algo.mini_batches
        size = len(micro_batches) // m
        groups = [micro_batches[i * size:(i + 1) * size] for i in range(m)]
        return groups * self.cfg.algo.ppo_epochs

    def feed(self, shard, micro: int, accum: int, skip: set[int] | None = None):
        return RolloutFeed(self, skip)

    # ------------------------------------------------------------------ set-up

    def prepare(self, engine, lc: dict, world: int, accum: int) -> None:
        cfg, a = self.cfg, self.cfg.algo
        super().prepare(engine, lc, world, accum)  # accum: micro-batches per update
        self.universal = lc.get("universal", False)  # resumed at another world size
        self.engine = engine  # the policy: it also recomputes the proximal log-probs
        self.rank = rank_world()[0]
        self.coordinator = lc["coordinator"]
        self.broadcasting = lc.get("sync") == "broadcast"
        self.publisher = WeightPublisher(cfg, self.rank, lc["sync"], lc["weights_dir"],
                                         lc["store"], lc["engines"])
        self.rollout_is = resolved_rollout_is(cfg)
        self.dpo = a.algorithm == "online_dpo"
        # DPO's log-probs are the model's own (temperature 1), whatever sampled the pairs
        self.logit_temperature = 1.0 if self.dpo else cfg.rollout.temperature
        needs_ref = a.kl_coef or (self.dpo and a.dpo_loss != "simpo")
        self.ref_engine = (self.frozen_reference(lc["model_path"], world)
                           if needs_ref else None)
        self.moving = MovingReference(self.ref_engine, a.reference_sync_every if self.dpo
                                      else 0, a.reference_mixup)
        # The proximal policy, recomputed: the ratio's denominator once the policy has
        # moved (several updates per batch), and the KL in the reward. With one update
        # it is the current policy, detached: no forward of its own.
        self.need_old = self.updates_per_step > 1 or (
            a.kl_penalty == "reward" and self.ref_engine is not None)
        self.kl_ctl = AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon)
        self.critic = None
        if a.algorithm == "ppo":
            self.critic = Critic(cfg, lc["critic_path"], world, accum,
                                 a.critic_learning_rate or lc["learning_rate"],
                                 lc["total_steps"] * self.updates_per_step, self.universal)
        # with several sources each one's unweighted mean is reported too
        rw = cfg.reward
        names = [reward_spec(x)[0] for x in rw.functions]
        if cfg.rollout.environment:
            names.append("environment")
        if rw.remote_url:
            names.append("remote")
        if rw.judge:
            names.append("judge")
        models = rw.served()[0]
        if len(models) > 1:  # served: each model, the combined score, the disagreement
            names += [f"rm{i}" for i in range(len(models))] + ["ensemble", "ensemble_std"]
        elif models:
            names.append("rm0")
        if rw.gold:  # never in the sum: the monitor's held-out reward
            names.append("gold")
        self.parts = names if len(names) > 1 else []
        self.sum_keys = self.SUMS + tuple(f"reward[{x}]" for x in self.parts)
        self.rollouts: dict[tuple, dict] = {}
        self.version = 0  # the weights the trainers hold (steps done)
        self.item = 0  # the next coordinator item this rank takes
        self.attached = False
        self.saved_buffer: list[dict] | None = None
        self.wait_s = 0.0
        self.batch_stats: dict = {}
        self.resynced = 0
        self.delay_s = float(lc.get("delay_training_s") or 0.0)

    def attach(self, epoch: int, skip: set[int] | None) -> None:
        """Once per attempt, at the first step: rank 0 (re)starts the coordinator from
        this training state; the others wait for it."""
        if self.attached:
            return
        self.attached = True
        t = self.cfg.train
        per_step = t.global_batch_size // (t.micro_batch_size * self.world)  # micro-batches/rank
        if self.rank == 0:
            ray.get(self.coordinator.start.remote(
                self.world, t.micro_batch_size, per_step, self.version, epoch,
                sorted(skip or ()), self.saved_buffer))
        all_sum([0.0])  # nobody asks for a batch before the coordinator is started

    def save_state(self, folder: Path) -> None:
        self.moving.save(folder)
        if self.critic is not None:
            self.critic.save(folder)
        if self.rank == 0:
            (folder / "rl_state.json").write_text(json.dumps({"kl_coef": self.kl_ctl.value}))
            if self.attached:
                buffer = ray.get(self.coordinator.snapshot.remote())
                (folder / BUFFER_FILE).write_text(json.dumps(buffer))

    def load_state(self, folder: Path) -> None:
        self.moving.load(folder)
        if self.critic is not None:
            self.critic.load(folder)
        state = folder / "rl_state.json"
        if state.is_file():
            self.kl_ctl.value = json.loads(state.read_text())["kl_coef"]
        buffer = folder / BUFFER_FILE
        if buffer.is_file():
            self.saved_buffer = json.loads(buffer.read_text())

    # ------------------------------------------------------------------ a step

    def begin_step(self, micro_batches: list[list], timer) -> None:
        """A step's phases before its updates, in order (the module docstring): the
        wait for the rollouts (booked by the loop as "data") is "generate"; then score,
        reference, old_logprobs, values, advantages."""
        timer.times["generate"] = timer.times.pop("data", 0.0)
        if self.delay_s:  # a slow trainer (rlhf.ppo.run's delay_training_s)
            time.sleep(self.delay_s)
        ds = [self._tensors(mb) if mb else None for mb in micro_batches]
        self._frozen_phases(ds, True, timer)
        self.rollouts = {self._key(d["records"]): d for d in ds if d is not None}
        kl, responses = assign_advantages(list(self.rollouts.values()), self.cfg.algo,
                                          self.cfg.rollout.samples_per_prompt,
                                          self.kl_ctl.value, all_sum)
        if responses:  # the adaptive controller follows the batch's KL per response
            self.kl_ctl.update(kl / responses, int(responses))
        timer.mark("advantages")

    def _tensors(self, records: list) -> dict:
        """A micro-batch of records -> the tensors its phases and micro-steps need, the
        rollout-side rewards summed per record (scored further by `_score`)."""
        P = [r.prompt_ids for r in records]
        R = [r.response_ids for r in records]
        batch = response_batch(P, R, pad_id=self.pad_id, packing=self.cfg.data.packing,
                               attn_implementation=self.cfg.model.attn_implementation)
        tables = record_tables(records)
        return {"batch": batch, "records": records, "n_seqs": len(records),
                "scores": [r.score for r in records],
                "parts": {x: sum(r.parts.get(x, 0.0) for r in records) for x in self.parts},
                "behaviour": tables["behaviour"], "loss_mask": tables["loss_mask"],
                "versions": tables["versions"], "turn_rewards": tables["turn_rewards"],
                "prompt_tokens": sum(map(len, P)),
                "response_tokens": float(tables["loss_mask"].sum()),
                "ref": None, "old": None, "values": None, "passes": 0,
                # trained positions: the response's model tokens (observations and
                # filtered responses are 0 in the records' loss mask)
                "mask": tables["loss_mask"]}

    def _frozen_phases(self, ds: list[dict | None], train: bool, timer) -> None:
        """score, reference and, for training, old_logprobs and values, each phase over
        every micro-batch in turn."""
        for d in ds:
            self._score(d)
        if timer:
            timer.mark("score")
        phases = [("ref", "reference", self.ref_engine is not None,
                   lambda b, n: self._policy_tables(self.ref_engine, b, n)[0]),
                  ("old", "old_logprobs", train and self.need_old,
                   lambda b, n: self._policy_tables(self.engine, b, n)[0]),
                  ("values", "values", train and self.critic is not None,
                   lambda b, n: self.critic.values(b, n))]
        for key, phase, runs, forward in phases:
            if runs:
                self._each(ds, key, forward)
                if timer:
                    timer.mark(phase)

    def _each(self, ds: list[dict | None], key: str, forward) -> None:
        """d[key] = forward(batch, n_seqs), no grad, for every micro-batch; an empty one
        (None) runs the same forward on the dummy row: under ZeRO-3 every rank must join
        every gather."""
        with torch.no_grad():
            for d in ds:
                if d is None:
                    forward(self.batch([]), 1)
                else:
                    d[key] = forward(d["batch"], d["n_seqs"])

    def _score(self, d: dict | None) -> None:
        """reward.clip on the rollout-side rewards (d None: an empty micro-batch)."""
        if d is None:
            return
        d["scores"] = shape_scores(torch.tensor(d["scores"], dtype=torch.float32),
                                   self.cfg.reward.clip)
        d["parts"] = {f"reward[{x}]": v for x, v in d["parts"].items()}

    def _policy_tables(self, model_engine, batch: dict, n_seqs: int, entropy: bool = False):
        """(log-probs (S, T), mask (S, T), entropy (S, T) or None) of the response
        positions at the sampling temperature."""
        out = model_engine(**model_inputs(batch, model_engine.device))
        logits = out.logits / self.logit_temperature
        vals, seq = scored_token_logprobs(logits, batch)
        lp, mask = right_padded(vals, seq, n_seqs)
        ent = None
        if entropy:
            ent, _ = right_padded(entropy_from_logits(scored_positions(logits, batch)[0]),
                                  seq, n_seqs)
        return lp, mask, ent

    @staticmethod
    def _key(records: list) -> tuple:
        return tuple((r.group, r.sample) for r in records)

    def step_counts(self, micro_batches: list[list]) -> dict[str, float]:
        ds = [self.rollouts[self._key(mb)] for mb in micro_batches if mb]
        p = sum(d["prompt_tokens"] for d in ds)
        resp = sum(d["response_tokens"] for d in ds)
        records = [r for d in ds for r in d["records"]]
        hist = staleness_counts(records, self.version)
        out = {"samples": len(records), "tokens": p + resp, "unique_tokens": p + resp,
               "pairs": sum(r.role == "chosen" for r in records),
               "response_tokens": resp,
               **{f"staleness/{k}": float(hist.get(k, 0))
                  for k in range(self.cfg.rollout.max_staleness + 1)},
               **{f"batch/{k}": float(self.batch_stats.get(k, 0.0)) for k in self.BATCH_STATS}}
        return out

    def micro_step(self, engine, rows: list, totals: dict | None, grad: bool, timer):
        a = self.cfg.algo
        ent_on = bool(a.entropy_coef)
        sums = dict.fromkeys(self.sum_keys, 0.0)
        sums.update(dict.fromkeys(self.MAXES, 0.0))
        if not rows:  # a zero-weight forward, so that ZeRO-3's gathers see every rank
            if not grad:  # as an eval rollout would (training ones did in begin_step)
                self._frozen_phases([None], False, None)
            with torch.set_grad_enabled(grad):
                if self.critic is not None and grad:
                    self.critic.dummy_update(self.batch([]))
                lp, _, _ = self._policy_tables(engine, self.batch([]), 1)
            return (lp.sum() * 0.0 if totals is not None else None), sums
        d = self.rollouts[self._key(rows)] if grad else self._eval_rollout(rows)
        if d is None:  # every held-out episode of this micro-batch failed
            return self.micro_step(engine, [], totals, grad, timer)
        first = d["passes"] == 0
        d["passes"] += 1
        # the token mean over the global batch (or its mini-batch), however it was split
        k = self.world * self.accum / max(totals["response_tokens"], 1) if totals else 0.0
        if totals and self.dpo:  # the mean over the global batch's pairs
            k = self.world * self.accum / max(totals["pairs"], 1)
        if totals is not None and self.critic is not None:
            # the critic's update first: its graph is gone before the policy's is built
            sums["value_loss"], sums["value_clipped"] = self.critic.update(
                d["batch"], d["n_seqs"], d["values"], d["returns"], d["mask"], k,
                a.value_clip)
            if timer:
                timer.mark("critic")
        mask = d["mask"]
        with torch.set_grad_enabled(grad):
            lp, _, ent = self._policy_tables(engine, d["batch"], d["n_seqs"], ent_on)
            mask = mask.to(lp.device)
            if timer:
                timer.mark("forward")
            behaviour = d["behaviour"][:, :lp.shape[1]].to(lp.device)
            per_token = torch.zeros_like(lp)
            if grad:
                in_loss = d["ref"] is not None and a.kl_penalty == "loss"
                ref, coef = (d["ref"], self.kl_ctl.value) if in_loss else (None, 0.0)
            if grad and (self.dpo or a.algorithm == "rejection"):
                # DPO's pair loss, or the SFT loss on the kept samples: no ratio to clip
                # and no rollout correction (every token at weight 1)
                per_token, kl = (self._pair_loss(lp, d, mask, sums) if self.dpo
                                 else kept_samples_loss(lp, mask, ref, coef))
                sums.update({"clipped": 0.0, "is_weight": float(mask.sum()),
                             "is_limited": 0.0, "max:is_weight": 1.0})
            elif grad:
                # With one update per batch the proximal policy is the current one: the
                # ratio is 1 in value and the clip bounds nothing (GRPO's num_iterations
                # = 1); the gradient is the advantage-weighted score function.
                prox = d["old"] if d["old"] is not None else lp.detach()
                out = online_rl_loss(
                    lp, prox.to(lp.device), behaviour, d["adv"].to(lp.device), mask,
                    clip_low=a.clip_low, clip_high=a.clip_high, rollout_is=self.rollout_is,
                    rollout_is_cap=a.rollout_is_cap, ref_logprobs=ref, kl_coef=coef,
                    entropy=ent, entropy_coef=a.entropy_coef)
                per_token = out.losses
                kl = out.kl if in_loss else (d["reward_kl"].to(lp.device)
                                             if d["ref"] is not None else torch.zeros_like(lp))
                sums.update({"clipped": float(out.clipped.sum()),
                             "is_weight": float(out.weights.weights.sum()),
                             "is_limited": float(out.weights.limited.sum()),
                             "max:is_weight": float(out.weights.raw.max())})
            elif d["ref"] is not None:
                kl = kl_estimate(lp, d["ref"].to(lp.device),
                                 "k3" if a.kl_penalty == "loss" else "k1") * mask
            else:
                kl = torch.zeros_like(lp)
        sums.update({"loss": float(per_token.detach().sum()), "kl": float(kl.detach().sum()),
                     "tokens": float(mask.sum()),
                     "entropy": float((ent.detach() * mask).sum()) if ent_on else 0.0})
        if first:  # what was sampled: counted once however many passes train on it
            sums.update(self._sample_sums(d, lp, behaviour, mask))
        if totals is None:
            return None, sums
        return per_token.sum() * k, sums

    def _pair_loss(self, lp, d: dict, mask, sums: dict):
        """online_dpo: the micro-batch's records are (chosen, rejected) pairs in turn ->
        (each pair's loss as a (P, 1) table, whose sum is the micro-batch's loss; the
        k3 KL to the reference per token, reported); the pairs' metrics into `sums`."""
        a = self.cfg.algo
        roles = [r.role for r in d["records"]]
        if len(roles) % 2 or roles != ["chosen", "rejected"] * (len(roles) // 2):
            raise RuntimeError(f"online DPO got records that are not (chosen, rejected) "
                               f"pairs: {roles}")
        lengths = mask.sum(1)
        pol = (lp * mask).sum(1)
        ref = (d["ref"].to(lp.device) * mask).sum(1) if d["ref"] is not None else None
        out = dpo_loss(pol[0::2], pol[1::2], None if ref is None else ref[0::2],
                       None if ref is None else ref[1::2], loss_type=a.dpo_loss,
                       beta=a.beta, chosen_lengths=lengths[0::2],
                       rejected_lengths=lengths[1::2])
        margin = (out.chosen_rewards - out.rejected_rewards).detach()
        scores = d["scores"]
        sums.update({"pairs": float(len(margin)), "pair_loss": float(out.losses.detach().sum()),
                     "pair_accuracy": float((margin > 0).sum()),
                     "pair_margin": float(margin.sum()),
                     "pair_score_gap": float((scores[0::2] - scores[1::2]).sum())})
        kl = (kl_estimate(lp.detach(), d["ref"].to(lp.device), "k3") * mask
              if d["ref"] is not None else torch.zeros_like(lp))
        return out.losses.unsqueeze(1), kl

    def _sample_sums(self, d: dict, lp, behaviour, mask) -> dict:
        """Per-sample sums of a micro-batch: rewards, the engine/trainer log-prob gap
        (all tokens, and those sampled by the current weights: the numerical mismatch
        alone), turns, tool use, partial rollouts and staleness."""
        s = d["scores"]
        sampler = (d["old"] if d["old"] is not None else lp.detach()).cpu()
        diff = (sampler - behaviour.cpu()).abs() * mask.cpu()
        fresh = (d["versions"][:, :lp.shape[1]] == self.version).float() * mask.cpu()
        recs = d["records"]
        return {"reward": float(s.sum()), "reward_sq": float((s ** 2).sum()),
                "responses": float(d["n_seqs"]), "gap": float(diff.sum()),
                "gap_tokens": float(mask.sum()), "max:gap": float(diff.max()),
                "gap_fresh": float((diff * fresh).sum()), "fresh_tokens": float(fresh.sum()),
                "response_tokens": float(mask.sum()),
                "turns": float(sum(r.turns for r in recs)),
                "tool_calls": float(sum(r.tool_calls for r in recs)),
                "tool_episodes": float(sum(r.tool_calls > 0 for r in recs)),
                "partial": float(sum(r.partial for r in recs)),
                "staleness": float(sum(r.staleness(self.version) for r in recs)),
                "max:staleness": float(max(r.staleness(self.version) for r in recs)),
                **length_sums(s, [len(r.response_ids) for r in recs]), **d["parts"]}

    def _eval_rollout(self, rows: list[dict]) -> dict | None:
        """A held-out micro-batch: rollouts with the current weights from the
        coordinator, scored and with the reference's forward."""
        plain = [{"id": int(r["id"]), "prompt_ids": [int(t) for t in r["prompt_ids"]],
                  "metadata": str(r["metadata"])} for r in rows]
        got = ray.get(self.coordinator.eval_rollouts.remote(self.rank, plain, self.version))
        records = [RolloutRecord(**x) for x in got["records"]]
        if not records:
            return None
        d = self._tensors(records)
        self._frozen_phases([d], False, None)
        return d

    # ------------------------------------------------------------------ weights

    def resync(self, n: int) -> None:
        """The coordinator found an engine restarted on the broadcast path: every rank
        takes part in broadcasting the current weights again (once per request)."""
        if n <= self.resynced:
            return
        self.resynced = n
        say(f"rank {self.rank}: re-syncing the engines (weights {self.version})")
        self.publisher.publish(self.engine, self.version)
        if self.rank == 0:
            ray.get(self.coordinator.published.remote(self.version, True))

    def end_step(self, engine, step: int, timer) -> None:
        """The new weights are published for the engines (and, broadcasting, pushed into
        them); the coordinator hears of them."""
        self.rollouts = {}
        if self.moving.step(engine, step) and timer:  # online DPO's TR-DPO reference
            timer.mark("reference_sync")
        self.publisher.publish(engine, step)
        self.version = step
        if self.rank == 0:
            ray.get(self.coordinator.published.remote(step, self.broadcasting))
        if timer:
            timer.mark("sync")

    def metrics(self, sums: dict, totals: dict | None, split: str) -> dict:
        n, t = max(sums["responses"], 1), max(sums["tokens"], 1)
        mean = sums["reward"] / n
        out = {f"{split}/reward": mean,
               f"{split}/reward_std": math.sqrt(max(sums["reward_sq"] / n - mean ** 2, 0.0)),
               f"{split}/kl": sums["kl"] / t,
               f"{split}/response_length": sums["response_tokens"] / n,
               f"{split}/logprob_gap_vllm": sums["gap"] / max(sums["gap_tokens"], 1),
               f"{split}/reward_length_corr": length_correlation(sums),
               **{f"{split}/reward[{x}]": sums[f"reward[{x}]"] / n for x in self.parts}}
        if self.cfg.rollout.environment:
            out.update({f"{split}/turns": sums["turns"] / n,
                        f"{split}/tool_calls": sums["tool_calls"] / n,
                        f"{split}/tool_call_share": sums["tool_episodes"] / n})
        if split != "train":
            out["eval/responses"] = int(sums["responses"])
            out["eval/prompts"] = int(sums["responses"]) // self.cfg.rollout.samples_per_prompt
            return out
        k = self.cfg.rollout.max_staleness
        b = {key: totals.get(f"batch/{key}", 0.0) for key in self.BATCH_STATS}
        samples = max(totals["samples"], 1)
        out.update({"train/loss": sums["loss"] / t,
                    "train/clip_fraction": sums["clipped"] / t,
                    "train/kl_coef": self.kl_ctl.value,
                    "train/generated_tokens_per_s": (totals["response_tokens"] / b["generate_s"]
                                                     if b["generate_s"] else 0.0),
                    "train/sync_mb": self.publisher.bytes / 2**20,
                    "train/is_weight_mean": sums["is_weight"] / t,
                    "train/is_weight_max": sums["max:is_weight"],
                    "train/is_limited_fraction": sums["is_limited"] / t,
                    "train/logprob_gap_max": sums["max:gap"],
                    "train/logprob_gap_fresh": (sums["gap_fresh"] / sums["fresh_tokens"]
                                                if sums["fresh_tokens"] else 0.0),
                    "train/staleness_mean": sums["staleness"] / n,
                    "train/staleness_max": sums["max:staleness"],
                    **{f"train/staleness/{i}": totals[f"staleness/{i}"] / samples
                       for i in range(k + 1)},
                    "train/partial_share": sums["partial"] / n,
                    "train/rollout_wait_s": self.wait_s,
                    "train/rollout_generate_s": b["generate_s"],
                    "train/rollout_env_s": b["env_s"],
                    "train/env_failures": b["env_failures"],
                    "train/outside_thresholds": b["outside_thresholds"]})
        if self.cfg.algo.algorithm == "rejection":  # samples left out, the best kept
            out["train/rejected"] = b["rejected"]
        if self.dpo:  # per pair: the loss as trained, DPO's implicit-reward metrics
            pairs = max(sums["pairs"], 1)
            # train/reward: every sample's, not only the paired ones' (best and worst)
            out.update({"train/reward": b["paired_groups_reward"]
                        / max(b["paired_groups_samples"], 1),
                        "train/loss": sums["pair_loss"] / pairs,
                        "train/rewards/accuracy": sums["pair_accuracy"] / pairs,
                        "train/rewards/margin": sums["pair_margin"] / pairs,
                        "train/pair_score_gap": sums["pair_score_gap"] / pairs,
                        "train/pairs": b["pairs"], "train/pairs_dropped": b["pairs_dropped"]})
        if self.cfg.algo.entropy_coef:
            out["train/entropy"] = sums["entropy"] / t
        if self.critic is not None:
            out["train/value_loss"] = sums["value_loss"] / t
            out["train/value_clip_fraction"] = sums["value_clipped"] / t
        return out


    @staticmethod
    def watch(evaluations: list[dict], whole_run: bool = False) -> list[str]:
        return hacking_warnings(evaluations, whole_run=whole_run)

    @staticmethod
    def summary_line(s: dict) -> str:
        return (f"held-out reward {s['start/eval/reward']:.3f} (std "
                f"{s['start/eval/reward_std']:.3f}) -> {s['eval/reward']:.3f} (std "
                f"{s['eval/reward_std']:.3f}) over {s['eval/responses']} responses")
