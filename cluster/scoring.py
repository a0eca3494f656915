"""Reward models exported by rlhf.rm, scored where they are needed: in this process
(RewardScorer), as a Ray actor of its own (evaluation: reward_actor), as a frozen
DeepSpeed engine inside the training workers (PPO: sharded_scorer), or as one term of
online RL's reward (model_source).

    scorer = RewardScorer("runs/rm-.../model")
    scorer.score(["\\n\\nHuman: hi\\n\\nAssistant:"], [" Hello! How can I help?"])

    scorer = reward_actor("runs/rm-.../model", num_gpus=1)
    scores = ray.get(scorer.score.remote(prompts, responses))

Texts are tokenised exactly as in training (rlhf.data.pipeline.tokenize_pair: prompt +
response + EOS, or the chat template for message lists, truncated to the limits recorded
in the export's rlhf_reward.json), and the score is read where training read it: the
head's output at the last token, through transformers' own
AutoModelForSequenceClassification. Batches are sorted by length so that little padding
is computed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cluster.deepspeed import frozen_engine
from cluster.models import TORCH_DTYPES, load_tokenizer
from rlhf.core.rewards import RewardError, RewardSource, call_function
from rlhf.data.pipeline import tokenize_pair


class RewardScorer:
    def __init__(self, path: str, *, dtype: str = "fp32", device: str | None = None,
                 batch_size: int | None = 16, wrap: Callable[[Any], Any] | None = None):
        """batch_size: sequences per forward (None: all of a score() call in one).
        wrap(model) -> the module that runs the forwards (sharded_scorer: a frozen
        DeepSpeed engine); its .device is where inputs go."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        meta_file = Path(path) / "rlhf_reward.json"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{path} has no rlhf_reward.json: not a reward model exported by rlhf.rm "
                "(train one with python -m rlhf.rm, then use its run directory's model/).")
        self.meta = json.loads(meta_file.read_text())
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, TORCH_DTYPES[dtype])).to(self.device).eval()
        if wrap is not None:
            self.model = wrap(self.model)
            self.device = str(self.model.device)
        self.batch_size = batch_size

    def tokenize(self, prompt: Any, response: Any) -> list[int]:
        """The token ids training scored: prompt + response (+ EOS), truncated alike.
        Message lists (conversational data) go through the chat template."""
        chat = not isinstance(prompt, str)
        if chat:
            prompt, response = json.dumps(list(prompt)), json.dumps(list(response))
        p, r, _, _, _, drop = tokenize_pair(
            self.tok, prompt, response, response, chat, self.meta["max_length"],
            self.meta["max_prompt_length"], "truncate")
        if drop:
            raise ValueError(f"cannot score this pair: {drop}")
        return p + r

    def score(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[float]:
        """One float per (prompt, response), in the order given."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        seqs = [self.tokenize(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        step = self.batch_size or max(1, len(seqs))
        for at in range(0, len(order), step):
            idx = order[at:at + step]
            for i, v in zip(idx, self._forward([seqs[i] for i in idx])):
                out[i] = v
        return out

    def dummy_forward(self) -> None:
        """One forward of a single token, scored for nothing: what a ZeRO-3 sharded
        scorer's rank with no responses runs, so that the others' gathers complete."""
        self._forward([[self.tok.eos_token_id]])

    def _forward(self, seqs: list[list[int]]) -> list[float]:
        """Right-padded token id lists -> the head's output at each one's last token."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits
        return logits[:, 0].float().tolist()


def reward_actor(path: str, *, num_cpus: float = 1, num_gpus: float = 0, **scorer_kwargs):
    """A started Ray actor holding the reward model at `path` (an rlhf.rm export)."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(RewardScorer).remote(
        path, **scorer_kwargs)


def sharded_scorer(path: str, ds_config: dict[str, Any], dtype: str) -> RewardScorer:
    """The reward model at `path` as a frozen DeepSpeed engine (ZeRO-3 sharded across the
    training workers and/or offloaded to CPU, as ds_config says), behind RewardScorer's
    tokenisation and score(). It scores a whole call in one forward, so that ZeRO-3
    ranks gather in step: every rank calls score() (or, with nothing to score,
    dummy_forward()) the same number of times."""
    return RewardScorer(path, dtype=dtype, device="cpu", batch_size=None,
                        wrap=lambda model: frozen_engine(model, ds_config))


def model_source(path: str, weight: float = 1.0, policy_path: str | None = None,
                 scorer: Any = None, **scorer_kw: Any) -> RewardSource:
    """A reward model exported by rlhf.rm, loaded here as a RewardScorer(path,
    **scorer_kw) unless `scorer` is one already (e.g. sharded_scorer).
    With policy_path, its tokenizer must be the policy's: it scores the policy's text as
    training tokenised it, and a different vocabulary means a model trained for another
    policy family."""
    scorer = scorer if scorer is not None else RewardScorer(path, **scorer_kw)
    if policy_path is not None:
        policy_tok = load_tokenizer(policy_path)
        if policy_tok.get_vocab() != scorer.tok.get_vocab():
            raise RewardError(
                f"reward model {path} has another tokenizer than the policy {policy_path} "
                f"({len(scorer.tok)} vs {len(policy_tok)} tokens): train "
                "the reward model from the policy's base (rlhf.rm model.name_or_path=...).")
    return RewardSource(path, weight, lambda p, r, m: call_function(
        lambda pp, rr, _: scorer.score(pp, rr), path, p, r, m))
