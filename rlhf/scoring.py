"""Score (prompt, response) pairs with a reward model exported by rlhf.rm.

    from rlhf.scoring import RewardScorer
    scorer = RewardScorer("runs/rm-.../model")
    scorer.score(["\\n\\nHuman: hi\\n\\nAssistant:"], [" Hello! How can I help?"])

Texts are tokenised exactly as in training (rlhf.data.tokenize_pair: prompt + response
+ EOS, or the chat template for message lists, truncated to the limits recorded in the
export's rlhf_reward.json), and the score is read where training read it: the head's
output at the last token, through transformers' own AutoModelForSequenceClassification.
Batches are sorted by length so that little padding is computed. For use from Ray
(PPO, evaluation) see cluster/scoring.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class RewardScorer:
    def __init__(self, path: str, *, dtype: str = "fp32", device: str | None = None,
                 batch_size: int | None = 16):
        """batch_size: sequences per forward (None: all of a score() call in one)."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from cluster.models import TORCH_DTYPES

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
        self.batch_size = batch_size

    def tokenize(self, prompt: Any, response: Any) -> list[int]:
        """The token ids training scored: prompt + response (+ EOS), truncated alike.
        Message lists (conversational data) go through the chat template."""
        from rlhf.data import tokenize_pair

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
