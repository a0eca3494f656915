"""Padding-free packing: layout by hand, the varlen kernel, and the same log-probs and
gradients as the padded path."""

import pytest
import torch
import torch.nn.functional as F

from rlhf.core.attention import block_attention, blocks_from_cu_seq_lens
from rlhf.config import ModelConfig
from rlhf.core.logprobs import (ld_sums, model_inputs, pack_pairs, packed_sequence_logprobs,
                                pad_pairs, scored_token_logprobs, sequence_logprobs,
                                token_logprobs)


def test_layout_by_hand_shared_prompt():
    b = pack_pairs([[1, 2], [3]], [[4], [5, 6, 7]], [[8, 9], [10]])
    # pair i once as [prompt | chosen | rejected]; rejected positions continue the prompt
    assert b["input_ids"].tolist() == [[1, 2, 4, 8, 9, 3, 5, 6, 7, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 3, 1]]
    assert b["packed_blocks"] == [(0, 2, (1, 2)), (5, 1, (3, 1))]
    # each response token with the position that predicts it (sequences: chosen 0, 1
    # are 0, 1; rejected 0, 1 are 2, 3); the first rejected token is predicted by the
    # last prompt token, like the first chosen one
    kept = b["logits_to_keep"][b["score_at"]]
    assert kept.tolist() == [1, 1, 3, 5, 6, 7, 5]
    assert b["score_ids"].tolist() == [4, 8, 9, 5, 6, 7, 10]
    assert b["score_seq"].tolist() == [0, 2, 2, 1, 1, 1, 3]
    assert b["logits_to_keep"].tolist() == [1, 3, 5, 6, 7]  # no logits for the rest
    assert int(b["n_seqs"]) == 4 and "cu_seq_lens_q" not in b
    assert b["seq_end"].tolist() == [2, 8, 4, 9]  # last tokens: 4, 7, 9, 10


def test_layout_by_hand_separate_sequences():
    b = pack_pairs([[1, 2], [3]], [[4], [5, 6, 7]], [[8, 9], [10]], share_prompt=False)
    assert b["input_ids"].tolist() == [[1, 2, 4, 3, 5, 6, 7, 1, 2, 8, 9, 3, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 7, 11, 13]
    assert b["cu_seq_lens_q"].dtype == torch.int32  # what flash attention's varlen reads
    assert b["max_length_q"] == 4 and "packed_blocks" not in b
    assert b["logits_to_keep"][b["score_at"]].tolist() == [1, 3, 4, 5, 8, 9, 11]
    assert b["score_seq"].tolist() == [0, 1, 1, 1, 2, 2, 3]
    assert b["seq_end"].tolist() == [2, 6, 10, 12]


def test_empty_prompt_scores_like_the_padded_layout():
    # nothing predicts a sequence's first token: 1 scored token for [4, 5], 0 for [6]
    P, C, R = [[]], [[4, 5]], [[6]]
    logits = torch.randn(1, 3, 10)
    padded = pad_pairs(P, C, R, 0)
    _, n_pad = sequence_logprobs(torch.randn(2, 2, 10), padded["input_ids"],
                                 padded["loss_mask"])
    for share in (True, False):
        b = pack_pairs(P, C, R, share_prompt=share)
        _, n = packed_sequence_logprobs(logits[:, :len(b["logits_to_keep"])], b)
        assert n.tolist() == n_pad.tolist() == [1.0, 0.0]


def _reference_attention(q, k, v, allowed):
    """Explicit softmax attention; allowed: (Nq, Nk) bool."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return F.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


def test_block_kernel_equals_attention_on_each_sequence():
    torch.manual_seed(0)
    # block 0: prompt 3, chosen 2, rejected 4; block 1: one plain sequence of 5
    blocks = [(0, 3, (2, 4)), (9, 5, ())]
    q = torch.randn(1, 4, 14, 8)
    k, v = torch.randn(1, 2, 14, 8), torch.randn(1, 2, 14, 8)  # GQA 4:2
    out = block_attention(q, k, v, blocks)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)

    def causal(n):
        return torch.ones(n, n, dtype=torch.bool).tril()

    # prompt + chosen: a causal sequence of 5
    assert torch.allclose(out[:, :, :5], _reference_attention(q[:, :, :5], kk[:, :, :5],
                                                              vv[:, :, :5], causal(5)), atol=1e-6)
    # rejected: its own sequence prompt + rejected, i.e. rows 0-2 then 5-8
    idx = torch.tensor([0, 1, 2, 5, 6, 7, 8])
    want = _reference_attention(q[:, :, idx], kk[:, :, idx], vv[:, :, idx], causal(7))
    assert torch.allclose(out[:, :, 5:9], want[:, :, 3:], atol=1e-6)
    assert torch.allclose(out[:, :, 9:], _reference_attention(q[:, :, 9:], kk[:, :, 9:],
                                                              vv[:, :, 9:], causal(5)), atol=1e-6)
    # and the plain-sequence form
    assert torch.allclose(block_attention(q, k, v, blocks_from_cu_seq_lens([0, 9, 14]))[:, :, 9:],
                          out[:, :, 9:], atol=1e-6)


def _pairs(tokenizer, n):
    from rlhf.data.pipeline import tokenize_pair
    from rlhf.data.demo import demo_pair

    toks = [tokenize_pair(tokenizer, d["prompt"], d["chosen"], d["rejected"], False, 1024, 512,
                          "truncate") for d in (demo_pair(i) for i in range(n))]
    return ([t[k] for t in toks] for k in range(3))


@pytest.mark.parametrize("attn,share", [("sdpa", True), ("eager", True), ("sdpa", False)])
def test_packed_equals_padded(tiny_model_path, tokenizer, attn, share):
    """Log-probs per token within 1e-5 and gradients of the summed log-probs within
    fp32 rounding, padded model (SDPA/eager with a padding mask) vs packed model."""
    from cluster.models import load_causal_lm

    P, C, R = _pairs(tokenizer, 6)
    cfg = ModelConfig(attn_implementation=attn)
    padded_model = load_causal_lm(tiny_model_path, cfg, trainable=True, use_gpu=False)
    packed_model = load_causal_lm(tiny_model_path, cfg, trainable=True, use_gpu=False,
                                  packing=True)
    assert packed_model.config._attn_implementation == "rlhf_varlen"
    padded = pad_pairs(P, C, R, tokenizer.pad_token_id)
    packed = pack_pairs(P, C, R, share_prompt=share)
    real = int(padded["attention_mask"].sum())
    assert packed["input_ids"].numel() == (real - sum(map(len, P)) if share else real)
    lp_pad = padded_model(**model_inputs(padded, "cpu")).logits
    lp_pack = packed_model(**model_inputs(packed, "cpu")).logits
    assert lp_pack.shape[1] == len(packed["logits_to_keep"])
    s_pad, n_pad = sequence_logprobs(lp_pad, padded["input_ids"], padded["loss_mask"])
    s_pack, n_pack = packed_sequence_logprobs(lp_pack, packed)
    assert torch.equal(n_pad, n_pack)
    tok_pad = token_logprobs(lp_pad[:, :-1], padded["input_ids"][:, 1:]).detach()
    tok_pack = token_logprobs(lp_pack[0, packed["score_at"]], packed["score_ids"]).detach()
    for i in range(len(P) * 2):
        a = tok_pad[i][padded["loss_mask"][i, 1:].bool()]
        assert torch.allclose(a, tok_pack[packed["score_seq"] == i], atol=1e-5), i
    # per sequence (sums of ~40 terms of magnitude ~5): fp32 summation-order rounding only
    assert torch.allclose(s_pad, s_pack, rtol=1e-6, atol=1e-4)
    # LD-DPO's weighted sums from each layout's per-token log-probs (the packed one
    # interleaves the sequences) agree too
    ld_pad = ld_sums(*scored_token_logprobs(lp_pad.detach(), padded), 2 * len(P), 0.3)
    ld_pack = ld_sums(*scored_token_logprobs(lp_pack.detach(), packed), 2 * len(P), 0.3)
    assert torch.allclose(ld_pad[0], ld_pack[0], rtol=1e-6, atol=1e-4)
    assert not torch.allclose(ld_pad[0], s_pad.detach())  # the tails are weighted
    s_pad.sum().backward()
    s_pack.sum().backward()
    grads = dict(packed_model.named_parameters())
    for name, p in padded_model.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5), name


def test_packed_model_still_reads_padded_batches(tiny_model_path, tokenizer):
    """Without packed keywords the kernel is causal attention per row: right for the
    right-padded layout (real tokens never attend to the padding after them)."""
    from cluster.models import load_causal_lm

    P, C, R = _pairs(tokenizer, 3)
    padded = pad_pairs(P, C, R, tokenizer.pad_token_id)
    with torch.no_grad():
        a = load_causal_lm(tiny_model_path, ModelConfig(), trainable=False,
                           use_gpu=False)(**model_inputs(padded, "cpu")).logits
        b = load_causal_lm(tiny_model_path, ModelConfig(), trainable=False, use_gpu=False,
                           packing=True)(**model_inputs(padded, "cpu")).logits
    real = padded["attention_mask"].bool()
    assert torch.allclose(a[real], b[real], atol=1e-5)


def test_sliding_window_longer_than_a_sequence_is_refused():
    from types import SimpleNamespace

    from rlhf.core.attention import attention_forward

    module = SimpleNamespace(sliding_window=4, config=SimpleNamespace())
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(NotImplementedError, match="data.packing=false"):
        attention_forward(module, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 10]))


# ---------------------------------------------------------------- single sequences (SFT)


def test_sequence_layout_by_hand():
    from rlhf.core.logprobs import pack_sequences

    b = pack_sequences([[1, 2, 3], [4, 5]], [[0, 1, 1], [1, 1]])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["packed_blocks"] == [(0, 3, ()), (3, 2, ())]
    # token 2 predicted at 0, 3 at 1; sequence 1's first token has no predictor
    assert b["logits_to_keep"][b["score_at"]].tolist() == [0, 1, 3]
    assert b["score_ids"].tolist() == [2, 3, 5] and b["score_seq"].tolist() == [0, 0, 1]
    assert b["seq_end"].tolist() == [2, 4] and int(b["n_seqs"]) == 2
    f = pack_sequences([[1, 2, 3], [4, 5]], [[0, 1, 1], [1, 1]], blocks=False)
    assert f["cu_seq_lens_q"].tolist() == [0, 3, 5] and "packed_blocks" not in f


@pytest.mark.parametrize("blocks", [True, False])
def test_packed_sequences_equal_padded_and_the_models_own_loss(tiny_model_path, tokenizer,
                                                               blocks):
    """SFT's token-weighted NLL: packed == padded (per token within 1e-5) == the loss
    transformers computes itself from labels with -100 on untrained tokens."""
    from cluster.models import load_causal_lm
    from rlhf.data.demo import demo_pair
    from rlhf.core.logprobs import batch_logprobs, pack_sequences, pad_sequences
    from rlhf.data.examples import tokenize_example

    ex = [tokenize_example(tokenizer, d["prompt"], d["chosen"], False, 1024, "keep_start")
          for d in (demo_pair(i) for i in range(5))]
    seqs, masks = [e[0] for e in ex], [e[1] for e in ex]
    padded_model = load_causal_lm(tiny_model_path, ModelConfig(), trainable=False,
                                  use_gpu=False)
    packed_model = load_causal_lm(tiny_model_path, ModelConfig(), trainable=False,
                                  use_gpu=False, packing=True)
    padded = pad_sequences(seqs, masks, tokenizer.pad_token_id)
    packed = pack_sequences(seqs, masks, blocks=blocks)
    with torch.no_grad():
        lp_pad = padded_model(**model_inputs(padded, "cpu")).logits
        lp_pack = packed_model(**model_inputs(packed, "cpu")).logits
        labels = padded["input_ids"].masked_fill(padded["loss_mask"] == 0, -100)
        hf_loss = padded_model(**model_inputs(padded, "cpu"), labels=labels).loss
    s_pad, n_pad = batch_logprobs(lp_pad, padded)
    s_pack, n_pack = batch_logprobs(lp_pack, packed)
    assert torch.equal(n_pad, n_pack) and int(n_pad.sum()) == sum(sum(m[1:]) for m in masks)
    assert torch.allclose(s_pad, s_pack, rtol=1e-6, atol=1e-4)
    ours = -s_pack.sum() / n_pack.sum()
    assert abs(float(ours) - float(hf_loss)) < 1e-5


def test_varlen_plan_gives_the_loop_kernels_result(monkeypatch):
    """The CUDA path (one flash varlen call over gathered keys) with a CPU stand-in for
    torch.nn.attention.varlen.varlen_attn that implements its documented semantics
    (bottom-right aligned causal mask per sequence): the same output as the loop kernel.
    tests/gpu checks the real kernel."""
    from rlhf.core import attention

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        assert window_size == (-1, 0) and q.dtype == torch.float32
        outs = []
        for i in range(len(cu_q) - 1):
            qi = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
            ki = k[cu_k[i]:cu_k[i + 1]].transpose(0, 1)
            vi = v[cu_k[i]:cu_k[i + 1]].transpose(0, 1)
            lq, lk = qi.shape[1], ki.shape[1]
            allowed = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
            outs.append(_reference_attention(qi, ki, vi, allowed).transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setattr(attention, "_varlen_fn", lambda: varlen_attn)
    torch.manual_seed(0)
    blocks = [(0, 3, (2, 4)), (9, 5, ()), (14, 0, (2, 3)), (19, 4, (1, 2))]
    q = torch.randn(1, 4, 26, 8)
    k, v = torch.randn(1, 2, 26, 8), torch.randn(1, 2, 26, 8)
    want = block_attention(q, k, v, blocks)
    got = attention.varlen_block_attention(q, k, v, blocks)
    assert torch.allclose(got, want, atol=1e-6)
    # the plan is built once per batch and reused by every layer
    assert attention._plan_cache[0][0] is blocks
    assert torch.allclose(attention.varlen_block_attention(q, k, v, blocks), want, atol=1e-6)


@pytest.mark.parametrize("packing", [True, False])
def test_response_token_logprobs_per_token(tiny_model_path, tokenizer, packing):
    """Online RL's per-token log-probs of sampled responses: packed and padded layouts
    give the same (B, T) table, each response from column 0, and it equals a direct
    forward over each prompt + response alone."""
    from cluster.models import load_causal_lm
    from rlhf.core.logprobs import response_batch, right_padded, scored_token_logprobs

    P = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    R = [[20, 21], [22, 23, 24, 25], [26]]
    model = load_causal_lm(tiny_model_path, ModelConfig(), trainable=False, use_gpu=False,
                           packing=packing)
    b = response_batch(P, R, pad_id=tokenizer.pad_token_id, packing=packing)
    with torch.no_grad():
        vals, seq = scored_token_logprobs(model(**model_inputs(b, "cpu")).logits, b)
        table, mask = right_padded(vals, seq, len(P))
        plain = load_causal_lm(tiny_model_path, ModelConfig(), trainable=False, use_gpu=False)
        for i, (p, r) in enumerate(zip(P, R)):
            logits = plain(input_ids=torch.tensor([p + r])).logits[0]
            want = token_logprobs(logits[len(p) - 1:-1], torch.tensor(r))
            assert torch.allclose(table[i, :len(r)], want, atol=1e-5)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert (table[mask == 0] == 0).all()
    # KTO's reference runs both of a row's responses (its completion and the mismatched
    # one of the KL point) as one pair batch, the prompt once when packing: the same sums
    # as each response scored on its own
    from rlhf.core.logprobs import (UNPAIRED_SIDES, batch_logprobs, rows_pair_batch,
                                    rows_response_batch, split_pairs)
    rows = [{"prompt_ids": p, "completion_ids": r, "kl_completion_ids": R[i - 1]}
            for i, (p, r) in enumerate(zip(P, R))]
    kw = dict(pad_id=tokenizer.pad_token_id, packing=packing)
    with torch.no_grad():
        pair = rows_pair_batch(rows, sides=UNPAIRED_SIDES, **kw)
        own, kl = split_pairs(batch_logprobs(model(**model_inputs(pair, "cpu")).logits, pair)[0])
        for got, side in ((own, "completion_ids"), (kl, "kl_completion_ids")):
            alone = rows_response_batch(rows, response=side, **kw)
            want = batch_logprobs(model(**model_inputs(alone, "cpu")).logits, alone)[0]
            assert torch.allclose(got, want, atol=1e-5), side


def test_scored_positions_pick_the_state_before_each_response_token():
    """A value head's output is read where the log-probs are: at the position before
    each response token. Feed each layout a per-position tensor holding (sequence,
    position in its sequence) and check both pick the same states, by hand."""
    from rlhf.core.logprobs import response_batch, right_padded, scored_positions

    P, R = [[5, 6, 7], [8, 9]], [[20, 21], [22, 23, 24]]
    picked = {}
    for packing in (True, False):
        b = response_batch(P, R, pad_id=0, packing=packing)
        if packing:
            seq_of = torch.repeat_interleave(torch.arange(2), torch.tensor([5, 5]))
            x = torch.stack([seq_of, b["position_ids"][0]], -1)[None].float()
        else:
            L = b["input_ids"].shape[1]
            x = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(L), indexing="ij"),
                            -1).float()
        vals, seq = scored_positions(x, b, full_length=True)
        picked[packing] = right_padded(vals[:, 1], seq, 2)[0]
        assert vals[:, 0].tolist() == seq.float().tolist()
    # response 0 (prompt length 3): tokens at positions 3, 4 are drawn in states 2, 3;
    # response 1 (prompt length 2): positions 2, 3, 4 -> states 1, 2, 3
    assert picked[True].tolist() == picked[False].tolist() == [[2, 3, 0], [1, 2, 3]]
