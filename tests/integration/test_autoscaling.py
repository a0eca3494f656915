"""A real Ray autoscaler on one machine (Ray's fake multi-node provider: every "node" is
a raylet process here, launched and terminated by the autoscaler as on a cloud). The
head offers no CPUs, so nothing of a run can start until the autoscaler adds nodes; a
DPO run asks for 2 workers, the nodes come, the run finishes, and the idle nodes go.

The head runs with token authentication (RAY_AUTH_MODE=token), as ray-cluster.yaml
starts clusters, so the run also shows the project works against one. `ray stop --force`
at the end stops every Ray process on the machine: run no other Ray beside this test.

Slow (minutes): marked `slow`; .ci/run runs it."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PORT, DASHBOARD = 6379, 8293  # the fake provider starts its nodes against 6379

pytestmark = pytest.mark.slow


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
    """`ray start --head` with the fake autoscaler; stopped (all its nodes too) after."""
    import ray

    import socket

    assert not ray.is_initialized(), "another Ray is running in this process"
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", PORT)) == 0:
            pytest.skip(f"port {PORT} is taken (another Ray head?); the fake provider "
                        "starts its nodes against it")
    ray_bin = Path(sys.executable).with_name("ray")
    ray_bin = str(ray_bin) if ray_bin.exists() else shutil.which("ray")
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    config = fake_cluster_config(tmp_path / "fake-cluster.yaml")
    subprocess.run([ray_bin, "start", "--head", f"--port={PORT}", "--num-cpus=0",
                    f"--dashboard-port={DASHBOARD}", "--dashboard-host=127.0.0.1",
                    "--disable-usage-stats", f"--autoscaling-config={config}"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        yield env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)


def alive_nodes(env) -> int:
    """Alive nodes, as a separate driver sees them (-1 if it cannot connect)."""
    out = subprocess.run(
        [sys.executable, "-c",
         "import ray; ray.init(address='127.0.0.1:%d', logging_level='ERROR', "
         "log_to_driver=False); print('ALIVE=%%d' %% sum(n['Alive'] for n in ray.nodes()))"
         % PORT], env=env, capture_output=True, text=True, timeout=120)
    alive = [x for x in out.stdout.splitlines() if x.startswith("ALIVE=")]
    return int(alive[-1][len("ALIVE="):]) if alive else -1


def test_autoscaler_adds_nodes_for_a_run_and_removes_them_after(autoscaling_head, tmp_path):
    env = autoscaling_head
    assert alive_nodes(env) == 1  # the head alone: no CPU anywhere
    seen: list[int] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(alive_nodes(env))
            time.sleep(2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "rlhf.dpo", f"cluster.address=127.0.0.1:{PORT}",
         "cluster.num_workers=2", "cluster.cpus_per_worker=1", "cluster.data_cpus=1",
         f"output.dir={tmp_path / 'runs'}", "output.name=auto", "data.demo_pairs=64",
         "data.demo_eval_pairs=16", "train.eval_every=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    run_s = time.time() - t0
    done.set()
    watcher.join(timeout=150)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "auto" / "summary.json").read_text())
    assert summary["samples"] == 64 and summary["steps"] == 8
    assert max(seen) >= 3, seen  # the head + the 2 nodes the run asked for
    deadline = time.time() + 180  # idle for 0.25 min, then terminated
    while (n := alive_nodes(env)) > 1 and time.time() < deadline:
        time.sleep(3)
    assert n == 1, "idle nodes were not removed"
    print(f"run {run_s:.0f} s; alive nodes seen during it: {sorted(set(seen))}; idle "
          f"nodes removed {time.time() - t0 - run_s:.0f} s after it ended")
