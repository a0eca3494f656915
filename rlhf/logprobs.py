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


def pack_pairs(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    capacity: int,
    float_dtype: torch.dtype = torch.float32,
    with_mask: bool = True,
) -> dict[str, torch.Tensor]:
    """Padding-free layout of a pair batch: the 2B sequences packed into rows.

    Sequence i < B is prompt+chosen of pair i, B + i its prompt+rejected (the same order
    as `pad_pairs`). Sequences are placed first-fit-decreasing into rows of at most
    `capacity` tokens (a sequence longer than that gets a row of its own), so padding is
    only at the end of rows.

    Returns (R rows, width T):
      input_ids (R, T), position_ids (R, T) restarting at 0 for every sequence,
      loss_mask (R, T) 1 on response tokens, seq_index (R, T) the sequence each token
      belongs to (-1 on padding), and, with `with_mask`, attention_mask (R, 1, T, T): an
      additive float mask, 0 where a token may attend (earlier tokens of its own sequence)
      and the dtype's minimum elsewhere, so attention never crosses sequences. Without
      it (flash-attention varlen on GPU) the restarting position_ids mark the boundaries.
    """
    seqs, masks = [], []
    for side in (chosen, rejected):
        for p, c in zip(prompts, side):
            seqs.append(list(p) + list(c))
            masks.append([0] * len(p) + [1] * len(c))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(seqs[i])
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(capacity, n) - n)
    width = max(sum(len(seqs[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.long)
    seq_index = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(seqs[i])
            input_ids[r, at:at + n] = torch.tensor(seqs[i], dtype=torch.long)
            position_ids[r, at:at + n] = torch.arange(n)
            loss_mask[r, at:at + n] = torch.tensor(masks[i], dtype=torch.long)
            seq_index[r, at:at + n] = i
            at += n
    out = {"input_ids": input_ids, "position_ids": position_ids, "loss_mask": loss_mask,
           "seq_index": seq_index, "n_seqs": torch.tensor(len(seqs))}
    if with_mask:
        same = seq_index.unsqueeze(2) == seq_index.unsqueeze(1)  # (R, T, T)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        # Padding rows attend to themselves only, which keeps softmax finite.
        allowed = (same & causal & (seq_index >= 0).unsqueeze(2)) | torch.eye(width, dtype=torch.bool)
        mask = torch.zeros((len(rows), 1, width, width), dtype=float_dtype)
        mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(float_dtype).min)
        out["attention_mask"] = mask
    return out


def packed_sequence_logprobs(
    logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of response log-probs from a `pack_pairs` batch.

    logits: (R, T, V). Returns (sum_logps (S,), n_tokens (S,)) in the `pad_pairs` order,
    S = batch["n_seqs"]. A position predicts the next one only inside its own sequence.
    """
    seq = batch["seq_index"].to(logits.device)
    ids = batch["input_ids"].to(logits.device)
    same_next = (seq[:, 1:] == seq[:, :-1]) & (seq[:, 1:] >= 0)
    mask = batch["loss_mask"].to(logits.device)[:, 1:].float() * same_next.float()
    per_token = token_logprobs(logits[:, :-1], ids[:, 1:]) * mask
    n = int(batch["n_seqs"])
    target = seq[:, 1:].clamp(min=0).reshape(-1)
    sums = torch.zeros(n, dtype=per_token.dtype, device=logits.device).index_add(
        0, target, per_token.reshape(-1))
    counts = torch.zeros(n, dtype=mask.dtype, device=logits.device).index_add(
        0, target, mask.reshape(-1))
    return sums, counts


def pair_batch(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    *,
    pad_id: int,
    packing: bool,
    varlen: bool = False,
    float_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The model input for a pair batch: `pad_pairs`, or `pack_pairs` when packing.

    With a dense block-diagonal mask, rows as wide as the longest sequence keep the
    attention cost at or below the padded layout's while the padding goes; flash
    attention's varlen path (`varlen`) needs no mask, so everything goes into one row.
    """
    if not packing:
        return pad_pairs(prompts, chosen, rejected, pad_id)
    lengths = [(len(p), len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)]
    capacity = (sum(2 * p + c + r for p, c, r in lengths) if varlen
                else max(p + max(c, r) for p, c, r in lengths))
    return pack_pairs(prompts, chosen, rejected, capacity=capacity, float_dtype=float_dtype,
                      with_mask=not varlen)


def model_inputs(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The keyword arguments of a causal LM forward for a `pair_batch` result."""
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")
            if k in batch}


def pair_logprobs(logits: torch.Tensor, batch: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) summed response log-probs and token counts, for either layout."""
    if "seq_index" in batch:
        return packed_sequence_logprobs(logits, batch)
    return sequence_logprobs(logits, batch["input_ids"].to(logits.device),
                             batch["loss_mask"].to(logits.device))
