import math

import torch

from rlhf.core.logprobs import pad_pairs, sequence_logprobs, split_pairs, token_logprobs


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    lp = token_logprobs(logits, torch.tensor([[1]]))
    assert abs(lp.item() - math.log(0.75)) < 1e-6


def test_sequence_logprobs_shift_and_mask():
    # vocab 2, uniform logits except position 1 which strongly predicts token 1
    logits = torch.zeros(1, 4, 2)
    logits[0, 1] = torch.tensor([0.0, math.log(9.0)])  # p(token 1) = 0.9
    ids = torch.tensor([[0, 0, 1, 0]])
    mask = torch.tensor([[0, 0, 1, 1]])  # response = tokens 2 and 3
    s, n = sequence_logprobs(logits, ids, mask)
    # token 2 (=1) predicted at position 1: log .9 ; token 3 (=0) at position 2: log .5
    assert abs(s.item() - (math.log(0.9) + math.log(0.5))) < 1e-6
    assert n.item() == 2


def test_pad_pairs_layout():
    b = pad_pairs([[1, 2], [3]], [[4], [5, 6, 7]], [[8, 9], [10]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 4, 0], [3, 5, 6, 7], [1, 2, 8, 9], [3, 10, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    c, r = split_pairs(b["input_ids"])
    assert c.shape == r.shape == (2, 4)
