"""output.report_to=tensorboard,wandb,mlflow for real: MLflow's own tracking server on
127.0.0.1 (the full mlflow package, in a virtual environment of its own: its pins would
move the project's pyarrow and cachetools) spoken to over its REST API by the run and
read back through MLflow's own client, W&B in offline mode read
back from its run file; the runs hold every metrics record, the config and the
summary, and no credential planted in the environment or the config is written
anywhere (run directory, W&B files, the MLflow server's store, the output)."""

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rlhf.data.demo import build_once, demo_pair
from tests.integration.conftest import dpo, metrics, summary

MLFLOW_SERVER = "mlflow==3.17.2"  # server and read-back client; the run speaks REST to it


def _server_python() -> Path:
    """The python of a virtual environment holding MLflow's server, made once under the
    project's cache (~/.cache/rlhf, or $RLHF_CACHE) and reused; with uv (~15 s cold on
    2 cores, bytecode compiled: the server starts in seconds), else pip; built once
    (rlhf.data.demo.build_once: never a half-made one). Skips the test where it cannot
    be installed (no package index)."""
    root = Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf")
    venv = root / f"mlflow-server-{MLFLOW_SERVER.split('==')[1]}"
    python = venv / "bin" / "python"
    if (venv / ".ready").is_file():
        return python
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")

    def build(staging: Path) -> None:
        if uv:
            steps = [[uv, "venv", "-q", "--python", sys.executable, str(staging)],
                     [uv, "pip", "install", "-q", "--compile-bytecode", "--python",
                      str(staging / "bin" / "python"), MLFLOW_SERVER]]
        else:
            steps = [[sys.executable, "-m", "venv", str(staging)],
                     [str(staging / "bin" / "python"), "-m", "pip", "install", "-q",
                      MLFLOW_SERVER]]
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                pytest.skip(f"could not install {MLFLOW_SERVER} for the tracking server "
                            f"({' '.join(cmd[:3])}): {done.stderr.strip()[-500:]}")
        (staging / ".ready").write_text("")

    build_once(venv, build)
    return python


@contextlib.contextmanager
def mlflow_server(store: Path):
    """`mlflow server` on a free port of 127.0.0.1 with its store (SQLite database,
    artifacts) in `store`; yields its URI. Started with none of the test's planted
    credentials in its environment; killed (its process group) at the end."""
    python = _server_python()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    # Without its job runner: 8 more processes (huey consumers) the test has no use for,
    # starting while the run does on 2 cores.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = open(store.parent / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [str(python), "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
         "--artifacts-destination", str(store / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                raise RuntimeError("the MLflow server did not start: "
                                   + (store.parent / "mlflow-server.log").read_text()[-2000:])
            time.sleep(0.2)
        yield uri
    finally:
        # The server and its uvicorn worker, at once: a graceful stop waits seconds for
        # the clients' keep-alive connections, and everything was read back already.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
        log.close()


def wandb_records(run_file: Path):
    """The records of a W&B run file (run-<id>.wandb), through wandb's own protobuf
    messages. The file is a LevelDB-style log: a 7-byte header (':W&B', magic 0xBEE1,
    version), then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32, length,
    type: 1 full, 2 first, 3 middle, 4 last). wandb 0.31 reads it in its Go core alone
    (the Python reader of earlier releases is gone)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, data[:7]
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _wandb_run(wandb_dir: Path) -> dict:
    """config, history rows, summary and exit code of the one offline run in wandb_dir."""
    (run_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    out: dict = {"config": {}, "history": [], "summary": {}, "exit_code": None}
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["project"] = r.run.display_name, r.run.project
            out["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            out["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in r.history.item})
        elif kind == "summary":
            for u in r.summary.update:
                out["summary"][u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


READ_BACK = """
import json, sys
from pathlib import Path
from mlflow.tracking import MlflowClient

uri, experiment, dl = sys.argv[1:]
ml = MlflowClient(uri)
(run,) = ml.search_runs([ml.get_experiment_by_name(experiment).experiment_id])
rid = run.info.run_id
print(json.dumps({
    "run_id": rid, "run_name": run.info.run_name, "status": run.info.status,
    "history": [[m.step, m.value] for m in ml.get_metric_history(rid, "train/loss")],
    "params": run.data.params, "metrics": run.data.metrics,
    "artifacts": [a.path for a in ml.list_artifacts(rid)],
    "summary": json.loads(Path(ml.download_artifacts(rid, "summary.json", dl)).read_text()),
}))
"""


def _read_back(uri: str, experiment: str, dl: Path) -> dict:
    """The run as MLflow's own client reads it, from the server's environment (the
    project's has no mlflow: its cachetools<8 pin breaks Ray's job agent)."""
    dl.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    done = subprocess.run([str(_server_python()), "-c", READ_BACK, uri, experiment, str(dl)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_wandb_and_mlflow_get_the_run_and_no_secret_is_written(
        ray_cluster, tmp_path, s3_bucket, monkeypatch, capfd):
    client, bucket = s3_bucket
    for key, rows in (("pairs/train.jsonl", [demo_pair(i) for i in range(16)]),
                      ("pairs/held.jsonl", [demo_pair(i, "eval") for i in range(8)])):
        client.put_object(Bucket=bucket, Key=key,
                          Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    # Credentials as a cluster node has them: unique values, so any copy is found.
    planted = {k: f"{k.lower()}-{uuid.uuid4().hex}" for k in (
        "WANDB_API_KEY", "HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY")}
    # ... and one in the config: an object-store URL with a key pair in it.
    url_secret = f"cfgsecret{uuid.uuid4().hex}"
    data_url = f"s3://AKIDPLANTED:{url_secret}@{bucket}/pairs"
    store, wandb_dir = tmp_path / "mlflow-store", tmp_path / "wandb"
    with mlflow_server(store) as uri:
        for k, v in {**planted, "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "rlhf",
                     "MLFLOW_EXPERIMENT_NAME": "trackers-test", "WANDB_MODE": "offline",
                     "WANDB_DIR": str(wandb_dir), "WANDB_PROJECT": "trackers-test"}.items():
            monkeypatch.setenv(k, v)
        run_dir = dpo(tmp_path / "runs", "output.report_to=tensorboard,wandb,mlflow",
                      f"data.path={data_url}/train.jsonl",
                      f"data.eval_path={data_url}/held.jsonl")
        ml = _read_back(uri, "trackers-test", tmp_path / "dl")
    printed = capfd.readouterr()

    rows, s = metrics(run_dir), summary(run_dir)
    train = [r for r in rows if "train/loss" in r]
    assert s["steps"] == 2 and [r["step"] for r in train] == [1, 2]
    assert set(s["trackers"]) == {"tensorboard", "wandb", "mlflow"}
    assert not any("failures" in t for t in s["trackers"].values()), s["trackers"]

    # MLflow: the run, per-step losses equal to metrics.jsonl's, params, the summary
    assert ml["run_name"] == run_dir.name and ml["status"] == "FINISHED"
    assert s["trackers"]["mlflow"]["run_id"] == ml["run_id"]
    assert ml["history"] == [[r["step"], r["train/loss"]] for r in train]
    params = ml["params"]
    assert params["loss.beta"] == "0.1" and params["train.max_steps"] == "-1"
    assert params["output.report_to"] == '["tensorboard", "wandb", "mlflow"]'
    assert params["data.path"] == f"s3://***@{bucket}/pairs/train.jsonl"
    assert ml["metrics"]["summary/steps"] == 2
    assert ml["metrics"]["summary/eval/loss"] == s["eval/loss"]
    assert {"config.yaml", "summary.json"} <= set(ml["artifacts"])
    assert ml["summary"] == {k: v for k, v in s.items() if k != "trackers"}

    # W&B offline: config, one history row per metrics record, the summary, exit 0
    wb = _wandb_run(wandb_dir)
    assert wb["name"] == run_dir.name and wb["project"] == "trackers-test"
    assert wb["config"]["loss"]["beta"] == 0.1
    assert wb["config"]["data"]["path"] == f"s3://***@{bucket}/pairs/train.jsonl"
    assert [h["step"] for h in wb["history"]] == [r["step"] for r in rows]
    assert ([(h["step"], h["train/loss"]) for h in wb["history"] if "train/loss" in h]
            == [(r["step"], r["train/loss"]) for r in train])
    assert wb["summary"]["steps"] == 2 and wb["summary"]["eval/loss"] == s["eval/loss"]
    assert wb["exit_code"] == 0
    assert s["trackers"]["wandb"]["dir"].startswith(str(wandb_dir))

    # No planted credential anywhere: files of the run, W&B, the MLflow store, output
    assert "s3://***@" in (run_dir / "config.yaml").read_text()
    files = [p for d in (run_dir, wandb_dir, store) for p in d.rglob("*") if p.is_file()]
    files.append(tmp_path / "mlflow-server.log")
    assert len(files) > 20 and any(p.suffix == ".db" for p in files)
    secrets = [*planted.values(), url_secret, "AKIDPLANTED"]
    for f in files:
        data = f.read_bytes()
        assert not [v for v in secrets if v.encode() in data], f
    text = printed.out + printed.err
    assert not [v for v in secrets if v in text]
    assert f"reading pairs from s3://***@{bucket}/pairs/train.jsonl" in text
