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


# On CUDA in bf16/fp16 the blocks go to one flash-attention varlen call instead of a loop
# of small SDPA calls (measured on an H200, 125M Llama, 16 pairs: the loop ran at a
# quarter of the padded layout's tokens/s, launch-bound). False keeps the loop (benchmarks).
GPU_VARLEN = True
_plan_cache: list = []  # [(blocks, device, plan)] for the batch in flight: built once, read by every layer


def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def _varlen_takes(scale: float | None, head_dim: int) -> bool:
    """torch has varlen attention, and it can apply this scale (torch 2.10's takes none
    and uses 1/sqrt(head_dim), which is what Llama-style models use)."""
    import inspect

    fn = _varlen_fn()
    if fn is None:
        return False
    return (scale is None or "scale" in inspect.signature(fn).parameters
            or abs(scale - head_dim ** -0.5) < 1e-9)


def _varlen_plan(blocks: Sequence[Block], device) -> tuple:
    """Keys gathered per varlen sequence, and the cumulative lengths.

    Queries stay in row order: a block's prefix + first branch is one sequence; each
    further branch is a sequence whose queries are its own tokens and whose keys are the
    prefix then its tokens (flash attention aligns causal masks bottom-right, so query
    j of the branch sees the prefix and branch tokens 0..j).
    """
    if _plan_cache and _plan_cache[0][0] is blocks and _plan_cache[0][1] == device:
        return _plan_cache[0][2]
    keys: list[int] = []
    cu_q, cu_k = [0], [0]
    shared = False
    for start, prefix, branches in blocks:
        first = prefix + (branches[0] if branches else 0)
        keys.extend(range(start, start + first))
        cu_q.append(cu_q[-1] + first)
        cu_k.append(cu_k[-1] + first)
        at = start + first
        for n in branches[1:]:
            shared = True
            keys.extend(range(start, start + prefix))
            keys.extend(range(at, at + n))
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + prefix + n)
            at += n
    q_lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
    k_lens = [b - a for a, b in zip(cu_k, cu_k[1:])]
    plan = (torch.tensor(keys, dtype=torch.long, device=device) if shared else None,
            torch.tensor(cu_q, dtype=torch.int32, device=device),
            torch.tensor(cu_k, dtype=torch.int32, device=device), max(q_lens), max(k_lens))
    _plan_cache[:] = [(blocks, device, plan)]
    return plan


def varlen_block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           blocks: Sequence[Block], *, scale: float | None = None
                           ) -> torch.Tensor:
    """`block_attention` in one flash-attention varlen call (CUDA, bf16/fp16).

    Same shapes and result as block_attention; a shared prefix is gathered once more for
    each further branch's keys and values (index_select), never recomputed.
    """
    import inspect

    varlen_attn = _varlen_fn()
    key, value = _expand_kv(query, key, value)
    index, cu_q, cu_k, max_q, max_k = _varlen_plan(blocks, query.device)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, H, D)
    if index is not None:
        k, v = k.index_select(0, index), v.index_select(0, index)
    # The causal switch moved between torch releases (2.10: is_causal; later: window_size).
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    kwargs = {"scale": scale} if "scale" in params else {}
    out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q,
                      max_k, **causal, **kwargs)
    return out.transpose(0, 1).unsqueeze(0)


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
    elif (GPU_VARLEN and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
          and not (dropout and module.training) and _varlen_takes(scaling, query.shape[-1])):
        out = varlen_block_attention(query, key, value, blocks, scale=scaling)
    else:
        out = block_attention(query, key, value, blocks, scale=scaling, dropout=dropout)
    return out.transpose(1, 2).contiguous(), None
