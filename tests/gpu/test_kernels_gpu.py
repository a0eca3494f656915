"""The packed shared-prompt layout on CUDA, without Ray or DeepSpeed: the block kernel
(rlhf/core/attention.py) and a packed model (attn_implementation "rlhf_varlen") give the
padded layout's per-token log-probs in fp32 and bf16. The CPU versions are in
tests/unit/test_packing.py, whose helpers these reuse. Skipped without a CUDA GPU.

Tolerances: fp32 close to the CPU test's (CUDA kernels sum in another order); bf16 at
3e-2 per token, where the tiny model's own bf16 error is ~5e-3 and a prompt-sharing
layout that let the rejected tokens see the chosen ones is off by ~0.4.
"""

import pytest
import torch

from tests.unit.test_packing import _pairs, _reference_attention

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKEN_ATOL = {"fp32": 1e-4, "bf16": 3e-2}
GRAD_RTOL = {"fp32": 1e-3, "bf16": 5e-2}  # |g_packed - g_padded| / |g_padded|, whole model


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_block_kernel_on_cuda(dtype):
    from rlhf.core.attention import block_attention

    torch.manual_seed(0)
    dt = DTYPES[dtype]
    # block 0: prompt 37, chosen 21, rejected 45 (lengths past a kernel tile);
    # block 1: one plain sequence of 30
    blocks = [(0, 37, (21, 45)), (103, 30, ())]
    n = 133
    q = torch.randn(1, 8, n, 64, device="cuda", dtype=dt)
    k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=dt) for _ in range(2))  # GQA 8:2
    out = block_attention(q, k, v, blocks).float()
    q, k, v = q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1)

    def causal(m):
        return torch.ones(m, m, dtype=torch.bool, device="cuda").tril()

    def ref(idx):
        return _reference_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], causal(len(idx)))

    tol = 1e-4 if dtype == "fp32" else 3e-2
    r = torch.arange
    torch.testing.assert_close(out[:, :, :58], ref(r(58)), atol=tol, rtol=0)
    rejected = torch.cat([r(37), r(58, 103)])  # prompt + rejected, as its own sequence
    torch.testing.assert_close(out[:, :, 58:103], ref(rejected)[:, :, 37:], atol=tol, rtol=0)
    torch.testing.assert_close(out[:, :, 103:], ref(r(103, 133)), atol=tol, rtol=0)


def _token_logprobs(model, batch, packed: bool):
    from rlhf.core.logprobs import (model_inputs, packed_sequence_logprobs, sequence_logprobs,
                               token_logprobs)

    logits = model(**model_inputs(batch, "cuda")).logits
    ids = batch["input_ids"].cuda()
    if packed:
        sums, counts = packed_sequence_logprobs(logits, batch)
        seq = batch["score_seq"].cuda()
        tok = token_logprobs(logits[0, batch["score_at"].cuda()], batch["score_ids"].cuda())
        return sums, counts, [tok[seq == i] for i in range(int(batch["n_seqs"]))]
    sums, counts = sequence_logprobs(logits, ids, batch["loss_mask"].cuda())
    tok = token_logprobs(logits[:, :-1], ids[:, 1:])
    mask = batch["loss_mask"][:, 1:].bool().cuda()
    return sums, counts, [tok[i][mask[i]] for i in range(ids.shape[0])]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("attn,share", [("sdpa", True), ("eager", True), ("sdpa", False)])
def test_packed_equals_padded_on_cuda(tiny_model_path, tokenizer, dtype, attn, share):
    """Padded model (transformers' SDPA or eager with a padding mask) vs packed model
    (rlhf_varlen), both on CUDA in `dtype`: per-token log-probs, counts, and the
    gradients of the summed log-probs."""
    from cluster.models import load_causal_lm
    from rlhf.config import ModelConfig
    from rlhf.core.logprobs import pack_pairs, pad_pairs

    P, C, R = _pairs(tokenizer, 8)
    cfg = ModelConfig(dtype=dtype, attn_implementation=attn)
    padded_model = load_causal_lm(tiny_model_path, cfg, trainable=True, use_gpu=True).cuda()
    packed_model = load_causal_lm(tiny_model_path, cfg, trainable=True, use_gpu=True,
                                  packing=True).cuda()
    assert packed_model.config._attn_implementation == "rlhf_varlen"
    s_pad, n_pad, t_pad = _token_logprobs(
        padded_model, pad_pairs(P, C, R, tokenizer.pad_token_id), packed=False)
    s_pack, n_pack, t_pack = _token_logprobs(
        packed_model, pack_pairs(P, C, R, share_prompt=share), packed=True)
    assert s_pack.dtype == torch.float32 and s_pack.device.type == "cuda"
    torch.testing.assert_close(n_pad, n_pack, atol=0, rtol=0)
    worst = max((a - b).abs().max().item() for a, b in zip(t_pad, t_pack))
    print(f"{dtype} {attn} share_prompt={share}: max per-token |diff| {worst:.2e}")
    assert worst <= TOKEN_ATOL[dtype]
    s_pad.sum().backward()
    s_pack.sum().backward()
    grads = dict(packed_model.named_parameters())
    num = den = 0.0
    for name, p in padded_model.named_parameters():
        num += (p.grad.float() - grads[name].grad.float()).pow(2).sum().item()
        den += p.grad.float().pow(2).sum().item()
    rel = (num / den) ** 0.5
    print(f"  relative gradient difference {rel:.2e}")
    assert rel <= GRAD_RTOL[dtype]


def test_bf16_packing_adds_no_error_beyond_bf16(tiny_model_path, tokenizer):
    """Against the fp32 padded reference, the bf16 packed log-probs are no further off
    than the bf16 padded ones (up to a bf16 rounding step)."""
    from cluster.models import load_causal_lm
    from rlhf.config import ModelConfig
    from rlhf.core.logprobs import pack_pairs, pad_pairs

    P, C, R = _pairs(tokenizer, 8)
    padded = pad_pairs(P, C, R, tokenizer.pad_token_id)
    packed = pack_pairs(P, C, R)

    def tokens(dtype, packing):
        model = load_causal_lm(tiny_model_path, ModelConfig(dtype=dtype), trainable=False,
                               use_gpu=True, packing=packing).cuda()
        with torch.no_grad():
            return torch.cat(_token_logprobs(model, packed if packing else padded, packing)[2])

    ref = tokens("fp32", False)
    err_pad = (tokens("bf16", False) - ref).abs().max().item()
    err_pack = (tokens("bf16", True) - ref).abs().max().item()
    print(f"bf16 vs fp32: padded {err_pad:.2e}, packed {err_pack:.2e}")
    assert err_pack <= 2 * err_pad + 8e-3


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_varlen_path_equals_attention_on_each_sequence(dtype):
    """The one-call flash varlen path (what rlhf_varlen runs on CUDA in bf16/fp16): the
    loop kernel's result in fp32, forward and gradients, for shared prompts (an empty
    one included), a plain sequence and grouped-query attention."""
    from rlhf.core.attention import _varlen_fn, block_attention, varlen_block_attention

    if _varlen_fn() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    blocks = [(0, 37, (21, 45)), (103, 30, ()), (133, 0, (5, 7)), (145, 64, (3, 130))]
    n = 145 + 64 + 3 + 130
    q = torch.randn(1, 8, n, 64, device="cuda")
    k, v = (torch.randn(1, 2, n, 64, device="cuda") for _ in range(2))
    w = torch.randn(1, 8, n, 64, device="cuda")
    grads = []
    for fn, cast in ((block_attention, torch.float32), (varlen_block_attention, dt)):
        leaves = [t.clone().to(cast).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, blocks)
        (out.float() * w).sum().backward()
        grads.append((out.float().detach(), [t.grad.float() for t in leaves]))
    (want, want_g), (got, got_g) = grads
    torch.testing.assert_close(got, want, atol=3e-2, rtol=0)
    for name, a, b in zip("qkv", got_g, want_g):
        rel = ((a - b).norm() / b.norm()).item()
        print(f"{dtype} varlen: d{name} relative difference {rel:.2e}")
        assert rel < 2e-2, name
