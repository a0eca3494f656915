"""Checkpoints: train.resume continues without repeating or skipping pairs, here with
the reference log-probs streamed from a Ray Data actor pool (loss.precompute_reference),
whose values must line up with their pairs. A worker that dies mid-run is restarted by
Ray Train from the last checkpoint: tests/integration/test_dpo_train.py."""

import math

import pytest

from tests.integration.conftest import dpo, metrics, summary


def test_resume_continues_where_it_stopped_with_a_streamed_reference(ray_cluster, tmp_path):
    """(Merged: the resume test and the streamed-reference training test.)"""
    args = ["output.name=r", "loss.precompute_reference=true", "train.eval_every=3"]
    first = dpo(tmp_path, *args, "train.max_steps=5")
    s1 = summary(first)
    assert s1["steps"] == 5 and s1["samples"] == 40
    losses = [r["train/loss"] for r in metrics(first) if "train/loss" in r]
    # Step 1: the policy is still the reference, so every pair's loss is log 2 exactly
    # when each row carries its own reference values (a misaligned row would not be).
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    second = dpo(tmp_path, *args, "train.resume=true")
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
