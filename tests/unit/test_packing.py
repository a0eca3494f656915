"""Padding-free packing: layout by hand, and the same log-probs as the padded path."""

import pytest
import torch

from rlhf.logprobs import (pack_pairs, packed_sequence_logprobs, pad_pairs, sequence_logprobs,
                           token_logprobs)


def test_layout_by_hand():
    b = pack_pairs([[1, 2], [3]], [[4], [5, 6, 7]], [[8, 9], [10]], capacity=6)
    # lengths: c0=3, c1=4, r0=4, r1=2 -> first-fit-decreasing into rows of 6:
    # row 0: c1(4) + r1(2); row 1: r0(4); row 2: c0(3)
    assert b["input_ids"].tolist() == [[3, 5, 6, 7, 3, 10], [1, 2, 8, 9, 0, 0], [1, 2, 4, 0, 0, 0]]
    assert b["seq_index"].tolist() == [[1, 1, 1, 1, 3, 3], [2, 2, 2, 2, -1, -1], [0, 0, 0, -1, -1, -1]]
    assert b["position_ids"].tolist()[0] == [0, 1, 2, 3, 0, 1]
    m = b["attention_mask"][0, 0] == 0  # allowed
    assert m[5].tolist() == [False, False, False, False, True, True]  # r1 sees only itself
    assert m[3].tolist() == [True, True, True, True, False, False]


def test_boundary_token_is_not_scored():
    # Two sequences in one row; logits favour token 9 everywhere, so a leak across the
    # boundary (position 1 predicting position 2) would add log p(9) to sequence 0.
    b = pack_pairs([[1], [1]], [[9]], [[9]], capacity=8)
    logits = torch.zeros(1, 4, 10)
    s, n = packed_sequence_logprobs(logits, b)
    assert n.tolist() == [1.0, 1.0]
    assert torch.allclose(s, torch.full((2,), -torch.log(torch.tensor(10.0))))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded(tiny_model_path, tokenizer, attn):
    from transformers import AutoModelForCausalLM

    from rlhf.data import tokenize_pair
    from rlhf.demo import demo_pair

    toks = [tokenize_pair(tokenizer, d["prompt"], d["chosen"], d["rejected"], False, 1024, 512,
                          "truncate") for d in (demo_pair(i) for i in range(6))]
    P, C, R = ([t[k] for t in toks] for k in range(3))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation=attn)
    padded = pad_pairs(P, C, R, tokenizer.pad_token_id)
    packed = pack_pairs(P, C, R, capacity=96)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    with torch.no_grad():
        lp_pad = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        lp_pack = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                        attention_mask=packed["attention_mask"]).logits
    s_pad, n_pad = sequence_logprobs(lp_pad, padded["input_ids"], padded["loss_mask"])
    s_pack, n_pack = packed_sequence_logprobs(lp_pack, packed)
    assert torch.equal(n_pad, n_pack)
    # per token: within 1e-5
    tok_pad = token_logprobs(lp_pad[:, :-1], padded["input_ids"][:, 1:])
    tok_pack = token_logprobs(lp_pack[:, :-1], packed["input_ids"][:, 1:])
    for i in range(len(P) * 2):
        a = tok_pad[i][padded["loss_mask"][i, 1:].bool()]
        r, c = (packed["seq_index"] == i).nonzero(as_tuple=True)
        m = packed["loss_mask"][r, c].bool()
        b = tok_pack[r[0], c[m] - 1]  # token at c was predicted at c - 1
        assert torch.allclose(a, b, atol=1e-5), i
    # per sequence (sums of ~40 terms of magnitude ~5): fp32 summation-order rounding only
    assert torch.allclose(s_pad, s_pack, rtol=1e-6, atol=1e-4)
