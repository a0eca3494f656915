"""What reaches the terminal: the run's own lines, and when something is wrong one clear
message, printed last. Everything else goes to the run's log file (run.log in the run
directory).

Ray's workers print a great deal: vLLM's INFO lines and CPU-backend warnings, DeepSpeed's
config, Ray Data's progress notes, Ray's deduplication notices; Ray logs a failed data
task's traceback at ERROR (Ray Data twice, ~170 lines for one malformed JSON line) before
the exception reaches the driver, and appends its retry advice to the exception's text.
So an entry point
    - sends what Ray's workers print to run.log and shows only the lines they mark for
      the user (cluster.worker.say: progress, resumes, engine restarts), plus the
      autoscaler's events (`route_worker_output`);
    - sends the records of Ray's own loggers in this process to run.log (`divert_to`);
    - on failure writes the traceback there and prints the message alone, as the last
      line (`fail`).
RLHF_VERBOSE=1 in the environment keeps Ray's own console output instead (run.log still
gets the tracebacks).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from cluster.worker import SAY
from rlhf.runlog.redact import redact_text

LOG_NAME = "run.log"
VERBOSE_ENV = "RLHF_VERBOSE"
# Ray Data appends these to a task's exception text; they are advice about Ray's
# retries, not about the input.
RAY_NOTES = ("\nFailed to read stream iteratively", "\nFailed to apply UDF transform",
             "\nTo change retry attempts")
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def log_path() -> Path:
    """The run's log file: run.log of the current run directory, or a file in the temp
    folder before one exists, or once it is gone (a built-in model trained in a
    temporary folder, then the run that needed it going on)."""
    if _FILTER.path is not None and _FILTER.path.parent.is_dir():
        return _FILTER.path
    return Path(tempfile.gettempdir()) / f"rlhf-{LOG_NAME}"


_LOCK = threading.Lock()  # Ray's printer thread and this process write the log


def _append(lines: list[str]) -> None:
    with _LOCK, open(log_path(), "a") as f:
        f.writelines(redact_text(line) + "\n" for line in lines)


class _ToFile(logging.Filter):
    """On the console handlers of Ray's loggers: records go to the run's log instead
    (ERROR and above always; the rest unless RLHF_VERBOSE)."""

    def __init__(self) -> None:
        super().__init__()
        self.path: Path | None = None
        self.diverted = 0  # errors: fail() then says where their tracebacks went

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and verbose():
            return True
        if record.levelno >= logging.ERROR:
            self.diverted += 1
        _append([logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
                 .format(record)])
        return False


_FILTER = _ToFile()


def divert_to(path: Path | None = None) -> None:
    """Records of Ray's loggers (ray, ray.data, ray.train) go to `path` (the run's
    run.log; before a run directory exists, a file in the temp folder) instead of the
    terminal. Idempotent; imports Ray Data, which sets its loggers' handlers."""
    importlib.import_module("ray.data")
    if path is not None:
        _FILTER.path = Path(path)
    for name in RAY_LOGGERS:
        for h in logging.getLogger(name).handlers:
            if (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                    and _FILTER not in h.filters):
                h.addFilter(_FILTER)


def route_worker_output() -> Callable[[], None]:
    """From now on, what Ray's workers print goes to the run's log, and only their lines
    marked by cluster.worker.say (the marker taken off) and the autoscaler's events
    reach this terminal. Returns the function that puts Ray's own printing back. Does
    nothing with RLHF_VERBOSE, or where this Ray does not print worker output here."""
    try:  # Ray's dispatcher of worker output to the driver (ray.init(log_to_driver=True))
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatch
    except ImportError:
        return lambda: None
    ray_print = dict(dispatch.handlers).get("ray_print_logs")
    if ray_print is None or verbose():
        return lambda: None

    shown: dict = {}  # (pid, line) -> when it was last shown

    def show(data: dict) -> None:
        if data.get("pid") == "autoscaler":  # nodes coming and going: the user's business
            ray_print(data)
            return
        lines = data.get("lines") or []
        source = data.get("actor_name") or data.get("task_name") or ""
        _append([f"({source} pid={data.get('pid')}) {line}" for line in lines])
        # A Ray Train worker's print arrives here twice, once as stdout and once as
        # stderr (seen with every RayTrainWorker line); the terminal shows the first to
        # arrive, run.log keeps both
        now, ours = time.monotonic(), []
        if len(shown) > 1000:  # only the last seconds matter: keep the memo small
            for key in [k for k, t in shown.items() if now - t > 5.0]:
                del shown[key]
        for line in lines:
            if line.startswith(SAY) and now - shown.get((data.get("pid"), line), -9.0) > 5.0:
                shown[(data.get("pid"), line)] = now
                ours.append(line[len(SAY):])
        if ours:
            stream = sys.stderr if data.get("is_err") else sys.stdout
            print("\n".join(redact_text(line) for line in ours), file=stream, flush=True)

    dispatch.remove_handler("ray_print_logs")
    dispatch.add_handler("ray_print_logs", show)

    def restore() -> None:
        dispatch.remove_handler("ray_print_logs")
        dispatch.add_handler("ray_print_logs", ray_print)

    return restore


def message(e: BaseException) -> str:
    """The user's message of an error: a DataError raised inside a Ray task arrives
    wrapped (its `cause`), with Ray's retry advice appended to its text."""
    inner = getattr(e, "cause", None)
    text = str(inner if isinstance(inner, ValueError) else e)
    for note in RAY_NOTES:
        text = text.split(note, 1)[0]
    return text.strip()


def fail(e: BaseException, prefix: str = "error: ") -> None:
    """Write e's traceback to the run's log, then print its message as the last line."""
    try:
        _append(["".join(traceback.format_exception(e))])
    except OSError:
        pass
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if _FILTER.diverted or getattr(e, "cause", None) is not None:  # it came through Ray
        print(f"(the traceback and Ray's error log: {log_path()})", file=sys.stderr)
    print(f"{prefix}{redact_text(message(e))}", file=sys.stderr, flush=True)
