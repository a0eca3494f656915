"""A pairwise judge (any causal LM: an instruction model, or the policy's own base) asked
which of two responses is better, in both orders, its preference read from the log-probs
of its answer letters (rlhf.data.judge_question; nothing it writes is parsed) and
debiased for position (rlhf.core.pairwise.two_order_preference). rlhf.ppo serves it like
a reward model (cluster.reward_service.start_reward_pool(..., actor=ServedJudge)): each
sample is scored by P(sample better than a baseline response).

    judge = PairwiseJudge("Qwen/Qwen2.5-0.5B-Instruct")
    judge.prefer(prompts, a, b)                  # P(a_i better than b_i), in [0, 1]
    judge.score(prompts, [(response, baseline), ...])   # the same, as a reward source
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.models import TORCH_DTYPES, load_tokenizer
from rlhf.core.logprobs import pad_sequences, sequence_logprobs
from rlhf.core.pairwise import two_order_preference
from rlhf.data.judge_question import judge_prompt
from rlhf.data.pipeline import common_prefix_len


class PairwiseJudge:
    def __init__(self, path: str, *, dtype: str = "fp32", device: str | None = None,
                 batch_size: int = 8, max_length: int = 1024):
        """batch_size: sequences per forward (each pair asks 4: 2 orders x 2 letters);
        max_length: the longest question in tokens (its start is cut)."""
        import torch
        from transformers import AutoModelForCausalLM

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = load_tokenizer(path)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, TORCH_DTYPES[dtype])).to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
               ) -> list[float]:
        """P(a_i better than b_i) for each prompt, both orders asked."""
        import torch

        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"{len(prompts)} prompts, {len(a)} and {len(b)} responses")
        seqs: list[list[int]] = []
        for p, x, y in zip(prompts, a, b):
            for first, second in ((x, y), (y, x)):
                seqs += judge_prompt(self.tok, str(p), str(first), str(second), False,
                                     self.max_length)
        # each question's two endings: the log-prob of what follows their shared prefix
        starts = [max(1, min(common_prefix_len(seqs[i], seqs[i ^ 1]), len(seqs[i]) - 1))
                  for i in range(len(seqs))]
        lps = torch.tensor(self._tail_logprobs(seqs, starts), dtype=torch.float64)
        table = lps.reshape(-1, 2, 2)  # (pairs, order, letter)
        return two_order_preference(table[:, 0], table[:, 1]).tolist()

    def score(self, prompts: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[float]:
        """As a reward source: P(response better than baseline) for each (response,
        baseline) pair (the reward pool's score(prompts, responses) interface)."""
        return self.prefer(prompts, [r for r, _ in pairs], [b for _, b in pairs])

    def _tail_logprobs(self, seqs: list[list[int]], starts: list[int]) -> list[float]:
        """Summed log-probs of seqs[i][starts[i]:] given what precedes, in batches."""
        import torch

        out: list[float] = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for at in range(0, len(seqs), self.batch_size):
            batch, first = seqs[at:at + self.batch_size], starts[at:at + self.batch_size]
            # the letters' tokens are the scored ones (a loss mask of 1 from `start` on)
            scored = [[0] * s + [1] * (len(q) - s) for q, s in zip(batch, first)]
            b = pad_sequences(batch, scored, pad)
            with torch.no_grad():
                logits = self.model(input_ids=b["input_ids"].to(self.device),
                                    attention_mask=b["attention_mask"].to(self.device)).logits
            sums, _ = sequence_logprobs(logits, b["input_ids"].to(logits.device),
                                        b["loss_mask"].to(logits.device))
            out += sums.tolist()
        return out
