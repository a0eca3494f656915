"""Experiment trackers (output.report_to).

The run log actor (rlhf.runlog.metrics_log.RunLog, on the driver's node: rank 0's records only)
hands every metrics record, the run's resolved config and its final summary to each
tracker named in output.report_to: TensorBoard (event files in the run directory),
Weights & Biases and MLflow. Each reads its usual environment variables (W&B:
WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, WANDB_DIR, WANDB_API_KEY, ...; MLflow:
MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN,
...): those of the launching process (`tracker_env`) are handed to the actor, whose
Ray worker may have been started under another environment. wandb and mlflow are
imported in the actor alone, when named.

A tracker that cannot start fails the run before training (a clear error); one that
fails mid-run (its server gone) never stops training: a warning the first time,
failures counted, and after GIVE_UP failures in a row it is no longer called; the
counts are in summary.json's `trackers`. metrics.jsonl holds every record either way.
Configs and summaries are redacted (rlhf.runlog.redact) here again, whoever calls.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from cluster.worker import say
from rlhf.config import ConfigError
from rlhf.runlog.redact import redact, redact_text

# pip installs for the trackers that are not dependencies of the project
INSTALL = {"wandb": "wandb", "mlflow": "mlflow"}
EXTRA_HINT = "pip install 'rlhf-ray[trackers]'"
# Environment variables of the launching process handed to the run log actor.
ENV_PREFIXES = ("WANDB_", "MLFLOW_")
GIVE_UP = 3  # failures in a row after which a tracker is no longer called

# --------------------------------------------------------------------- driver side


def check(report_to: list[str]) -> None:
    """What the named trackers need from the launching environment, checked before
    anything starts (the packages are checked with the config: OutputConfig)."""
    if "mlflow" not in report_to:
        return
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ConfigError(
            "output.report_to=mlflow needs MLFLOW_TRACKING_URI: the tracking server's "
            "address (e.g. http://127.0.0.1:5000 for `mlflow server`), or another URI "
            "MLflow takes (sqlite:///mlflow.db, databricks) with the mlflow package.")
    if not _http(uri) and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={redact_text(uri)}: an http(s) tracking server is spoken "
            "to directly; any other URI needs the mlflow package (pip install mlflow; "
            "mlflow 3.x pins cachetools<8, with which Ray 2.60's `ray job submit` fails: "
            "prefer a tracking server).")


def tracker_env() -> dict[str, str]:
    """The launching process's WANDB_* and MLFLOW_* variables, for the run log actor."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


# --------------------------------------------------------------------- the trackers


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"loss": {"beta": 0.1}} -> {"loss.beta": 0.1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def scalars(record: dict) -> dict[str, float]:
    """The numeric values of a metrics record, `step` left out."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float))}


def _missing(name: str) -> ImportError:
    how = f"{EXTRA_HINT} (or pip install {INSTALL[name]})" if name == "wandb" else \
        f"pip install {INSTALL[name]}, or an http(s) tracking server, which needs none"
    return ImportError(f"output.report_to={name} needs the {INSTALL[name]} package: {how}.")


class TensorBoard:
    """Scalars through tensorboard's own event writer: what torch's
    SummaryWriter.add_scalar writes (one simple_value per tag and step), without
    importing torch into the run log actor (2 s of CPU at every run's start)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = Event, Summary
        self.logdir = run_dir / "tensorboard"
        self._writer = EventFileWriter(str(self.logdir))

    def info(self) -> dict:
        return {"dir": str(self.logdir)}

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            value = self._summary.Value(tag=tag, simple_value=v)
            self._writer.add_event(self._event(wall_time=time.time(), step=step,
                                               summary=self._summary(value=[value])))

    def summary(self, summary: dict) -> None:
        pass

    def close(self, failed: bool) -> None:
        self._writer.close()


class WandB:
    """A W&B run: the config as its config, each record as a history row (x axis: the
    `step` key), the summary as its summary. The SDK's collection of the command line,
    git state, code, console output and host metrics is off: the command line may hold
    credentials, and the host is the driver's, not the training workers'."""

    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        env = os.environ
        settings = wandb.Settings(x_disable_meta=True, x_disable_stats=True,
                                  x_disable_machine_info=True, disable_git=True,
                                  disable_code=True, save_code=False, console="off",
                                  quiet=True)
        self.run = wandb.init(project=env.get("WANDB_PROJECT") or "rlhf",
                              name=env.get("WANDB_NAME") or run_name,
                              dir=env.get("WANDB_DIR") or str(run_dir), config=config,
                              settings=settings)
        self.run.define_metric("*", step_metric="step")

    def info(self) -> dict:
        out = {"project": self.run.project, "run_id": self.run.id,
               "dir": str(Path(self.run.dir).parent)}
        if self.run.url:
            out["url"] = self.run.url
        return out

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def summary(self, summary: dict) -> None:
        self.run.summary.update(summary)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class MLflow:
    """An MLflow run: the flattened config as params (values cut at MLflow's length
    limit) and config.yaml as an artifact, each record's numbers as metrics at their
    step, the summary's numbers as summary/<key> metrics and the whole as summary.json,
    the run ended FINISHED or FAILED. Experiment: MLFLOW_EXPERIMENT_ID or
    MLFLOW_EXPERIMENT_NAME (else `rlhf`), made when missing. An http(s) tracking URI is
    spoken to over MLflow's REST API (`MLflowREST`, no package); any other URI through
    the mlflow package's client (`MLflowClientAPI`)."""

    name = "mlflow"
    MAX_PARAM = 6000  # MLflow's limit on a param value (MAX_PARAM_VAL_LENGTH)

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        self.uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        self.api = MLflowREST(self.uri) if _http(self.uri) else MLflowClientAPI(self.uri)
        self.experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or self.api.experiment(
            os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rlhf")
        self.run_id = self.api.create_run(
            self.experiment_id, os.environ.get("MLFLOW_RUN_NAME") or run_name,
            {"rlhf.run_dir": str(run_dir)})
        params = [(_key(k), self._value(v)) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.api.log_batch(self.run_id, [], params[i:i + 100])
        if (run_dir / "config.yaml").is_file():
            self.api.log_artifact(self.run_id, "config.yaml",
                                  (run_dir / "config.yaml").read_bytes())
        self.last_step = 0

    def _value(self, v: Any) -> str:
        text = v if isinstance(v, str) else json.dumps(v)
        return text[:self.MAX_PARAM]

    def info(self) -> dict:
        out = {"tracking_uri": redact_text(self.uri), "experiment_id": self.experiment_id,
               "run_id": self.run_id}
        if _http(self.uri):
            out["url"] = redact_text(f"{self.uri.rstrip('/')}/#/experiments/"
                                     f"{self.experiment_id}/runs/{self.run_id}")
        return out

    def log(self, step: int, values: dict[str, float]) -> None:
        self.last_step = step
        now = int(time.time() * 1000)
        metrics = [(_key(k), v, now, step) for k, v in values.items() if math.isfinite(v)]
        for i in range(0, len(metrics), 1000):  # at most 1000 metrics a batch
            self.api.log_batch(self.run_id, metrics[i:i + 1000], [])

    def summary(self, summary: dict) -> None:
        step = int(summary.get("steps", self.last_step) or 0)
        self.log(step, {f"summary/{k}": float(v) for k, v in flatten(summary).items()
                        if isinstance(v, (int, float)) and math.isfinite(v)})
        self.api.log_artifact(self.run_id, "summary.json",
                              json.dumps(summary, indent=2, default=str).encode())

    def close(self, failed: bool) -> None:
        self.api.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class MLflowREST:
    """What the run log needs of an MLflow tracking server, over its REST API with the
    standard library (api/2.0/mlflow/...; artifacts through the server's proxy,
    api/2.0/mlflow-artifacts/..., which `mlflow server` runs by default). Credentials:
    MLFLOW_TRACKING_TOKEN (bearer), MLFLOW_TRACKING_USERNAME/PASSWORD or the URI's
    user:password (basic); MLFLOW_TRACKING_INSECURE_TLS=true skips certificate checks.
    A call waits MLFLOW_HTTP_REQUEST_TIMEOUT seconds (default 30) and is tried again
    MLFLOW_HTTP_REQUEST_MAX_RETRIES times (default 2) on a refused connection or a 5xx:
    a dead server costs the run seconds, not MLflow's minutes of backoff."""

    def __init__(self, uri: str):
        import base64
        import urllib.parse

        parts = urllib.parse.urlsplit(uri.rstrip("/"))
        user = os.environ.get("MLFLOW_TRACKING_USERNAME") or urllib.parse.unquote(
            parts.username or "")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or urllib.parse.unquote(
            parts.password or "")
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.base = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        self.headers = {}
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            self.headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif user:
            self.headers["Authorization"] = "Basic " + base64.b64encode(
                f"{user}:{password}".encode()).decode()
        self.timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 30))
        self.retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", 2))
        self.insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
        self.artifact_uri: dict[str, str] = {}

    def call(self, method: str, path: str, body: Any = None, data: bytes | None = None,
             query: dict | None = None) -> dict:
        import ssl
        import urllib.error
        import urllib.parse
        import urllib.request

        url = f"{self.base}/api/2.0/{path}" + (f"?{urllib.parse.urlencode(query)}"
                                                 if query else "")
        headers = {**self.headers, "Content-Type": "application/octet-stream"
                   if data is not None else "application/json"}
        payload = data if data is not None else (
            json.dumps(body).encode() if body is not None else None)
        context = ssl._create_unverified_context() if self.insecure else None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=payload, method=method,
                                             headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout,
                                            context=context) as r:
                    return json.loads(r.read() or b"{}")
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code < 500 or attempt == self.retries:
                    raise RuntimeError(f"MLflow {method} {path}: HTTP {e.code} {detail}") \
                        from None
            except (urllib.error.URLError, OSError) as e:
                if attempt == self.retries:
                    raise RuntimeError(f"MLflow at {self.base}: {e}") from None
            time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def experiment(self, name: str) -> str:
        try:
            got = self.call("GET", "mlflow/experiments/get-by-name",
                            query={"experiment_name": name})
            return got["experiment"]["experiment_id"]
        except RuntimeError as e:
            if "RESOURCE_DOES_NOT_EXIST" not in str(e):
                raise
        try:
            return self.call("POST", "mlflow/experiments/create",
                             {"name": name})["experiment_id"]
        except RuntimeError:  # made meanwhile by another run
            return self.call("GET", "mlflow/experiments/get-by-name",
                             query={"experiment_name": name})["experiment"]["experiment_id"]

    def create_run(self, experiment_id: str, name: str, tags: dict) -> str:
        run = self.call("POST", "mlflow/runs/create", {
            "experiment_id": experiment_id, "run_name": name,
            "start_time": int(time.time() * 1000),
            "tags": [{"key": k, "value": v} for k, v in
                     {**tags, "mlflow.runName": name}.items()]})["run"]
        self.artifact_uri[run["info"]["run_id"]] = run["info"].get("artifact_uri", "")
        return run["info"]["run_id"]

    def log_batch(self, run_id: str, metrics: list[tuple], params: list[tuple]) -> None:
        self.call("POST", "mlflow/runs/log-batch", {
            "run_id": run_id,
            "metrics": [{"key": k, "value": v, "timestamp": ts, "step": s}
                        for k, v, ts, s in metrics],
            "params": [{"key": k, "value": v} for k, v in params]})

    def log_artifact(self, run_id: str, name: str, data: bytes) -> None:
        """Through the server's artifact proxy (an artifact URI mlflow-artifacts:/...);
        a server that hands out another store (s3://...) is not written to from here."""
        prefix = "mlflow-artifacts:"
        where = self.artifact_uri.get(run_id, "")
        if not where.startswith(prefix):
            return
        path = where[len(prefix):].lstrip("/")
        self.call("PUT", f"mlflow-artifacts/artifacts/{path}/{name}", data=data)

    def set_terminated(self, run_id: str, status: str) -> None:
        self.call("POST", "mlflow/runs/update", {
            "run_id": run_id, "status": status, "end_time": int(time.time() * 1000)})


class MLflowClientAPI:
    """The same calls through the mlflow package's client, for URIs other than http(s)
    (a database, databricks, a plugin's)."""

    def __init__(self, uri: str):
        # The client prints the run's address built from the tracking URI, credentials
        # in it included; the run log prints a redacted one instead (MLflow.info).
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow") from None
        self.client = MlflowClient(uri or None)

    def experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 -- made meanwhile by another run
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def create_run(self, experiment_id: str, name: str, tags: dict) -> str:
        return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def log_batch(self, run_id: str, metrics: list[tuple], params: list[tuple]) -> None:
        from mlflow.entities import Metric, Param

        self.client.log_batch(run_id, metrics=[Metric(*m) for m in metrics],
                              params=[Param(*p) for p in params])

    def log_artifact(self, run_id: str, name: str, data: bytes) -> None:
        self.client.log_text(run_id, data.decode(), name)

    def set_terminated(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)


def _key(name: str) -> str:
    """A metric or param name MLflow accepts (alphanumerics, _ - . / : and spaces)."""
    return re.sub(r"[^\w./\- :]", "_", name)[:250]


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The trackers of one run, started in order; a failure to start closes those
    already started and raises RuntimeError naming the tracker."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict):
        self.active: list[Any] = []
        self.state: dict[str, dict] = {}
        config = redact(config)
        for name in names:
            try:
                tracker = KINDS[name](run_dir, run_name, config)
            except Exception as e:  # noqa: BLE001 -- reported with the tracker's name
                self.finish(None)
                raise RuntimeError(f"could not start the {name} tracker: "
                                   f"{redact_text(f'{type(e).__name__}: {e}')}") from None
            self.active.append(tracker)
            self.state[name] = {"failures": 0, "in_a_row": 0, "skipped": 0, "error": ""}
            if name != "tensorboard":
                info = tracker.info()
                where = info.get("url") or info.get("dir") or info.get("tracking_uri", "")
                say(f"{name}: run {run_name} at {where}")

    def log(self, record: dict) -> None:
        values = scalars(record)
        for t in self.active:
            self._call(t, t.log, record["step"], values)

    def finish(self, summary: dict | None) -> dict:
        """Summary (None: the run failed) and close; each tracker's status: where its run
        is, and its failures and skipped calls where there were any."""
        out = {}
        for t in self.active:
            if summary is not None:
                self._call(t, t.summary, redact(summary))
            self._call(t, t.close, summary is None, always=True)
            s = self.state[t.name]
            out[t.name] = {**t.info(), **({"failures": s["failures"], "skipped": s["skipped"],
                                           "error": s["error"]} if s["failures"] else {})}
        self.active = []
        return out

    def _call(self, t: Any, fn: Any, *args: Any, always: bool = False) -> None:
        s = self.state[t.name]
        if s["in_a_row"] >= GIVE_UP and not always:
            s["skipped"] += 1
            return
        try:
            fn(*args)
            s["in_a_row"] = 0
        except Exception as e:  # noqa: BLE001 -- a tracker never stops training
            s["failures"] += 1
            s["in_a_row"] += 1
            text = redact_text(f"{type(e).__name__}: {e}").strip().splitlines()
            if s["failures"] == 1:
                s["error"] = text[0] if text else type(e).__name__
                say(f"warning: the {t.name} tracker failed ({s['error']}); training goes "
                    "on, every record is in metrics.jsonl", err=True)
            if s["in_a_row"] == GIVE_UP and not always:
                say(f"warning: the {t.name} tracker failed {GIVE_UP} times in a row; it "
                    "gets nothing more in this run", err=True)
