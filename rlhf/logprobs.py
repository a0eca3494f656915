"""Per-token and per-sequence log-probabilities, and the padded pair batch they read.

torch only: no Ray, DeepSpeed or transformers here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t] | prefix) for every position.

    logits: (B, T, V), already aligned so that logits[:, t] predicts labels[:, t].
    labels: (B, T) token ids; any value is fine where the mask will be zero.
    Returns (B, T) float32. Computed in fp32 whatever the logits dtype, since bf16
    log-softmax loses about two decimal digits per token.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probs per row of a causal LM batch.

    logits: (B, T, V) from the model on input_ids (B, T); loss_mask: (B, T), 1 on the
    tokens whose probability counts (the response), 0 on prompt and padding.
    Returns (sum_logps (B,), n_tokens (B,)), both float32. The shift by one position
    (logits at t predict token t+1) happens here.
    """
    labels = input_ids[:, 1:]
    mask = loss_mask[:, 1:].float()
    per_token = token_logprobs(logits[:, :-1], labels) * mask
    return per_token.sum(-1), mask.sum(-1)


def pad_pairs(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    pad_id: int,
    pad_to_multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """One right-padded batch of [prompt+chosen ...; prompt+rejected ...] rows.

    For B pairs returns input_ids, attention_mask, loss_mask of shape (2B, T): rows
    0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones, so that one
    forward pass serves both halves (the "concatenated forward" of DPO).
    """
    seqs, masks = [], []
    for side in (chosen, rejected):
        for p, c in zip(prompts, side):
            seqs.append(list(p) + list(c))
            masks.append([0] * len(p) + [1] * len(c))
    width = max(len(s) for s in seqs)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) values of a `pad_pairs` batch -> (chosen (B, ...), rejected (B, ...))."""
    half = values.shape[0] // 2
    return values[:half], values[half:]
