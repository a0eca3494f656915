"""Checkpoints: train.resume continues without repeating or skipping pairs, here with
the data and the checkpoints in object storage (a real S3-compatible server on
127.0.0.1) and the reference log-probs streamed from a Ray Data actor pool
(loss.precompute_reference), whose values must line up with their pairs. A worker
that dies mid-run is restarted by Ray Train from the last checkpoint:
tests/integration/test_dpo_train.py."""

import json
import math

import pytest

from rlhf.data.demo import demo_pair
from tests.integration.conftest import dpo, metrics, summary


def test_resume_from_s3_continues_where_it_stopped_with_a_streamed_reference(
        ray_cluster, tmp_path, s3_bucket):
    """(Merged: the resume test, the streamed-reference training test and the S3 round
    trip: pairs read from s3://, checkpoints written there, the resumed run restored
    from there.)"""
    client, bucket = s3_bucket
    for key, rows in (("pairs/train.jsonl", [demo_pair(i) for i in range(96)]),
                      ("pairs/held.jsonl", [demo_pair(i, "eval") for i in range(32)])):
        client.put_object(Bucket=bucket, Key=key,
                          Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    args = ["output.name=r", "loss.precompute_reference=true", "train.eval_every=3",
            f"data.path=s3://{bucket}/pairs/train.jsonl",
            f"data.eval_path=s3://{bucket}/pairs/held.jsonl",
            f"cluster.storage_path=s3://{bucket}/runs"]
    first = dpo(tmp_path, *args, "train.max_steps=5", "train.checkpoint_every=5")
    s1 = summary(first)
    assert s1["steps"] == 5 and s1["samples"] == 40
    stored = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/r/")
              .get("Contents", [])]
    assert any("checkpoint" in k for k in stored), stored
    losses = [r["train/loss"] for r in metrics(first) if "train/loss" in r]
    # Step 1: the policy is still the reference, so every pair's loss is log 2 exactly
    # when each row carries its own reference values (a misaligned row would not be).
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    second = dpo(tmp_path, *args, "train.resume=true", "train.checkpoint_every=5")
    assert second == first
    s2 = summary(second)
    # 96 pairs, 8 per step: the remaining 56 pairs in 7 more steps, none twice.
    assert s2["steps"] == 12 and s2["samples"] == 96
    rows = metrics(second)
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    evals = [r for r in rows if "eval/rewards/accuracy" in r]
    assert [r["step"] for r in evals] == [3, 5, 6, 9, 12]
    assert all(r["eval/pairs"] == 32 for r in evals)


def test_resume_without_a_run_is_an_error(tmp_path):
    from rlhf.config import ConfigError, DPOConfig, parse_args
    from rlhf.dpo import run

    with pytest.raises(ConfigError, match="no earlier dpo run"):
        run(parse_args(DPOConfig, [f"output.dir={tmp_path}", "train.resume=true"], "x"))
