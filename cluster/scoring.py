"""Reward models (exported by rlhf.rm, or Hugging Face sequence-classification models
with one output) scored where they are needed: in this process (RewardScorer), as a Ray
actor of its own (evaluation: reward_actor), or served to online RL by a pool of
replicas (cluster.reward_service).

    scorer = RewardScorer("runs/rm-.../model")
    scorer.score(["\\n\\nHuman: hi\\n\\nAssistant:"], [" Hello! How can I help?"])

    scorer = reward_actor("runs/rm-.../model", num_gpus=1)
    scores = ray.get(scorer.score.remote(prompts, responses))

Texts are tokenised exactly as in training (rlhf.data.pipeline.tokenize_pair: prompt +
response + EOS, or the chat template for message lists, truncated to the limits recorded
in the export's rlhf_reward.json; another project's model: its own tokenizer, at most
FOREIGN_MAX_LENGTH tokens), and the score is read where training read it: the head's
output at the last token, through transformers' own AutoModelForSequenceClassification.
Batches are sorted by length so that little padding is computed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.models import FOREIGN_MAX_LENGTH, TORCH_DTYPES, is_reward_model
from rlhf.core.logprobs import pad_sequences
from rlhf.data.pipeline import tokenize_pair


class RewardScorer:
    def __init__(self, path: str, *, dtype: str = "fp32", device: str | None = None,
                 batch_size: int | None = 16):
        """batch_size: sequences per forward (None: all of a score() call in one)."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not is_reward_model(path):
            raise FileNotFoundError(
                f"{path} is not a reward model: neither exported by rlhf.rm (no "
                "rlhf_reward.json) nor a Hugging Face sequence-classification model with "
                "one output (train one with python -m rlhf.rm, then use its run "
                "directory's model/).")
        meta_file = Path(path) / "rlhf_reward.json"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(path)
        if meta_file.is_file():
            self.meta = json.loads(meta_file.read_text())
        else:  # another project's reward model: its own context length, the prompt half
            longest = min(int(self.tok.model_max_length), FOREIGN_MAX_LENGTH)
            self.meta = {"max_length": longest, "max_prompt_length": longest // 2,
                         "truncation": "truncate"}
        if self.tok.pad_token_id is None:  # padding is masked out: any id will do
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, TORCH_DTYPES[dtype])).to(self.device).eval()
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

    def _forward(self, seqs: list[list[int]]) -> list[float]:
        """Right-padded token id lists -> the head's output at each one's last token."""
        import torch

        b = pad_sequences(seqs, [()] * len(seqs), self.tok.pad_token_id)
        ids, mask = b["input_ids"], b["attention_mask"]
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits
        return logits[:, 0].float().tolist()


def reward_actor(path: str, *, num_cpus: float = 1, num_gpus: float = 0, **scorer_kwargs):
    """A started Ray actor holding the reward model at `path` (an rlhf.rm export)."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(RewardScorer).remote(
        path, **scorer_kwargs)
