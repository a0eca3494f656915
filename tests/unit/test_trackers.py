"""output.report_to (parsing, checks), the secret redaction, and the tracker fan-out's
handling of a tracker that fails mid-run (rlhf.runlog.trackers; no Ray, no server: the real
trackers are read back in tests/integration/test_trackers.py)."""

import pytest

from rlhf.runlog import console, trackers
from rlhf.runlog.redact import REDACTED, redact, redact_text, secret_name
from rlhf.config import ConfigError, DPOConfig, OutputConfig, parse_args


@pytest.mark.parametrize("name", [
    "token", "hf_token", "HF_TOKEN", "access_token", "api_key", "WANDB_API_KEY", "apiKey",
    "apikey", "AWS_SECRET_ACCESS_KEY", "client_secret", "password", "db-password",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "private_key", "X-Amz-Signature",
    "authToken", "credentials", "auth"])
def test_secret_names(name):
    assert secret_name(name)


@pytest.mark.parametrize("name", [
    "max_new_tokens", "chunk_tokens", "tokenizer", "TOKENIZERS_PARALLELISM", "path",
    "author", "keep_checkpoints", "name_or_path", "hub_model_id", "beta", "monkey",
    "WANDB_MODE", "MLFLOW_TRACKING_URI", "secretary_count"])
def test_names_that_are_not_secret(name):
    assert not secret_name(name)


def test_redact_text_urls_and_query_parameters():
    assert redact_text("s3://AKID:s3cr3t@bucket/pairs.jsonl") == "s3://***@bucket/pairs.jsonl"
    assert (redact_text("reading https://user:pa%40ss@host.example:8443/x?y=1 now")
            == "reading https://***@host.example:8443/x?y=1 now")
    assert redact_text("git+https://ghp_abc123@github.com/o/r") == "git+https://***@github.com/o/r"
    assert (redact_text("https://h/f?X-Amz-Signature=abcd&X-Amz-Date=2024&token=t0k&key=k")
            == "https://h/f?X-Amz-Signature=***&X-Amz-Date=2024&token=***&key=***")
    # what stays: plain paths, @ in a path, a host and port, e-mail-like text, numbers
    for text in ("/data/pairs@v2.jsonl", "s3://bucket/a@b/c.jsonl", "ray://head:10001",
                 "see me@example.com", "loss 0.6931 at step 3", "builtin:demo", ""):
        assert redact_text(text) == text


def test_redact_text_takes_out_secret_environment_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_plantedvalue123")
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "short")  # too short to replace in text
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a secret name
    assert redact_text("data at /x/hf_plantedvalue123/y") == f"data at /x/{REDACTED}/y"
    assert redact_text("a short false story") == "a short false story"


def test_redact_trees():
    cfg = {"data": {"path": "s3://k:v@b/p", "eval_path": None, "columns": {"prompt": "p"}},
           "rollout": {"max_new_tokens": 64, "env_args": {"api_key": "sk-1", "hfToken": "x",
                                                          "use_auth": True, "retries": 3}},
           "hub_token": "", "list": ["https://u:p@h/a", 1, None], "t": ("a", "b")}
    out = redact(cfg)
    assert out == {
        "data": {"path": "s3://***@b/p", "eval_path": None, "columns": {"prompt": "p"}},
        "rollout": {"max_new_tokens": 64, "env_args": {"api_key": REDACTED,
                                                       "hfToken": REDACTED,
                                                       "use_auth": True, "retries": 3}},
        "hub_token": "", "list": ["https://***@h/a", 1, None], "t": ("a", "b")}
    assert cfg["data"]["path"] == "s3://k:v@b/p"  # a copy; the input is untouched


def test_model_card_command_line_without_credentials(monkeypatch):
    from rlhf.train import model_card

    monkeypatch.setattr("sys.argv", ["-m", "data.path=s3://AK:SK@b/p.jsonl",
                                     "rollout.env_args.api_key=sk-123", "loss.beta=0.2"])
    assert model_card.command("dpo") == ("python -m rlhf.dpo 'data.path=s3://***@b/p.jsonl' "
                                         "'rollout.env_args.api_key=***' loss.beta=0.2")


# ------------------------------------------------------------------ output.report_to


def test_report_to_default_lists_and_none():
    assert DPOConfig().output.report_to == ["tensorboard"]
    for arg, want in (("tensorboard,wandb,mlflow", ["tensorboard", "wandb", "mlflow"]),
                      ("[WandB, tensorboard, wandb]", ["wandb", "tensorboard"]),
                      ("mlflow", ["mlflow"]), ("none", []), ("[]", [])):
        assert parse_args(DPOConfig, [f"output.report_to={arg}"], "x").output.report_to == want
    assert OutputConfig(report_to="wandb, mlflow").report_to == ["wandb", "mlflow"]


def test_report_to_unknown_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown tracker 'comet'; choose from "
                                          r"tensorboard, wandb, mlflow \(comma-separated\)"):
        parse_args(DPOConfig, ["output.report_to=tensorboard,comet"], "x")


def test_report_to_a_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"output.report_to=wandb needs the wandb "
                                          r"package.*pip install 'rlhf-ray\[trackers\]'"):
        parse_args(DPOConfig, ["output.report_to=wandb"], "x")
    # mlflow needs no package for an http(s) server: the config takes it as it is
    assert parse_args(DPOConfig, ["output.report_to=mlflow"], "x").output.report_to == \
        ["mlflow"]


def test_mlflow_needs_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        trackers.check(["tensorboard", "mlflow"])
    trackers.check(["tensorboard", "wandb"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    trackers.check(["mlflow"])
    # any other URI goes through the mlflow package's client
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    with pytest.raises(ConfigError, match="any other URI needs the mlflow package"):
        trackers.check(["mlflow"])


def test_tracker_env_is_the_trackers_own(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    env = trackers.tracker_env()
    assert env["WANDB_MODE"] == "offline" and env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1"
    assert "HF_TOKEN" not in env


def test_mlflow_names_and_flat_params():
    assert trackers._key("counts.dropped: too long (>1024)") == "counts.dropped: too long __1024_"
    assert trackers.flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {},
                                                                   "d": [1]}
    assert trackers.scalars({"step": 3, "train/loss": 1, "x": "s", "ok": True}) == {
        "train/loss": 1.0, "ok": 1.0}


# ----------------------------------------------------------------------- the fan-out


class _Recorder:
    def __init__(self, run_dir, run_name, config, fail_from=None):
        self.rows, self.config, self.summary_got, self.closed = [], config, None, None
        self.fail_from = fail_from

    def info(self):
        return {"where": "here"}

    def log(self, step, values):
        if self.fail_from is not None and step >= self.fail_from:
            raise ConnectionError("http://user:pw@127.0.0.1:9/ refused")
        self.rows.append((step, values))

    def summary(self, summary):
        if self.fail_from is not None:
            raise ConnectionError("still down")
        self.summary_got = summary

    def close(self, failed):
        self.closed = failed


def test_a_tracker_failing_mid_run_is_counted_and_never_stops_the_others(
        monkeypatch, tmp_path, capsys):
    made = {}

    def kind(name, **kw):
        def make(*args):
            made[name] = _Recorder(*args, **kw)
            made[name].name = name
            return made[name]
        return make

    monkeypatch.setattr(trackers, "KINDS", {"good": kind("good"),
                                            "flaky": kind("flaky", fail_from=3)})
    t = trackers.Trackers(["good", "flaky"], tmp_path, "run", {"hub_token": "abc",
                                                                "data": {"path": "s3://a:b@c/d"}})
    assert made["good"].config == {"hub_token": REDACTED, "data": {"path": "s3://***@c/d"}}
    for step in range(1, 9):
        t.log({"step": step, "train/loss": 1.0 / step})
    status = t.finish({"steps": 8, "api_key": "k"})
    assert [s for s, _ in made["good"].rows] == list(range(1, 9))
    assert made["good"].summary_got == {"steps": 8, "api_key": REDACTED}
    assert [s for s, _ in made["flaky"].rows] == [1, 2]
    # steps 3-5 failed (3 in a row: given up), 6-8 and the summary skipped; close tried
    assert status["good"] == {"where": "here"}
    assert status["flaky"] == {"where": "here", "failures": 3, "skipped": 4,
                               "error": "ConnectionError: http://***@127.0.0.1:9/ refused"}
    assert made["flaky"].closed is False and made["good"].closed is False
    err = capsys.readouterr().err
    assert err.count("warning: the flaky tracker failed (") == 1
    assert "failed 3 times in a row" in err and "pw@" not in err


def test_a_tracker_that_cannot_start_names_itself_and_closes_the_others(monkeypatch, tmp_path):
    made = []

    def good(*args):
        made.append(_Recorder(*args))
        made[-1].name = "good"
        return made[-1]

    def bad(*args):
        raise PermissionError("api key rejected for https://u:p@api.example")

    monkeypatch.setattr(trackers, "KINDS", {"good": good, "bad": bad})
    with pytest.raises(RuntimeError, match=r"could not start the bad tracker: PermissionError: "
                                           r"api key rejected for https://\*\*\*@api.example"):
        trackers.Trackers(["good", "bad"], tmp_path, "run", {})
    assert made[0].closed is True  # ended as failed


def test_mlflow_tracker_against_no_server_fails_with_its_name(monkeypatch, tmp_path):
    """A tracking server that is not there: the start fails with the tracker's name and
    the server's address, after MLFLOW_HTTP_REQUEST_MAX_RETRIES more tries (MLflow's own
    client would back off for minutes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://u:hunter2-secret@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    with pytest.raises(RuntimeError) as e:
        trackers.Trackers(["mlflow"], tmp_path, "run", {})
    assert f"could not start the mlflow tracker: RuntimeError: MLflow at " \
           f"http://127.0.0.1:{port}" in str(e.value)
    assert "hunter2" not in str(e.value)


def test_the_log_outlives_a_run_directory_that_is_gone(tmp_path, monkeypatch):
    """Ray's records after a run whose folder was deleted (a built-in model trained in a
    temporary folder, then the run that needed it going on) go to the temp folder's log,
    not to an error in the middle of the logging call."""
    run_log = tmp_path / "run" / "run.log"
    run_log.parent.mkdir()
    monkeypatch.setattr(console._FILTER, "path", run_log)
    assert console.log_path() == run_log
    run_log.parent.rmdir()
    assert console.log_path().name == "rlhf-run.log" and console.log_path().parent.is_dir()
