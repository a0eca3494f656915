"""Rollout records (rlhf.core.rollouts): shapes checked, staleness and partial rollouts, the
padded tables the trainers use, the staleness guard (whole groups) and the digest."""

import pytest
import torch

from rlhf.core.rollouts import (OBSERVATION, RolloutRecord, digest, record_tables, split_stale,
                           staleness_counts)


def rec(group, sample, versions, mask=None, **kw):
    n = len(versions)
    return RolloutRecord(group=group, sample=sample, prompt_ids=[1, 2],
                         response_ids=list(range(10, 10 + n)), logprobs=[-0.5] * n,
                         versions=versions, loss_mask=mask or [1] * n, **kw)


def test_staleness_partial_and_shapes():
    r = rec(0, 0, [3, 3, OBSERVATION, 4, 4])
    assert r.model_versions == [3, 4] and r.partial and r.oldest_version() == 3
    assert r.staleness(5) == 2 and r.turns == 1
    assert not rec(0, 1, [4, 4]).partial
    with pytest.raises(ValueError, match="one entry per token"):
        RolloutRecord(0, 0, [1], [5, 6], [-1.0], [0, 0], [1, 1])


def test_record_tables_pad_and_place_turn_rewards():
    a = rec(0, 0, [1, 1, OBSERVATION, 1], mask=[1, 1, 0, 1], score=2.0,
            turn_rewards=[0.5, 1.5], turn_ends=[1, 3])
    b = rec(0, 1, [2, 2], score=-1.0)
    t = record_tables([a, b])
    assert t["loss_mask"].tolist() == [[1, 1, 0, 1], [1, 1, 0, 0]]
    assert t["versions"].tolist() == [[1, 1, -1, 1], [2, 2, -1, -1]]
    assert t["turn_rewards"].tolist() == [[0.0, 0.5, 0.0, 1.5], [0.0, 0.0, 0.0, 0.0]]
    assert t["behaviour"][1].tolist() == [-0.5, -0.5, 0.0, 0.0]
    assert t["scores"].tolist() == [2.0, -1.0] and t["loss_mask"].dtype == torch.float32


def test_the_staleness_guard_drops_whole_groups():
    recs = [rec(0, 0, [5]), rec(0, 1, [2]), rec(1, 0, [4]), rec(1, 1, [5])]
    assert staleness_counts(recs, 5) == {0: 2, 3: 1, 1: 1}
    keep, drop = split_stale(recs, policy_version=5, max_staleness=2)
    assert [r.group for r in keep] == [1, 1] and [r.group for r in drop] == [0, 0]
    assert split_stale(recs, 5, 3) == (recs, [])


def test_digest_names_exactly_the_samples():
    a = [rec(0, 0, [1, 1]), rec(0, 1, [1, 2])]
    assert digest(a) == digest(a[::-1])  # order of hand-out does not matter
    assert digest(a) != digest([rec(0, 0, [1, 1]), rec(0, 1, [1, 1])])  # a version differs


def test_saved_batches_round_trip_and_are_dealt_out_for_another_world_size():
    """A checkpoint's batches (rlhf.online.coordinator's JSON form) come back as they were,
    and a resume at another number of workers deals their prompt groups out again, in
    order, each group whole; the prompt ids they read are committed once (by rank 0)."""
    from collections import Counter

    from rlhf.online.coordinator import Batch, _batch_from_json, _batch_to_json, _rebalanced

    g = [[rec(i, 0, [3]), rec(i, 1, [3])] for i in range(8)]  # 8 groups of 2 samples
    # 2 ranks x 2 micro-batches of 2 prompts
    two = Batch(5, 0, [[g[0] + g[1], g[2] + g[3]], [g[4] + g[5], g[6] + g[7]]],
                [[0, 1, 2, 3, 99], [4, 5, 6, 7]], Counter({"dropped: x": 1}), {"batch_s": 1.0})
    back = _batch_from_json(_batch_to_json(two))
    assert back == two
    one = _rebalanced(back, world=1, micro=2, accum=4)  # 1 rank x 4 micro-batches
    assert [[(r.group, r.sample) for r in mb] for mb in one.micro_batches[0]] == \
        [[(i, 0), (i, 1), (i + 1, 0), (i + 1, 1)] for i in (0, 2, 4, 6)]
    assert one.ids == [[0, 1, 2, 3, 99, 4, 5, 6, 7]] and one.step == 5
    assert _rebalanced(back, world=2, micro=2, accum=2) is back  # the same layout: as is


def test_newest_weights_file():
    import tempfile
    from pathlib import Path

    from cluster.engine_client import newest_weights, weights_path

    with tempfile.TemporaryDirectory() as d:
        assert newest_weights(d) is None
        for v in (3, 12):
            weights_path(d, v).write_bytes(b"")
        assert newest_weights(d) == (12, Path(d) / "weights-000012.safetensors")
