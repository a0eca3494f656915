"""`ray job submit --working-dir . -- python -m rlhf.dpo` against a real Ray head started
with `ray start` (token authentication on), as a user does on a cluster."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_head():
    """A Ray head started as a user starts one. The other integration modules shut their
    local Ray down at module end, so `ray stop` here stops only this cluster."""
    import ray

    assert not ray.is_initialized(), "another Ray is running in this process"
    ray_bin = Path(sys.executable).with_name("ray")
    ray_bin = str(ray_bin) if ray_bin.exists() else shutil.which("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([ray_bin, "start", "--head", "--port=6391", "--dashboard-port=8291",
                    "--num-cpus=4", "--disable-usage-stats", "--dashboard-host=127.0.0.1"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        deadline = time.time() + 120
        while subprocess.run([ray_bin, "job", "list", "--address", "http://127.0.0.1:8291"],
                             env=env, capture_output=True).returncode != 0:
            if time.time() > deadline:
                pytest.fail("the Ray head's job server did not come up")
            time.sleep(2)
        yield ray_bin, env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)


def test_job_submit_runs_dpo(ray_head, tmp_path):
    ray_bin, env = ray_head
    out = subprocess.run(
        [ray_bin, "job", "submit", "--address", "http://127.0.0.1:8291", "--working-dir",
         str(ROOT), "--", sys.executable, "-m", "rlhf.dpo", f"output.dir={tmp_path / 'runs'}",
         "output.name=job", "data.demo_pairs=64", "data.demo_eval_pairs=16"],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "held-out reward accuracy" in out.stdout
    summary = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
    assert summary["samples"] == 64
    assert (tmp_path / "runs" / "job" / "model" / "model.safetensors").is_file()
