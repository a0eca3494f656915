"""The pure parts of the trainer -> engine weight sync (cluster.weight_sync)."""

import torch

from cluster.weight_sync import buckets, policy_weights
from rlhf.config import LoraConfig


def test_buckets_group_by_size_and_skip_other_ranks_placeholders():
    t = {n: torch.zeros(k) for n, k in (("a", 10), ("b", 10), ("c", 30), ("d", 5))}
    pairs = [("x", None), *t.items(), ("y", None)]  # None: a ZeRO-3 rank other than 0
    # 4 bytes per float: 40 + 40 <= 100, + 120 > 100 -> new bucket; "c" alone is over
    # the limit and gets its own bucket; "d" starts the next
    got = [list(b) for b in buckets(pairs, max_bytes=100)]
    assert got == [["a", "b"], ["c"], ["d"]]
    assert list(buckets([("x", None)], 100)) == []


def test_policy_weights_merge_lora_under_the_base_names():
    base = torch.eye(2)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]])
    sd = {"base_model.model.layer.q_proj.base_layer.weight": base,
          "base_model.model.layer.q_proj.lora_A.default.weight": a,
          "base_model.model.layer.q_proj.lora_B.default.weight": b,
          "base_model.model.layer.k_proj.weight": torch.ones(2, 2)}
    lora = LoraConfig(enabled=True, r=1, alpha=2)
    out = policy_weights(sd, lora)
    # W + alpha / r * B @ A = I + 2 * [[2, 0], [0, 0]]; k_proj unchanged but sent too
    assert sorted(out) == ["layer.k_proj.weight", "layer.q_proj.weight"]
    assert torch.equal(out["layer.q_proj.weight"], torch.tensor([[5.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(out["layer.k_proj.weight"], torch.ones(2, 2))
    assert policy_weights(sd, LoraConfig(enabled=False)) is sd
