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


def _pair_of_ranks(fn0, fn1, timeout_s=20.0):
    """Rank 0 and rank 1 of a fresh gloo group, each in a thread of this process."""
    import threading

    from cluster.weight_sync import new_group, rendezvous

    store = rendezvous("127.0.0.1", 0, 2, timeout_s, host_it=True)
    out, errors = {}, []

    def rank(r, fn):
        try:
            s = store if r == 0 else rendezvous("127.0.0.1", store.port, 2, timeout_s)
            out[r] = fn(new_group(s, r, 2, "gloo", timeout_s, "test"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(0, fn0)),
               threading.Thread(target=rank, args=(1, fn1))]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert not errors, errors
    return out


def test_broadcast_buckets_arrive_whole_with_their_names_dtypes_and_shapes():
    """send_buckets / receive_buckets over a real gloo group: every tensor arrives
    bit for bit (float32, bfloat16, int64; a tied weight sent twice), in buckets of
    about max_bytes, and the end marker stops the receiver."""
    from cluster.weight_sync import receive_buckets, send_buckets

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 4, generator=g)
    sd = {"embed.weight": emb, "norm.weight": torch.randn(4, generator=g).bfloat16(),
          "lm_head.weight": emb, "steps": torch.arange(3), "scalar": torch.tensor(2.5),
          "big": torch.randn(40, 4, generator=g)}
    pairs = [("gathered elsewhere", None), *sd.items()]
    got = _pair_of_ranks(lambda pg: send_buckets(pg, pairs, max_bytes=200),
                         lambda pg: [(n, t.clone()) for n, t in receive_buckets(pg)])
    # 96 + 8 + 96 bytes fit in 200; then 24 + 4; "big" (640 bytes) alone
    assert got[0] == {"buckets": 3, "bytes": sum(t.numel() * t.element_size()
                                                 for t in sd.values())}
    assert [n for n, _ in got[1]] == list(sd)
    for name, t in got[1]:
        assert t.dtype == sd[name].dtype and t.shape == sd[name].shape
        assert torch.equal(t, sd[name]), name


def test_a_weight_sync_group_that_does_not_form_times_out():
    """Rank 1 never joins: rank 0's group fails after the timeout instead of hanging."""
    import time

    import pytest

    from cluster.weight_sync import new_group, rendezvous

    store = rendezvous("127.0.0.1", 0, 2, 2.0, host_it=True)
    t0 = time.time()
    with pytest.raises(RuntimeError):
        new_group(store, 0, 2, "gloo", 2.0, "lonely")
    assert time.time() - t0 < 30
