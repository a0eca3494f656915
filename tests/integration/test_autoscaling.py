"""A real Ray autoscaler on one machine (Ray's fake multi-node provider: every "node" is
a raylet process here, launched and terminated by the autoscaler as on a cloud), and a
DPO run submitted to it with `ray job submit --working-dir .`, as a user does on a
cluster. The head offers no CPUs, so nothing of the run can start until the
autoscaler adds nodes; the run asks for 2 workers, the nodes come, the run finishes,
and the idle nodes go.

The head runs with token authentication (RAY_AUTH_MODE=token), as ray-cluster.yaml
starts clusters, so the job also shows the project works against one. `ray stop
--force` at the end stops every Ray process on the machine: run no other Ray beside
this test (the shared local Ray of the other tests is shut down first; marked
own_cluster, it runs before them).

Slow (minutes): marked `slow`; .ci/run runs it."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PORT, DASHBOARD = 6379, 8293  # the fake provider starts its nodes against 6379

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]


def fake_cluster_config(path: Path) -> Path:
    """A launcher config for the fake provider (ENVIRONMENT.md): a head of 0 CPUs and up
    to 2 worker nodes of 2 CPUs, removed after 0.25 min idle."""
    cfg = {
        "cluster_name": "rlhf-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.25,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {},
                                 "max_workers": 0},
            "ray.worker.cpu": {"resources": {"CPU": 2}, "node_config": {},
                               "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        # what `ray up` would fill in; the monitor reads them
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def autoscaling_head(tmp_path):
    """`ray start --head` with the fake autoscaler; stopped (all its nodes too) after.
    Token authentication with a token of this test's own (RAY_AUTH_TOKEN, inherited by
    the nodes the provider starts and by the job): nothing read from or written to
    ~/.ray, where a fresh machine has no token and `ray start` would refuse."""
    import secrets
    import socket

    from tests.integration.conftest import release_shared_ray

    release_shared_ray()  # `ray stop --force` below stops every Ray on the machine
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", PORT)) == 0:
            pytest.fail(f"port {PORT} is taken (another Ray head?); the fake provider "
                        "starts its nodes against it: stop it (ray stop) and rerun")
    ray_bin = Path(sys.executable).with_name("ray")
    ray_bin = str(ray_bin) if ray_bin.exists() else shutil.which("ray")
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    config = fake_cluster_config(tmp_path / "fake-cluster.yaml")
    started = subprocess.run(
        [ray_bin, "start", "--head", f"--port={PORT}", "--num-cpus=0",
         f"--dashboard-port={DASHBOARD}", "--dashboard-host=127.0.0.1",
         "--disable-usage-stats", f"--autoscaling-config={config}"],
        env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield ray_bin, env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)


WATCH = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
while True:
    print("ALIVE=%d" % sum(n["Alive"] for n in ray.nodes()), flush=True)
    time.sleep(1)
"""


class NodeWatch:
    """Alive nodes once a second, as one separate driver sees them (one process for
    the whole test: a Python start per look cost a core for seconds each time)."""

    def __init__(self, env, path: Path):
        self.path = path
        self.log = open(path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", WATCH, f"127.0.0.1:{PORT}"],
                                     env=env, stdout=self.log, stderr=subprocess.DEVNULL,
                                     text=True)

    def seen(self) -> list[int]:
        return [int(x[len("ALIVE="):]) for x in self.path.read_text().splitlines()
                if x.startswith("ALIVE=")]  # Ray prints lines of its own there too

    def wait(self, what: str, check, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            seen = self.seen()
            if seen and check(seen):
                return seen
            assert self.proc.poll() is None, "the node watcher died"
            time.sleep(0.5)
        raise AssertionError(f"{what}: not within {timeout} s; alive nodes seen: "
                             f"{self.seen()}")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def test_job_submit_on_an_autoscaling_cluster(autoscaling_head, tmp_path):
    """`ray job submit --working-dir . -- python -m rlhf.dpo` as a user runs it against
    the token-authenticated head: the job's run asks for 2 workers, the autoscaler
    adds the two nodes, the run finishes, and the idle nodes go."""
    ray_bin, env = autoscaling_head
    watch = NodeWatch(env, tmp_path / "alive.txt")
    try:
        first = watch.wait("the watcher's first look", bool, 120)
        assert first[-1] == 1  # the head alone: no CPU anywhere
        t0 = time.time()
        out = subprocess.run(
            [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD}",
             "--working-dir", str(ROOT), "--", sys.executable, "-m", "rlhf.dpo",
             "cluster.num_workers=2", "cluster.cpus_per_worker=1", "cluster.data_cpus=1",
             f"output.dir={tmp_path / 'runs'}", "output.name=auto", "data.demo_pairs=64",
             "data.demo_eval_pairs=16", "train.eval_every=0"],
            env=env, capture_output=True, text=True, timeout=900)
        run_s = time.time() - t0
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "held-out reward accuracy" in out.stdout  # the job's own output came back
        run_dir = tmp_path / "runs" / "auto"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["samples"] == 64 and summary["steps"] == 8
        assert (run_dir / "model" / "model.safetensors").is_file()
        assert max(watch.seen()) >= 3, watch.seen()  # the head + the 2 nodes asked for
        # idle for 0.25 min, then terminated
        watch.wait("idle nodes removed", lambda s: s[-1] == 1, 180)
        print(f"job {run_s:.0f} s; alive nodes seen during it: {sorted(set(watch.seen()))};"
              f" idle nodes removed {time.time() - t0 - run_s:.0f} s after it ended")
    finally:
        watch.stop()
