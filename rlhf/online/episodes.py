"""Episodes for online RL: a batch's samples generated to their end, a round at a time,
with environments between a multi-turn episode's turns, then scored and filtered. The
rollout coordinator (rlhf/online/coordinator.py) owns the flow; this is how one batch's (or
one evaluation's) samples are made.

A prompt's n samples start as one engine request (n samples from the prompt's seed,
cluster.vllm_engines.sample_seed, as rlhf.ppo always sampled); a sample that goes on (the
next piece of a partial rollout, a multi-turn episode's next turn) as a request of its
own, seeded by its prompt, sample and piece. All live episodes go to the engines
together, one call per engine per round; the environments' steps run concurrently
between rounds, each under rollout.env_timeout_s (rlhf.core.environments.call_all), and their
observations are appended token in, token out (rlhf.core.environments.ChatCodec).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.engine_client import EngineClient, EngineNeedsSync
from cluster.vllm_engines import sample_seed
from rlhf.core.advantages import overlong_penalty, uniform_groups
from rlhf.core.environments import ChatCodec, call_all, checked_step, load_environment
from rlhf.core.pairwise import best_index, select_pairs
from rlhf.core.reward_ensemble import within_thresholds
from rlhf.core.rollouts import OBSERVATION, RolloutRecord
from rlhf.online.reward_sources import build_rewards, judge_scores

DROP_UNIFORM = "dropped: uniform rewards (algo.dynamic_sampling)"
DROP_OUTSIDE = "dropped: every sample outside reward.min_score/max_score"
DROP_NONE_KEPT = "dropped: no sample left to keep (algo.algorithm=rejection)"
DROP_NO_PAIR = "dropped: no pair apart by algo.min_pair_gap (algo.algorithm=online_dpo)"
DROP_UNSCORED = "dropped: reward.remote_url gave no score (reward.remote_errors=skip)"


@dataclass
class Episode:
    """One sample in the making (a single turn, or a multi-turn episode)."""

    rank: int
    group: int
    sample: int
    prompt_ids: list[int]
    metadata: str
    env: Any = None
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    turn_start: int = 0
    turn_rewards: list[float] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)
    pieces: int = 0  # engine calls so far (seeds the next one)
    done: bool = False
    finish_reason: str = ""
    failure: Exception | None = None

    @property
    def turn_tokens(self) -> int:
        return len(self.response_ids) - self.turn_start


class EpisodeRunner:
    """Generates, scores and filters episodes with the engines of `client` (see the module
    docstring). Thread-safe: batches made at once take the engines a round at a time."""

    def __init__(self, cfg, client: EngineClient, tok, reward_pools: list | None = None,
                 gold_pool=None, judge_pool=None):
        """reward_pools: the served reward models (cluster.reward_service.RewardPool), in
        reward.models' order; gold_pool: reward.gold's when it is a reward model;
        judge_pool: reward.judge's (score(prompts, [(response, baseline)]))."""
        self.judge = judge_pool
        self.cfg, self.r, self.a = cfg, cfg.rollout, cfg.algo
        self.client, self.tok = client, tok
        self.rewards, self.remote = build_rewards(
            cfg.reward, [pool.score for pool in reward_pools or []],
            gold_pool.score if gold_pool is not None else None)
        self.env_factory = None
        self.codec = None
        self.stop_ids = None  # the engines' default: the model's end-of-sequence tokens
        if self.r.environment:
            self.env_factory = load_environment(self.r.environment, self.r.env_args)
            if self.r.max_turns > 1:
                self.codec = ChatCodec(self.tok)
                self.stop_ids = self.codec.stop_ids
        self.engine_lock = threading.RLock()  # one round (or evaluation) at a time
        self.reward_lock = threading.Lock()  # reward functions need not be thread-safe

    def run(self, eps: list[Episode], engine_of: Callable[[Episode], int], stage,
            alive: Callable[[], bool] = lambda: True, before_round: Callable | None = None,
            refresh: bool = False, wait_for_sync: Callable | None = None,
            stats: Counter | None = None) -> None:
        """Generate every episode to its end, a round at a time (one call per engine per
        round). `before_round` (bringing the engines to the newest weights) runs before
        the first round and, with `refresh` (partial rollouts), before every round; a
        round that finds an engine needing the trainers' broadcast calls
        `wait_for_sync` and runs again (without it, the error is raised). `alive()`
        false: the batch is abandoned."""
        first = True
        while True:
            live = [ep for ep in eps if not ep.done and ep.failure is None]
            if not live or not alive():
                return
            try:
                with self.engine_lock:
                    if before_round is not None and (first or refresh):
                        before_round()
                    first = False
                    outs = self._generate_all(self._requests(live, engine_of, stage))
            except EngineNeedsSync:
                if wait_for_sync is None:  # an evaluation: the step fails, Ray Train resumes
                    raise
                wait_for_sync()  # then the same round again
                continue
            ended: list[Episode] = []
            for members, samples in outs:
                for ep, s in zip(members, samples):
                    ep.pieces += 1
                    ep.response_ids += s["token_ids"]
                    ep.logprobs += s["logprobs"]
                    ep.versions += [s["version"]] * len(s["token_ids"])
                    ep.loss_mask += [1] * len(s["token_ids"])
                    if self._turn_over(ep, s):
                        ended.append(ep)
            if self.env_factory is None:
                for ep in ended:
                    ep.done, ep.finish_reason = True, ep.finish_reason or "stop"
            else:
                t0 = time.perf_counter()
                self._env_steps(ended)
                if stats is not None:
                    stats["env_s"] += time.perf_counter() - t0

    def episodes(self, rank: int, rows: list[dict], stage) -> list[Episode]:
        """The episodes of `rows` (samples_per_prompt each), their environments reset."""
        n = self.r.samples_per_prompt
        eps = []
        for row in rows:
            meta = str(row["metadata"])
            prompt = [int(t) for t in row["prompt_ids"]]
            for j in range(n):
                env = None
                if self.env_factory is not None:
                    env = self.env_factory()
                eps.append(Episode(rank, int(row["id"]), j, prompt, meta, env))
        if self.env_factory is not None:
            self._env_calls([(ep, lambda ep=ep: ep.env.reset(
                {"prompt": self.tok.decode(ep.prompt_ids), **json.loads(ep.metadata)}))
                for ep in eps])
        return eps

    def _requests(self, live: list[Episode], engine_of, stage) -> dict[int, list]:
        """This round's requests per engine: [(episodes, request)]. A prompt's samples
        that all start from the prompt go as one request of n samples from the prompt's
        seed (vLLM draws them from seed + 0..n-1), as rlhf.ppo always sampled; a sample
        that goes on (its next piece or turn) as a request of its own."""
        n, seed = self.r.samples_per_prompt, self.cfg.train.seed
        requests: dict[int, list[tuple[list[Episode], dict]]] = {}
        fresh: dict[tuple, list[Episode]] = {}
        for ep in live:
            if ep.pieces == 0:
                fresh.setdefault((ep.rank, ep.group), []).append(ep)
            else:
                requests.setdefault(engine_of(ep), []).append(([ep], self._request(
                    ep, 1, sample_seed(seed, f"{stage}/{ep.sample}/{ep.pieces}", ep.group, 1))))
        for (_, group), members in fresh.items():
            if len(members) == n:
                requests.setdefault(engine_of(members[0]), []).append(
                    (members, self._request(members[0], n, sample_seed(seed, stage, group, n))))
            else:
                for ep in members:
                    requests.setdefault(engine_of(ep), []).append(([ep], self._request(
                        ep, 1, sample_seed(seed, f"{stage}/{ep.sample}/0", ep.group, 1))))
        return requests

    def _request(self, ep: Episode, n: int, seed: int) -> dict:
        r = self.r
        left = r.max_new_tokens - ep.turn_tokens
        if r.partial_rollouts:
            left = min(left, r.chunk_tokens)
        return {"prompt_ids": ep.prompt_ids + ep.response_ids, "n": n, "max_tokens": left,
                "seed": seed, "stop_token_ids": self.stop_ids}

    def _turn_over(self, ep: Episode, s: dict) -> bool:
        """Whether the model's turn ended with this piece (a stop token, or its token
        budget); a piece cut by rollout.chunk_tokens goes on in the next round."""
        if s["finish_reason"] == "stop":
            return True
        if ep.turn_tokens >= self.r.max_new_tokens:
            ep.finish_reason = "length"
            return True
        return not self.r.partial_rollouts

    def _generate_all(self, requests: dict[int, list]) -> list:
        """One call per engine, all at once; [(members, samples per member)]."""
        results: dict[int, Any] = {}

        def call(i: int, reqs: list) -> None:
            try:
                results[i] = self.client.generate(
                    i, [q for _, q in reqs], temperature=self.r.temperature, top_p=self.r.top_p)
            except BaseException as e:  # noqa: BLE001 - raised below, in this thread
                results[i] = e

        threads = [threading.Thread(target=call, args=(i, reqs), daemon=True)
                   for i, reqs in requests.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out = []
        for i, reqs in requests.items():
            if isinstance(results[i], BaseException):
                raise results[i]
            for (members, _), samples in zip(reqs, results[i]):
                out.append((members, samples))
        return out

    # ------------------------------------------------------------ environments

    def _env_calls(self, calls: list[tuple[Episode, Any]]) -> list:
        res = call_all([(ep.env.name, fn) for ep, fn in calls], self.r.env_timeout_s)
        for (ep, _), (ok, value) in zip(calls, res):
            if not ok:
                self._env_failed(ep, value)
        return res

    def _env_failed(self, ep: Episode, failure: Exception) -> None:
        if self.r.env_errors == "stop":
            raise RuntimeError(f"{failure} (prompt {ep.group}, sample {ep.sample}, turn "
                               f"{len(ep.turn_ends) + 1}); rollout.env_errors=skip drops "
                               "such episodes (counted) instead of stopping") from failure
        ep.failure, ep.done = failure, True

    def _env_steps(self, ended: list[Episode]) -> None:
        """The environment's answer to each model turn that just ended: its reward, and
        either the end of the episode or the observation, appended token-in-token-out."""
        if not ended:
            return
        calls = [(ep, lambda ep=ep: checked_step(ep.env.name, ep.env.step(self.tok.decode(
            ep.response_ids[ep.turn_start:], skip_special_tokens=True)))) for ep in ended]
        for (ep, _), (ok, step) in zip(calls, self._env_calls(calls)):
            if not ok:
                continue
            ep.turn_rewards.append(step.reward)
            ep.turn_ends.append(len(ep.response_ids) - 1)
            turns = len(ep.turn_ends)
            if step.done or ep.finish_reason == "length" and self.codec is None:
                ep.done = True
                ep.finish_reason = ep.finish_reason or "done"
                continue
            if turns >= self.r.max_turns:
                ep.done, ep.finish_reason = True, "max_turns"
                continue
            obs = self._observation(ep, step)
            ep.response_ids += obs
            ep.logprobs += [0.0] * len(obs)
            ep.versions += [OBSERVATION] * len(obs)
            ep.loss_mask += [0] * len(obs)
            ep.turn_start = len(ep.response_ids)
            ep.finish_reason = ""

    def _observation(self, ep: Episode, step) -> list[int]:
        """The observation's tokens, its content cut to rollout.max_observation_tokens."""
        turn = ep.response_ids[ep.turn_start:]
        content = step.observation
        ids = self.tok(content, add_special_tokens=False)["input_ids"]
        if len(ids) > self.r.max_observation_tokens:
            content = self.tok.decode(ids[:self.r.max_observation_tokens])
        return self.codec.observation_ids(turn, step.role, content)

    # ------------------------------------------------------------ rewards and filters

    def score(self, eps: list[Episode], train: bool
               ) -> tuple[list[tuple[Episode, RolloutRecord]], list[Episode]]:
        """([(episode, record)] of the finished episodes, [failed episodes]), with the
        rollout-side reward: the functions' weighted sum, then the environment's turn
        rewards, then length shaping (training only)."""
        good = [ep for ep in eps if ep.failure is None]
        texts = [self.tok.decode(ep.prompt_ids) for ep in good]
        resp = [self.tok.decode(ep.response_ids, skip_special_tokens=True) for ep in good]
        meta = [json.loads(ep.metadata) for ep in good]
        extra = ([("environment", 1.0, [sum(ep.turn_rewards) for ep in good])]
                 if self.env_factory is not None else [])
        keys: dict[tuple[int, int], int] = {}  # each sample's prompt, numbered
        groups = [keys.setdefault((ep.rank, ep.group), len(keys)) for ep in good]
        if self.judge is not None and good:
            extra.append(("judge", self.cfg.reward.judge_weight, judge_scores(
                self.judge.score, self.cfg.reward.judge_baseline, texts, resp, meta, groups,
                [ep.sample for ep in good])))
        with self.reward_lock:
            total, parts = self.rewards(texts, resp, meta, groups=groups, extra=extra)
        recs = []
        a = self.a
        for i, ep in enumerate(good):
            score = total[i]
            p = {name: parts[name][i] for name in parts}
            mask = list(ep.loss_mask)
            if train and ep.finish_reason == "length" and a.overlong == "filter":
                mask = [0] * len(mask)
            if train and a.overlong == "penalty":
                import torch

                pen = float(overlong_penalty(torch.tensor([sum(ep.loss_mask)]),
                                             self.r.max_new_tokens * self.r.max_turns,
                                             a.overlong_buffer, a.overlong_penalty)[0])
                score += pen
                p["overlong"] = pen
            recs.append(RolloutRecord(
                group=ep.group, sample=ep.sample, prompt_ids=ep.prompt_ids,
                response_ids=ep.response_ids, logprobs=ep.logprobs, versions=ep.versions,
                loss_mask=mask, score=score, parts=p, turn_rewards=ep.turn_rewards,
                turn_ends=ep.turn_ends, finish_reason=ep.finish_reason or "stop",
                tool_calls=getattr(ep.env, "calls", 0) if ep.env is not None else 0,
                metadata=ep.metadata))
        return list(zip(good, recs)), [ep for ep in eps if ep.failure is not None]

    def filter(self, scored: list[tuple[Episode, RolloutRecord]], failed: list[Episode],
                counts: Counter, stats: Counter) -> list[tuple[int, list[RolloutRecord]]]:
        """[(rank, the group's records)] of the groups kept, in the order their prompts
        were read; the others counted as dropped: a group with a failed episode
        (rollout.env_errors=skip), with algo.dynamic_sampling one whose rewards are all
        equal, with reward.min_score/max_score one none of whose samples is within.
        algo.algorithm=rejection keeps of each group its best sample within them (the
        first of equals), the others counted as rejected; online_dpo makes of each group
        its pairs (algo.pairs) of samples within them, the pairs not made counted."""
        import torch

        groups: dict[tuple[int, int], list[RolloutRecord]] = {}
        for ep, rec in scored:
            groups.setdefault((ep.rank, ep.group), []).append(rec)
        failures = {}
        for ep in failed:
            failures.setdefault((ep.rank, ep.group), ep.failure)
            groups.setdefault((ep.rank, ep.group), [])
        out = []
        for key, group in groups.items():
            if key in failures:
                f = failures[key]
                counts[f"dropped: environment {f.env} {f.kind}"] += 1
                stats["env_failures"] += 1
                continue
            if any(math.isnan(x.score) for x in group):  # a remote batch skipped
                counts[DROP_UNSCORED] += 1
                continue
            if self.a.dynamic_sampling and bool(uniform_groups(
                    torch.tensor([x.score for x in group]), len(group))[0]):
                counts[DROP_UNIFORM] += 1
                continue
            if not self._within_thresholds(group, stats):
                counts[DROP_OUTSIDE] += 1
                continue
            group = sorted(group, key=lambda x: x.sample)
            if self.a.algorithm == "rejection":  # the best one within the thresholds
                live = [x for x in group if any(x.loss_mask)]
                if not live:  # none has a token to train (all filtered as overlong)
                    counts[DROP_NONE_KEPT] += 1
                    continue
                stats["rejected"] += len(group) - 1
                group = [live[best_index([x.score for x in live])]]
            if self.a.algorithm == "online_dpo":
                group = self._pairs(group, stats)
                if not group:
                    counts[DROP_NO_PAIR] += 1
                    continue
            out.append((key[0], group))
        return out

    def _pairs(self, group: list[RolloutRecord], stats: Counter) -> list[RolloutRecord]:
        """online_dpo: the group as consecutive (chosen, rejected) records, of the
        samples with tokens to train (within the thresholds, not filtered as overlong);
        stats["pairs"] counts the pairs made, stats["pairs_dropped"] those not (a group's
        possible pairs under algo.pairs: 1, or n (n - 1) / 2 for all), and
        stats["paired_groups_reward"] sums every sample's score."""
        live = [x for x in group if any(x.loss_mask)]
        rng = random.Random(f"{self.cfg.train.seed}-{group[0].group}")
        chosen = select_pairs([x.score for x in live], self.a.pairs, self.a.min_pair_gap,
                              rng)
        n = len(group)
        # the policy's reward: every sample of the groups that reached pairing, not just
        # those paired (a best-against-worst pair's mean says nothing of the policy)
        stats["paired_groups_reward"] += sum(x.score for x in group)
        stats["paired_groups_samples"] += n
        stats["pairs"] += len(chosen)
        stats["pairs_dropped"] += (n * (n - 1) // 2 if self.a.pairs == "all" else 1) - len(chosen)
        return [dataclasses.replace(live[k], role=role)
                for i, j in chosen for k, role in ((i, "chosen"), (j, "rejected"))]

    def _within_thresholds(self, group: list[RolloutRecord], stats: Counter) -> bool:
        """reward.min_score/max_score: the group's samples outside them leave the loss
        (mask zeroed; they still count in the group's baseline), counted in `stats`;
        False when none is left."""
        rw = self.cfg.reward
        if rw.min_score is None and rw.max_score is None:
            return True
        import torch

        keep = within_thresholds(torch.tensor([x.score for x in group]), rw.min_score,
                                 rw.max_score).tolist()
        stats["outside_thresholds"] += keep.count(False)
        for rec, k in zip(group, keep):
            if not k:
                rec.loss_mask = [0] * len(rec.loss_mask)
        return any(keep)
