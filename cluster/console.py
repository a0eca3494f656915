"""What reaches the terminal when something is wrong: one clear message, printed last.

Ray logs a failed data task's traceback at ERROR on the console (Ray Data twice, ~170
lines for one malformed JSON line) before the exception reaches the driver, and appends
its retry advice to the exception's text. Entry points divert ERROR records of Ray's
loggers to the run's `errors.log` (`divert_errors_to`), and `fail` writes the traceback
there and prints the message alone, as the last line.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import traceback
from pathlib import Path

from cluster.trackers import redact_text

LOG_NAME = "errors.log"
# Ray Data appends these to a task's exception text; they are advice about Ray's
# retries, not about the input.
RAY_NOTES = ("\nFailed to read stream iteratively", "\nFailed to apply UDF transform",
             "\nTo change retry attempts")


class _ToFile(logging.Filter):
    """On the console handlers of Ray's loggers: ERROR and above go to a file instead."""

    def __init__(self) -> None:
        super().__init__()
        self.path: Path | None = None
        self.diverted = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.diverted += 1
        with open(self.path or _fallback(), "a") as f:
            f.write(redact_text(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                                  "%(message)s").format(record)) + "\n")
        return False


_FILTER = _ToFile()


def _fallback() -> Path:
    return Path(tempfile.gettempdir()) / f"rlhf-{LOG_NAME}"


def divert_errors_to(path: Path | None = None) -> None:
    """ERROR records of Ray's loggers (ray, ray.data, ray.train) go to `path` (the run's
    errors.log; before a run directory exists, a file in the temp folder) instead of
    the terminal. Idempotent; call after Ray Data is imported (it sets its handlers)."""
    import importlib

    importlib.import_module("ray.data")  # sets up the ray.data logger's handlers

    if path is not None:
        _FILTER.path = Path(path)
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        for h in logging.getLogger(name).handlers:
            if (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                    and _FILTER not in h.filters):
                h.addFilter(_FILTER)


def message(e: BaseException) -> str:
    """The user's message of an error: a DataError raised inside a Ray task arrives
    wrapped (its `cause`), with Ray's retry advice appended to its text."""
    inner = getattr(e, "cause", None)
    text = str(inner if isinstance(inner, ValueError) else e)
    for note in RAY_NOTES:
        text = text.split(note, 1)[0]
    return text.strip()


def fail(e: BaseException, prefix: str = "error: ") -> None:
    """Write e's traceback to the error log, then print its message as the last line."""
    path = _FILTER.path or _fallback()
    try:
        with open(path, "a") as f:
            f.write(redact_text("".join(traceback.format_exception(e))) + "\n")
    except OSError:
        pass
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if _FILTER.diverted or getattr(e, "cause", None) is not None:  # it came through Ray
        print(f"(the traceback and Ray's error log: {path})", file=sys.stderr)
    print(f"{prefix}{redact_text(message(e))}", file=sys.stderr, flush=True)
