"""Checkpoints: train.resume continues without repeating or skipping pairs; a worker
that dies mid-run is restarted by Ray Train from the last checkpoint."""

import pytest

from tests.integration.conftest import dpo, metrics, summary


def test_resume_continues_where_it_stopped(ray_cluster, tmp_path):
    first = dpo(tmp_path, "output.name=r", "train.max_steps=5", "train.eval_every=0")
    s1 = summary(first)
    assert s1["steps"] == 5 and s1["samples"] == 40
    second = dpo(tmp_path, "output.name=r", "train.resume=true", "train.eval_every=0")
    assert second == first
    s2 = summary(second)
    # 96 pairs, 8 per step: the remaining 56 pairs in 7 more steps, none twice.
    assert s2["steps"] == 12 and s2["samples"] == 96
    steps = [r["step"] for r in metrics(second) if "train/loss" in r]
    assert steps == list(range(1, 13))


def test_worker_crash_restarts_from_checkpoint(ray_cluster, tmp_path):
    run_dir = dpo(tmp_path, "train.checkpoint_every=4", "cluster.max_failures=1",
                  "train.eval_every=0", crash_once_at_step=6)
    assert (run_dir / ".crash-injected").read_text() == "6"
    s = summary(run_dir)
    assert s["steps"] == 12 and s["samples"] == 96  # steps 5-6 redone from the step-4 state
    steps = [r["step"] for r in metrics(run_dir) if "train/loss" in r]
    # Rank 0 logs step 5, then waits for the dead rank inside step 6's metric reduction;
    # the restarted group resumes after step 4.
    assert steps == [1, 2, 3, 4, 5] + list(range(5, 13))


def test_resume_without_a_run_is_an_error(tmp_path):
    from rlhf.config import ConfigError, DPOConfig, parse_args
    from rlhf.dpo import run

    with pytest.raises(ConfigError, match="no earlier dpo run"):
        run(parse_args(DPOConfig, [f"output.dir={tmp_path}", "train.resume=true"], "x"))
