"""Integration tests: a real local Ray cluster (4 logical CPUs: 2 training workers
plus the Ray Data pipeline), real DeepSpeed engines, the tiny model, CPU only."""

import contextlib
import json
import os
from pathlib import Path

import pytest
# Ray's log handlers keep the stream sys.stderr is when ray and ray.data are first
# imported: imported inside a test that captures output (capsys), they would write to
# that test's closed stream for the rest of the session ("--- Logging error ---").
import ray.data  # noqa: F401


def shared_ray() -> None:
    """The local Ray every in-process run of the session shares (started once; a Ray
    start is several seconds, and each module used to pay it)."""
    from cluster.ray_cluster import connect, quiet_ray_data
    from rlhf.config import ClusterConfig
    from rlhf.runlog.console import divert_to

    connect(ClusterConfig(num_workers=2, cpus_per_worker=1, data_cpus=2))  # no-op when up
    quiet_ray_data()
    divert_to()


def release_shared_ray() -> None:
    """For a test that starts a cluster of its own: the shared Ray goes first (the next
    `ray_cluster` starts it again). Such tests are marked own_cluster and run first."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    """The shared local Ray; shut down at the end of the session (tests/conftest.py)."""
    shared_ray()


@pytest.fixture
def s3_bucket(monkeypatch):
    """A real S3-compatible server on 127.0.0.1 and an empty bucket (s3_server)."""
    with s3_server(monkeypatch.setenv) as server:
        yield server


@contextlib.contextmanager
def s3_server(setenv=os.environ.__setitem__):
    """A real S3-compatible server (moto's, in a thread of this process) on 127.0.0.1 and
    an empty bucket in it; the AWS_* variables (set with `setenv`) point pyarrow, and so
    Ray Data and Ray Train, at it. Yields (boto3 client, bucket name). Stands in for S3
    itself, which cannot be reached from here."""
    import logging
    import socket
    import uuid

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint}.items():
        setenv(k, v)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = f"rlhf-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    try:
        yield client, bucket
    finally:
        server.stop()


SMALL = ["data.demo_pairs=96", "data.demo_eval_pairs=32", "train.eval_every=6",
         "train.checkpoint_every=0", "train.log_every=1"]


def dpo(tmp_path: Path, *overrides: str, **kwargs) -> Path:
    from rlhf.config import DPOConfig, parse_args
    from rlhf.dpo import run

    cfg = parse_args(DPOConfig, [f"output.dir={tmp_path}", *SMALL, *overrides], "rlhf.dpo")
    return run(cfg, **kwargs)


def kto(tmp_path: Path, *overrides: str, **kwargs) -> Path:
    from rlhf.config import KTOConfig, parse_args
    from rlhf.kto import run

    cfg = parse_args(KTOConfig, [f"output.dir={tmp_path}", *SMALL, *overrides], "rlhf.kto")
    return run(cfg, **kwargs)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def rm(tmp_path: Path, *overrides: str, **kwargs) -> Path:
    from rlhf.config import RMConfig, parse_args
    from rlhf.rm import run

    cfg = parse_args(RMConfig, [f"output.dir={tmp_path}", *SMALL, *overrides], "rlhf.rm")
    return run(cfg, **kwargs)


def sft(tmp_path: Path, *overrides: str, **kwargs) -> Path:
    from rlhf.config import SFTConfig, parse_args
    from rlhf.sft import run

    cfg = parse_args(SFTConfig, [f"output.dir={tmp_path}", *SMALL, *overrides], "rlhf.sft")
    return run(cfg, **kwargs)


def ppo(tmp_path: Path, *overrides: str, **kwargs) -> Path:
    from rlhf.config import PPOConfig, parse_args
    from rlhf.ppo import run

    cfg = parse_args(PPOConfig, [f"output.dir={tmp_path}", *overrides], "rlhf.ppo")
    return run(cfg, **kwargs)
