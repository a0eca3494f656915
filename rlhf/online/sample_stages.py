"""rlhf.sample's two Ray Data stages, each an actor pool of `map_batches`:

    GenerateStage   one vLLM engine per actor (cluster.vllm_engines.RolloutEngine, in the
                    actor's own process): a batch of prompts -> n samples of each, seeded
                    per prompt (cluster.vllm_engines.sample_seed), so the samples depend on
                    the prompt and the weights alone, not on the batch or the engine
    ScoreStage      the reward sources of the reward section, as rlhf.ppo scores them
                    (rlhf/online/reward_sources.py), the reward models and the judge held
                    in the actor (cluster.scoring.RewardScorer, cluster.judge_service)

Rows between them (one per prompt; lists travel as JSON text):
    id, prompt, chat, metadata, drop        as rlhf.data.prompts reads them
    prompt_text                             the prompt as the engine saw it (templated)
    responses                               JSON [n texts]
    response_tokens, cut                    tokens generated; samples cut at the budget
    scores, parts                           JSON [n floats]; JSON [n {source: score}]
    error                                   "" or, where a stage failed on the block,
                                            "<type>: <message>" (the driver stops with it:
                                            Ray Data would hand it over only as text)
A prompt too long for data.max_prompt_length, or (reward.remote_errors=skip) one whose
samples the endpoint did not score, carries its reason in `drop` and no samples.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from cluster.judge_service import PairwiseJudge
from cluster.models import load_tokenizer
from cluster.scoring import RewardScorer
from cluster.vllm_engines import RolloutEngine, RolloutSettings, sample_seed
from rlhf.data.prompts import tokenize_prompt
from rlhf.online.reward_sources import build_rewards, judge_scores

DROP_UNSCORED = "reward.remote_url gave no score (reward.remote_errors=skip)"


class GenerateStage:
    def __init__(self, model_path: str, settings: dict, sampling: dict,
                 max_prompt_length: int):
        """sampling: n, temperature, top_p, max_tokens, seed."""
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.engine = RolloutEngine(model_path, RolloutSettings(**settings))
        self.tok = load_tokenizer(model_path)
        self.s, self.max_prompt_length = sampling, max_prompt_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._generate(batch)
        except Exception as e:  # noqa: BLE001 - handed to the driver, which stops with it
            return failed(batch, e, "responses", "prompt_text")

    def _generate(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = self.s
        rows = len(batch["id"])
        drops = [str(d) for d in batch["drop"]]
        ids: list[list[int]] = [[] for _ in range(rows)]
        for i in range(rows):
            if not drops[i]:
                ids[i], drops[i] = tokenize_prompt(self.tok, str(batch["prompt"][i]),
                                                   bool(batch["chat"][i]),
                                                   self.max_prompt_length)
        live = [i for i in range(rows) if not drops[i]]
        outs = self.engine.generate(
            [ids[i] for i in live], n=s["n"], temperature=s["temperature"], top_p=s["top_p"],
            max_tokens=s["max_tokens"],
            seeds=[sample_seed(s["seed"], "sample", int(batch["id"][i]), s["n"]) for i in live]
        ) if live else []
        responses, tokens, cut = [[] for _ in range(rows)], [0] * rows, [0] * rows
        for i, samples in zip(live, outs):
            responses[i] = [self.tok.decode(x["token_ids"], skip_special_tokens=True)
                            for x in samples]
            tokens[i] = sum(len(x["token_ids"]) for x in samples)
            cut[i] = sum(x["finish_reason"] == "length" for x in samples)
        return {**batch, "drop": np.array(drops, dtype=object),
                "prompt_text": np.array([self.tok.decode(x) for x in ids], dtype=object),
                "responses": np.array([json.dumps(r) for r in responses], dtype=object),
                "response_tokens": np.array(tokens, dtype=np.int64),
                "cut": np.array(cut, dtype=np.int64),
                "error": np.array([""] * rows, dtype=object)}


class ScoreStage:
    def __init__(self, reward_cfg, model_paths: list[str], gold_path: str | None,
                 judge_path: str | None, dtype: str, device: str | None):
        """reward_cfg: the reward section; the paths: resolved reward models (in
        reward.models' order), the gold reward model and the judge, or None."""
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        scorers = [RewardScorer(p, dtype=dtype, device=device) for p in model_paths]
        gold = RewardScorer(gold_path, dtype=dtype, device=device) if gold_path else None
        self.rewards, _ = build_rewards(reward_cfg, [x.score for x in scorers],
                                        gold.score if gold is not None else None)
        self.judge = PairwiseJudge(judge_path, dtype=dtype, device=device) if judge_path else None
        self.cfg = reward_cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if any(batch["error"]):  # the engine failed on this block: passed on as it is
            return failed(batch, None, "scores", "parts")
        try:
            return self._score(batch)
        except Exception as e:  # noqa: BLE001 - handed to the driver, which stops with it
            return failed(batch, e, "scores", "parts")

    def _score(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["id"])
        responses = [json.loads(r) for r in batch["responses"]]
        texts, resp, meta, groups, samples = [], [], [], [], []
        for i in range(rows):
            m = json.loads(str(batch["metadata"][i]))
            for k, r in enumerate(responses[i]):
                texts.append(str(batch["prompt_text"][i]))
                resp.append(r)
                meta.append(m)
                groups.append(i)
                samples.append(k)
        extra = []
        if self.judge is not None and resp:
            extra.append(("judge", self.cfg.judge_weight, judge_scores(
                self.judge.score, self.cfg.judge_baseline, texts, resp, meta, groups, samples)))
        total, parts = self.rewards(texts, resp, meta, groups=groups, extra=extra)
        scores: list[list[float]] = [[] for _ in range(rows)]
        each: list[list[dict]] = [[] for _ in range(rows)]
        for j, g in enumerate(groups):
            scores[g].append(total[j])
            each[g].append({name: v[j] for name, v in parts.items()})
        drops = [str(d) for d in batch["drop"]]
        for i in range(rows):
            if any(math.isnan(x) for x in scores[i]):  # a remote batch skipped
                drops[i], scores[i], each[i] = DROP_UNSCORED, [], []
        return {**batch, "drop": np.array(drops, dtype=object),
                "scores": np.array([json.dumps(x) for x in scores], dtype=object),
                "parts": np.array([json.dumps(x) for x in each], dtype=object)}


def failed(batch: dict[str, np.ndarray], e: Exception | None, *columns: str
           ) -> dict[str, np.ndarray]:
    """The block as a stage that failed on it hands it on: `error` set (to e, or kept
    from an earlier stage), the stage's own columns empty, the engine's counts zero."""
    rows = len(batch["id"])
    out = {**batch, **{c: np.array(["[]"] * rows, dtype=object) for c in columns}}
    out.setdefault("response_tokens", np.zeros(rows, dtype=np.int64))
    out.setdefault("cut", np.zeros(rows, dtype=np.int64))
    if e is not None:
        out["error"] = np.array([f"{type(e).__name__}: {e}"] * rows, dtype=object)
    return out
