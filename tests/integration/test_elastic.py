"""Elastic training on a real multi-node Ray cluster on one machine (ray.cluster_utils:
every node is its own raylet process, added and removed while the run goes on). The
head has one CPU, for the data pipeline; each worker node has room for one training
worker (2 CPUs), so the number of nodes is the number of workers the run can have.

- grow: a run with cluster.num_workers=[1, 2] starts on the one node there is; a second
  node is added; Ray Train restarts the group with 2 workers from the latest checkpoint,
  re-sharded for the new size (DeepSpeed's universal checkpoint), with the global batch
  kept by gradient accumulation. Its final model matches an uninterrupted run's.
- shrink: a run on two nodes loses one (its raylet and every process on it killed); the
  run goes on with one worker from the latest checkpoint and trains every pair once.

The two tests share one cluster: the grow test leaves the two worker nodes the shrink
test starts from. Ray Train waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for a worker
group's placement (60 s by default: after a node is lost it first asks for the old size
while the dead node's resources are still listed); 10 s here, where a placement that
can be made is made in well under a second.

Slow (minutes): marked `slow` and `own_cluster` (it runs before the other tests' shared
local Ray is up); .ci/run runs it.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import SMALL, metrics, summary

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]
ROOT = Path(__file__).resolve().parents[2]

WORKER_NODE = {"num_cpus": 2}
# Ray Train sizes a restarted group by what Ray Data's autoscaling coordinator last saw
# of ray.nodes() (it looks again every 20 s), and the head's GCS lists a lost node as
# alive until 5 health checks 3 s apart have failed: a look in those 15 s sees the old
# size, and the restart first waits out a start timeout for it. 3 checks 0.5 s apart
# here, so the next look after a loss sees it.
FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
ELASTIC = ["cluster.num_workers=[1,2]", "cluster.cpus_per_worker=2",
           "cluster.resize_check_s=1", "cluster.max_failures=2"]


@pytest.fixture(scope="module")
def cluster():
    """A head of 1 CPU (data pipeline, no room for a training worker) and one worker
    node; the tests add and remove more. Its nodes inherit this process's environment."""
    import ray
    from ray.cluster_utils import Cluster

    from tests.integration.conftest import release_shared_ray

    release_shared_ray()
    key = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    before = os.environ.get(key)
    os.environ[key] = "10"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                      "_system_config": FAST_NODE_DEATH})
    try:
        c.add_node(**WORKER_NODE)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def dpo(tmp_path: Path, address: str, *overrides: str) -> subprocess.Popen:
    """`python -m rlhf.dpo` joining the cluster, as a user runs it (a process of its
    own: this one's main thread adds and removes the nodes), its output in a file (a
    pipe nobody reads while the run goes on would block it once full)."""
    path = tmp_path / f"driver-{len(list(tmp_path.glob('driver-*')))}.log"
    with open(path, "w") as log:  # the child keeps its own handle
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf.dpo", f"output.dir={tmp_path}", *SMALL,
             f"cluster.address={address}", *overrides],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = path
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, output(proc)[-5000:]
    return output(proc)


def wait_for(what: str, check, proc: subprocess.Popen, timeout: float = 600):
    """Poll check() until it returns something truthy; fail if the run ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n" + output(proc)[-5000:])
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout} s")


def records(run_dir: Path) -> list[dict]:
    """The run's metrics so far ([] before the first)."""
    return metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


def registered_checkpoint_step(run_dir: Path) -> int:
    """The latest step whose checkpoint Ray Train has registered (its snapshot file)."""
    snap = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snap.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return 0
    return max((r["metrics"]["step"] for r in results), default=0)


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_a_run_grows_when_a_node_is_added(cluster, tmp_path):
    """8 pairs, one global batch of 8, 48 epochs: every step sees all pairs whatever the
    split, so the elastic run and the uninterrupted one-worker run take the same steps.
    The node comes at step 2; with a checkpoint saved at every step a step takes ~1 s
    here (0.7 s on a fast day), so the run has 30-45 s to go, and Ray Train sees the new
    node at the autoscaling coordinator's next look (within 20 s) and a resize check.
    Fewer checkpoints or steps would make the run faster than that look: it could end
    before it grows (with 32 epochs it once resumed on two workers at its last step)."""
    one_batch = ["data.demo_pairs=8", "train.epochs=48", "train.max_steps=-1",
                 "train.global_batch_size=8", "train.micro_batch_size=4",
                 "train.eval_every=0", "cluster.zero_stage=2",
                 "train.lr_scheduler=constant", "train.warmup_ratio=0"]
    # the uninterrupted run needs no checkpoints (48 saves less)
    finish(dpo(tmp_path, cluster.address, *one_batch, "output.name=fixed",
               "train.checkpoint_every=0", "cluster.num_workers=1",
               "cluster.cpus_per_worker=2"))
    fixed, run_dir = tmp_path / "fixed", tmp_path / "elastic"
    proc = dpo(tmp_path, cluster.address, *one_batch, *ELASTIC, "train.checkpoint_every=1",
               "output.name=elastic")
    wait_for("step 2", lambda: any(r["step"] >= 2 and "train/loss" in r
                                   for r in records(run_dir)), proc)
    cluster.add_node(**WORKER_NODE)
    added = time.time()
    wait_for("a step on two workers",
             lambda: any(r.get("train/workers") == 2 for r in records(run_dir)), proc)
    grown_s = time.time() - added
    log = finish(proc)
    assert "resuming with 2 workers from a checkpoint of 1" in log, log[-5000:]
    # grown in one go, no failed attempt (Ray Train's own lines are in the run's log)
    assert "Error in training function" not in log + (run_dir / "run.log").read_text()
    rows = [r for r in metrics(run_dir) if "train/loss" in r]
    workers = [r["train/workers"] for r in rows]
    assert workers[0] == 1 and workers[-1] == 2, workers
    s = summary(run_dir)
    assert s["steps"] == 48 and s["samples"] == 384
    a, b = final_weights(fixed), final_weights(run_dir)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"node added -> training on two workers {grown_s:.0f} s later; elastic vs "
          f"fixed: max |weight gap| {gap:.2e}")
    assert gap < 1e-4, gap


def test_a_run_goes_on_when_a_node_is_lost(cluster, tmp_path):
    """Two nodes, two workers; once a checkpoint is registered one node is lost whole
    (its raylet and every process on it killed, as a preempted spot instance). Ray
    Train restarts the group with the one worker there is room for, from the latest
    checkpoint re-sharded for it (ZeRO-3); the run ends with every pair trained once."""
    while len(cluster.worker_nodes) < 2:  # the grow test leaves two
        cluster.add_node(**WORKER_NODE)
    cluster.wait_for_nodes()
    spare = next(iter(cluster.worker_nodes))  # each holds one of the two workers
    run_dir = tmp_path / "shrink"
    proc = dpo(tmp_path, cluster.address, *ELASTIC, "output.name=shrink",
               "data.demo_pairs=384", "train.global_batch_size=8", "train.micro_batch_size=4",
               "train.eval_every=0", "train.checkpoint_every=4", "cluster.zero_stage=3")
    # Ray Train registers a checkpoint once it has collected every rank's report (on its
    # health-check poll): the node goes only after one is, as minutes apart in a real run
    saved = wait_for("a registered checkpoint", lambda: registered_checkpoint_step(run_dir),
                     proc)
    cluster.remove_node(spare, allow_graceful=False)
    lost = time.time()

    def one_worker_row():
        rows = [r for r in records(run_dir) if r.get("train/workers") == 1]
        return rows[0] if rows else None

    first = wait_for("a step on one worker", one_worker_row, proc)
    resumed_s = time.time() - lost
    log = finish(proc)
    assert "resuming with 1 workers from a checkpoint of 2" in log, log[-5000:]
    assert first["step"] > saved  # it went on from a checkpoint, not from the start
    rows = [r for r in metrics(run_dir) if "train/loss" in r]
    by_step = {r["step"]: r for r in rows}  # the last record of a redone step wins
    assert sorted(by_step) == list(range(1, 49))
    assert by_step[1]["train/workers"] == 2 and by_step[48]["train/workers"] == 1
    s = summary(run_dir)
    assert s["steps"] == 48 and s["samples"] == 384  # restored count + the steps after
    assert s["pairs_left_out_by_split"] == 0  # none skipped, so none twice
    redone = sum(1 for r in rows if r["train/workers"] == 2 and r["step"] > first["step"] - 1)
    print(f"node lost after step {saved}'s checkpoint; training again on one worker "
          f"{resumed_s:.0f} s later, from step {first['step'] - 1}; {redone} step(s) redone")
