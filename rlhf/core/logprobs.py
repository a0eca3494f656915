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
    share_prompt: bool = True,
) -> dict:
    """Padding-free layout of a pair batch: everything back to back in one row.

    With `share_prompt` pair i is laid out once as [prompt | chosen | rejected] (the
    prompt goes through the model once; rlhf/core/attention.py keeps the rejected tokens
    from seeing the chosen ones, read from `packed_blocks`). Without it, as flash
    attention's varlen kernel needs, the 2B sequences prompt+chosen (0..B-1) and
    prompt+rejected (B..2B-1) follow each other, their boundaries in `cu_seq_lens_q/k`.
    Either way position ids count from 0 through prompt and response, as in the padded
    layout, and sequence i < B is prompt+chosen of pair i, B + i its prompt+rejected.

    Only the logits that score a response token are computed (`logits_to_keep`).
    Returns, for N tokens in the row, S = 2B sequences, K kept and M scored positions:
      input_ids, position_ids: (1, N); logits_to_keep: (K,) row positions;
      score_at: (M,) index into the kept logits of the position predicting each response
      token; score_ids: (M,) that token; score_seq: (M,) its sequence (0..S-1);
      n_seqs: 0-d; seq_end: (S,) row position of each sequence's last token; and
      packed_blocks (list of (start, prompt, (chosen, rejected))) or
      cu_seq_lens_q = cu_seq_lens_k ((S + 1,) int32) with max_length_q/k.
    """
    ids: list[int] = []
    pos: list[int] = []
    score_pos: list[int] = []
    score_ids: list[int] = []
    score_seq: list[int] = []
    blocks, lengths = [], []
    n = len(prompts)
    ends = [0] * (2 * n)

    def scored(prompt_start: int, prompt_len: int, response: Sequence[int], seq: int):
        # Token j of a response is predicted at the position before it: the last prompt
        # token for j = 0, else response token j - 1 (at len(ids) + j - 1, called before
        # the response is appended). After an empty prompt nothing predicts the first
        # token, as in the padded layout.
        at = len(ids)
        for j, t in enumerate(response):
            if j == 0 and prompt_len == 0:
                continue
            score_pos.append(prompt_start + prompt_len - 1 if j == 0 else at + j - 1)
            score_ids.append(t)
            score_seq.append(seq)

    if share_prompt:
        for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
            start = len(ids)
            ids.extend(p)
            pos.extend(range(len(p)))
            for resp, seq in ((c, i), (r, n + i)):
                scored(start, len(p), resp, seq)
                ids.extend(resp)
                pos.extend(range(len(p), len(p) + len(resp)))
            blocks.append((start, len(p), (len(c), len(r))))
            ends[i], ends[n + i] = start + len(p) + len(c) - 1, len(ids) - 1
    else:
        for side, offset in ((chosen, 0), (rejected, n)):
            for i, (p, resp) in enumerate(zip(prompts, side)):
                start = len(ids)
                ids.extend(p)
                scored(start, len(p), resp, offset + i)
                ids.extend(resp)
                pos.extend(range(len(p) + len(resp)))
                lengths.append(len(p) + len(resp))
                ends[offset + i] = len(ids) - 1
    return _packed(ids, pos, score_pos, score_ids, score_seq, ends,
                   blocks if share_prompt else None, lengths)


def _packed(ids: list[int], pos: list[int], score_pos: list[int], score_ids: list[int],
            score_seq: list[int], ends: list[int], blocks: list | None,
            lengths: list[int]) -> dict:
    """The tensors of a packed row (see pack_pairs for the keys): `blocks` for the
    project's kernel, or else cu_seq_lens from the sequence `lengths`."""
    def longs(values) -> torch.Tensor:  # long even when empty
        return torch.tensor(values, dtype=torch.long)

    keep, score_at = torch.unique(longs(score_pos), return_inverse=True)
    out = {"input_ids": longs([ids]), "position_ids": longs([pos]),
           "logits_to_keep": keep, "score_at": score_at,
           "score_ids": longs(score_ids), "score_seq": longs(score_seq),
           "n_seqs": torch.tensor(len(ends)), "seq_end": longs(ends)}
    if blocks is not None:
        out["packed_blocks"] = blocks
    else:
        cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
                   max_length_k=max(lengths))
    return out


# ------------------------------------------------------------------ single sequences
# SFT examples: one sequence each, with a loss mask over the tokens trained on.


def pad_sequences(seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]],
                  pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, loss_mask, each (B, T)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        attention[i, : len(s)] = 1
        loss_mask[i, : len(m)] = torch.tensor(list(m), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


def pack_sequences(seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]],
                   blocks: bool = True) -> dict:
    """The sequences back to back in one row, no padding: the keys of `pack_pairs`, with
    S = B sequences, M = the trained tokens (mask 1, position > 0). `blocks` selects the
    project's kernel (`packed_blocks`, one block without branches per sequence); false
    gives flash attention's `cu_seq_lens`."""
    ids: list[int] = []
    pos: list[int] = []
    score_pos: list[int] = []
    score_ids: list[int] = []
    score_seq: list[int] = []
    ends: list[int] = []
    for i, (s, m) in enumerate(zip(seqs, masks)):
        start = len(ids)
        for t in range(1, len(s)):
            if m[t]:  # token t is predicted at the position before it
                score_pos.append(start + t - 1)
                score_ids.append(int(s[t]))
                score_seq.append(i)
        ids.extend(int(x) for x in s)
        pos.extend(range(len(s)))
        ends.append(len(ids) - 1)
    lengths = [len(s) for s in seqs]
    block_list = [(e + 1 - n, n, ()) for e, n in zip(ends, lengths)] if blocks else None
    return _packed(ids, pos, score_pos, score_ids, score_seq, ends, block_list, lengths)


def sequence_batch(seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], *,
                   pad_id: int, packing: bool, attn_implementation: str = "sdpa") -> dict:
    """The model input for single sequences: `pack_sequences` when packing (a model
    loaded with packing=True), else `pad_sequences`."""
    if packing:
        return pack_sequences(seqs, masks, blocks=attn_implementation != "flash_attention_2")
    return pad_sequences(seqs, masks, pad_id)


def _row_ids(rows: Sequence[dict], key: str) -> list[list[int]]:
    # numpy arrays from Ray Data, or lists
    return [r[key].tolist() if hasattr(r[key], "tolist") else list(r[key]) for r in rows]


def rows_sequence_batch(rows: Sequence[dict], *, pad_id: int, packing: bool,
                        attn_implementation: str = "sdpa") -> dict:
    """`sequence_batch` of tokenised SFT rows (input_ids, loss_mask)."""
    return sequence_batch(_row_ids(rows, "input_ids"), _row_ids(rows, "loss_mask"),
                          pad_id=pad_id, packing=packing,
                          attn_implementation=attn_implementation)


def packed_sequence_logprobs(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of response log-probs from a `pack_pairs` batch.

    logits: (1, K, V) at the batch's `logits_to_keep` positions. Returns
    (sum_logps (S,), n_tokens (S,)) in the `pad_pairs` order, S = batch["n_seqs"].
    """
    dev = logits.device
    picked = logits[0].index_select(0, batch["score_at"].to(dev))  # (M, V)
    per_token = token_logprobs(picked, batch["score_ids"].to(dev))
    seq, n = batch["score_seq"].to(dev), int(batch["n_seqs"])
    sums = torch.zeros(n, dtype=per_token.dtype, device=dev).index_add(0, seq, per_token)
    counts = torch.zeros(n, dtype=per_token.dtype, device=dev).index_add(
        0, seq, torch.ones_like(per_token))
    return sums, counts


def pair_batch(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    *,
    pad_id: int,
    packing: bool,
    attn_implementation: str = "sdpa",
) -> dict:
    """The model input for a pair batch: `pack_pairs` when packing, else `pad_pairs`.

    A packed batch needs a model loaded with a packed attention kernel
    (cluster.models.load_causal_lm(packing=True)); the prompt is shared between chosen
    and rejected except under flash attention, whose varlen kernel cannot express that.
    """
    if packing:
        return pack_pairs(prompts, chosen, rejected,
                          share_prompt=attn_implementation != "flash_attention_2")
    return pad_pairs(prompts, chosen, rejected, pad_id)


PAIR_SIDES = ("chosen_ids", "rejected_ids")
# A KTO row's two responses to one prompt: its own completion and the mismatched one of
# the KL reference point (rlhf.data.unpaired). As a pair batch the prompt runs once.
UNPAIRED_SIDES = ("completion_ids", "kl_completion_ids")


def rows_pair_batch(rows: Sequence[dict], *, pad_id: int, packing: bool,
                    attn_implementation: str = "sdpa", sides: tuple[str, str] = PAIR_SIDES
                    ) -> dict:
    """`pair_batch` of tokenised pipeline rows: prompt_ids and the two response columns
    `sides` (chosen_ids, rejected_ids; or a KTO row's UNPAIRED_SIDES)."""
    return pair_batch(_row_ids(rows, "prompt_ids"), _row_ids(rows, sides[0]),
                      _row_ids(rows, sides[1]), pad_id=pad_id, packing=packing,
                      attn_implementation=attn_implementation)


def rows_response_batch(rows: Sequence[dict], *, pad_id: int, packing: bool,
                        attn_implementation: str = "sdpa", response: str = "completion_ids"
                        ) -> dict:
    """`response_batch` of tokenised unpaired rows (KTO): prompt_ids + the `response`
    column (completion_ids, or kl_completion_ids for the mismatched pairs)."""
    return response_batch(_row_ids(rows, "prompt_ids"), _row_ids(rows, response),
                          pad_id=pad_id, packing=packing,
                          attn_implementation=attn_implementation)


def dummy_unpaired_rows(token_id: int) -> list[dict]:
    """One minimal unpaired row (every part a single token) for a zero-weight forward."""
    one = [token_id]
    return [{"prompt_ids": one, "completion_ids": one, "kl_completion_ids": one,
             "label": True}]


def dummy_sequence_rows(token_id: int) -> list[dict]:
    """One two-token example (the second trained on), for a zero-weight forward."""
    return [{"input_ids": [token_id, token_id], "loss_mask": [0, 1]}]


def dummy_pair_rows(token_id: int) -> list[dict]:
    """One minimal pair (every part a single token) for a zero-weight forward: a worker
    out of data still joins every collective (ZeRO-3 gathers), see cluster.feed.RowFeed."""
    one = [token_id]
    return [{"prompt_ids": one, "chosen_ids": one, "rejected_ids": one,
             "ref_chosen": 0.0, "ref_rejected": 0.0}]


MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "logits_to_keep",
              "packed_blocks", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
              "max_length_k")


def model_inputs(batch: dict, device) -> dict:
    """The keyword arguments of a causal LM forward for a `pair_batch` or
    `sequence_batch` result."""
    return {k: batch[k].to(device) if isinstance(batch[k], torch.Tensor) else batch[k]
            for k in MODEL_KEYS if k in batch}


def sequence_end_values(values: torch.Tensor, batch: dict,
                        pad_id: int | None = None) -> torch.Tensor:
    """(S,) the value at each sequence's last token (a reward model's score is read
    there), for either layout, in the `pad_pairs` order.

    values: (R, T) per-position values of a `pad_pairs` batch (R = S rows, right-padded)
    or (1, N) of a `pack_pairs` batch. With pad_id, the last token that is not pad_id,
    as transformers' AutoModelForSequenceClassification reads it (this matters when a
    tokenizer pads with its EOS token: the score then comes from the token before it).
    """
    dev = values.device
    packed = "seq_end" in batch
    if packed:
        rows = torch.zeros_like(batch["seq_end"]).to(dev)
        ends = batch["seq_end"].to(dev)
    else:
        rows = torch.arange(values.shape[0], device=dev)
        ends = batch["attention_mask"].to(dev).sum(-1) - 1
    if pad_id is not None:
        ids = batch["input_ids"].to(dev)
        pos = torch.arange(ids.shape[1], device=dev).expand_as(ids)
        last_real = torch.where(ids != pad_id, pos, torch.zeros_like(pos)).cummax(-1).values
        ends = last_real[rows, ends]
    return values[rows, ends]


def batch_logprobs(logits: torch.Tensor, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) summed log-probs of the scored tokens and their counts, per sequence, for
    any layout: a pair batch (S = 2B, responses scored) or a sequence batch (S = B,
    loss-mask tokens scored)."""
    if "score_seq" in batch:
        return packed_sequence_logprobs(logits, batch)
    return sequence_logprobs(logits, batch["input_ids"].to(logits.device),
                             batch["loss_mask"].to(logits.device))


def ld_sums(per_token: torch.Tensor, seq: torch.Tensor, n_seqs: int, alpha: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's length-desensitised sums (Liu et al. 2024, eq. 9) of a pair batch.

    per_token: (M,) response-token log-probs, each sequence's in position order, and seq:
    (M,) their sequence index (`scored_token_logprobs`), over S = n_seqs = 2B sequences
    (chosen 0..B-1, rejected B..2B-1). Each pair's first min(|y_c|, |y_r|) tokens count
    fully and the longer response's tail by alpha (1: the plain sums, 0: the tail
    ignored). Returns (sums (S,), token counts (S,)), the counts unweighted."""
    counts = torch.bincount(seq, minlength=n_seqs)
    starts = torch.cumsum(counts, 0) - counts
    # each token's place in its response; a packed batch interleaves the sequences
    # (chosen i, rejected i, ...), so rank the tokens by sequence first, stably
    order = torch.argsort(seq, stable=True)
    pos = torch.empty_like(seq)
    pos[order] = torch.arange(seq.shape[0], device=seq.device) - starts[seq[order]]
    half = n_seqs // 2
    shared = torch.minimum(counts[:half], counts[half:]).repeat(2)
    w = torch.where(pos < shared[seq], 1.0, float(alpha)).to(per_token.dtype)
    sums = torch.zeros(n_seqs, dtype=per_token.dtype, device=per_token.device)
    return sums.index_add(0, seq, per_token * w), counts.to(per_token.dtype)


# ------------------------------------------------------------- responses (online RL)


def response_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                   pad_id: int, packing: bool, attn_implementation: str = "sdpa") -> dict:
    """The model input scoring each response token given its prompt: a `sequence_batch`
    of prompt + response with the loss mask on the response."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)]
    return sequence_batch(seqs, masks, pad_id=pad_id, packing=packing,
                          attn_implementation=attn_implementation)


def scored_positions(x: torch.Tensor, batch: dict, full_length: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a per-position tensor x ((B, L, ...) padded, (1, L', ...) packed) at the
    positions that predict a `sequence_batch`'s scored tokens, in (sequence, position)
    order: (picked (M, ...), sequence index (M,)). For logits these give the scored
    tokens' log-probs; for a value head, the value of the state each token is drawn in.
    A packed causal LM returns only the `logits_to_keep` positions (L' of them); give
    full_length=True for an x over all L positions (a value head's output)."""
    dev = x.device
    if "score_seq" in batch:
        at = batch["score_at"]
        if full_length and "logits_to_keep" in batch:
            at = batch["logits_to_keep"][at]
        return x[0].index_select(0, at.to(dev)), batch["score_seq"].to(dev)
    mask = batch["loss_mask"].to(dev)[:, 1:].bool()
    rows = torch.arange(mask.shape[0], device=dev)[:, None].expand_as(mask)
    return x[:, :-1][mask], rows[mask]


def scored_token_logprobs(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the scored tokens of a `sequence_batch` (either layout), in
    (sequence, position) order: (values (M,) float32, sequence index (M,))."""
    picked, seq = scored_positions(logits, batch)
    if "score_seq" in batch:
        ids = batch["score_ids"].to(logits.device)
    else:
        ids = batch["input_ids"].to(logits.device)[:, 1:][
            batch["loss_mask"].to(logits.device)[:, 1:].bool()]
    return token_logprobs(picked, ids), seq


def right_padded(values: torch.Tensor, seq: torch.Tensor, n_seqs: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) values in (sequence, position) order -> (values (S, T), mask (S, T)), each
    sequence's values from column 0, T the longest; 0 where mask is 0."""
    counts = torch.bincount(seq, minlength=n_seqs)
    width = int(counts.max()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(values.shape[0], device=values.device) - starts[seq]
    out = torch.zeros(n_seqs, width, dtype=values.dtype, device=values.device)
    mask = torch.zeros(n_seqs, width, dtype=values.dtype, device=values.device)
    out[seq, col] = values
    mask[seq, col] = 1
    return out, mask
