"""Packed causal attention without a mask over the whole row, with shared prompts.

A packed batch is one row holding several sequences back to back. Flash attention's
varlen kernel reads their boundaries from `cu_seq_lens_q` on recent NVIDIA GPUs.
Elsewhere transformers would build a dense (N, N) mask over the whole row and compute
every masked score too: for 16 sequences of ~200 tokens that is ~16x the attention work
of the sequences themselves. This kernel instead runs SDPA block by block.

A block may also share its prefix between branches: a DPO pair is laid out as
[prompt | chosen | rejected], and the rejected tokens attend to the prompt and to
themselves but not to the chosen ones (position ids continue from the prompt in both
branches). The prompt then goes through the model once instead of twice, and every
token still sees exactly what it would see in its own padded sequence.

torch only; cluster/models.py registers `attention_forward` with transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

NAME = "rlhf_varlen"

# (start, prefix length, branch lengths): tokens start..start+prefix are a causal
# sequence; each branch follows it in the row and attends to the prefix and itself.
Block = tuple[int, int, tuple[int, ...]]


def blocks_from_cu_seq_lens(cu_seq_lens: Sequence[int]) -> list[Block]:
    """[0, n_1, n_1 + n_2, ...] -> one block without branches per sequence."""
    return [(s, e - s, ()) for s, e in zip(cu_seq_lens[:-1], cu_seq_lens[1:])]


def _expand_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """Repeat the key/value heads to the query's head count (grouped query attention)."""
    if key.shape[1] == query.shape[1]:
        return key, value
    groups = query.shape[1] // key.shape[1]
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    blocks: Sequence[Block], *, scale: float | None = None,
                    dropout: float = 0.0) -> torch.Tensor:
    """Causal attention inside each block of a packed row.

    query: (1, H, N, D); key, value: (1, H_kv, N, D) with H a multiple of H_kv (grouped
    query attention); blocks cover 0..N in order.
    Returns (1, H, N, D): for a block (s, p, (c, r)) the tokens s..s+p+c attend causally
    among themselves, and the r tokens after them attend to the p prefix tokens and
    causally to each other, as if prefix + branch were one sequence of its own.
    """
    key, value = _expand_kv(query, key, value)
    # Every block's tokens are a contiguous run: split (not slicing: a slice's backward
    # writes a full-size zero tensor) into runs of prefix+first branch, then further
    # branches.
    runs: list[int] = []
    for _, prefix, branches in blocks:
        runs.append(prefix + (branches[0] if branches else 0))
        runs.extend(branches[1:])
    qs, ks, vs = query.split(runs, 2), key.split(runs, 2), value.split(runs, 2)
    outs, at = [], 0

    def sdpa(q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              scale=scale, dropout_p=dropout)

    for _, prefix, branches in blocks:
        q0, k0, v0 = qs[at], ks[at], vs[at]
        outs.append(sdpa(q0, k0, v0))
        at += 1
        for n in branches[1:]:
            # Keys: the prefix (all visible), then this branch (causal).
            k = torch.cat([k0[:, :, :prefix], ks[at]], 2)
            v = torch.cat([v0[:, :, :prefix], vs[at]], 2)
            mask = torch.ones(n, prefix + n, dtype=torch.bool, device=query.device)
            mask[:, prefix:] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
            outs.append(sdpa(qs[at], k, v, mask))
            at += 1
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """transformers' attention-function signature (see `AttentionInterface`).

    Packed inputs carry `packed_blocks` (shared prompts) or `cu_seq_lens_q` (plain
    sequences, the keyword flash attention reads too). Without either the row is one
    causal sequence, which is also right for right-padded rows; transformers builds no
    mask for this kernel (it is not registered with a mask function).
    Returns (attn_output (B, N, H, D), None).
    """
    blocks = kwargs.get("packed_blocks")
    if blocks is None:
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            cu = [0, query.shape[2]]
        blocks = blocks_from_cu_seq_lens(cu.tolist() if isinstance(cu, torch.Tensor) else cu)
    window = getattr(module, "sliding_window", None)
    softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    longest = max(p + max(b, default=0) for _, p, b in blocks)
    if softcap or (window and longest > window):
        raise NotImplementedError(
            f"{type(module).__name__} uses attention logit softcapping or a sliding window "
            f"({window}) shorter than a packed sequence ({longest} tokens), which the packed "
            "CPU kernel does not implement. Set data.packing=false, or use "
            "model.attn_implementation=flash_attention_2 on a GPU.")
    if query.shape[0] != 1:  # a padded batch: one causal sequence per row
        out = F.scaled_dot_product_attention(query, *_expand_kv(query, key, value),
                                             is_causal=True, scale=scaling, dropout_p=dropout)
    else:
        out = block_attention(query, key, value, blocks, scale=scaling, dropout=dropout)
    return out.transpose(1, 2).contiguous(), None
