"""A reward served over HTTP (reward.remote_url): a judge, a verifier or a reward model
someone else runs. One POST per batch of samples, batches in flight at once:

    request   {"prompts": [str, ...], "responses": [str, ...], "metadata": [{...}, ...]}
    response  {"scores": [float, ...]}          one finite number per response, in order

    remote = RemoteReward("http://127.0.0.1:8000/score", batch_size=32, timeout_s=60)
    scores = remote(prompts, responses, metadata)   # NaN where a batch was skipped
    remote.stats                                    # requests, retried, malformed, skipped

A batch that gets no answer in timeout_s, a connection error or an HTTP 5xx/429 is sent
again (twice, after 0.5 s and 1 s); an HTTP 4xx other than 429 (a wrong URL, a refused
token) stops the run at once. An answer that is not the JSON above ("malformed"), or a
batch whose tries are spent, is skipped (its responses score NaN: the coordinator drops
their prompts' groups, counted) or, with errors="stop", stops the run with what the
endpoint answered. The token comes from the environment (auth_env) and goes out as
"Authorization: Bearer <token>"; messages name the URL with its credentials redacted.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from rlhf.core.rewards import RewardError
from rlhf.runlog.redact import redact_text


class _Skip(Exception):
    """A batch given up on (malformed answer or tries spent); the message says why."""


class RemoteReward:
    """Scores from an HTTP endpoint (see the module docstring)."""

    def __init__(self, url: str, *, batch_size: int = 32, timeout_s: float = 60.0,
                 retries: int = 2, auth_env: str = "RLHF_REWARD_TOKEN",
                 errors: str = "skip", concurrency: int = 4):
        self.url, self.batch_size, self.timeout_s = url, batch_size, timeout_s
        self.retries, self.auth_env, self.errors = retries, auth_env, errors
        self.concurrency = concurrency
        self.name = redact_text(url)
        self.stats: Counter = Counter()
        self._lock = threading.Lock()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[dict] | None = None) -> list[float]:
        """One score per response, in order; NaN for the responses of a skipped batch."""
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        starts = list(range(0, len(responses), self.batch_size))
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(starts)))) as ex:
            got = list(ex.map(lambda at: self._batch(
                list(prompts[at:at + self.batch_size]), list(responses[at:at + self.batch_size]),
                metadata[at:at + self.batch_size]), starts))
        return [v for batch in got for v in batch]

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _batch(self, prompts: list, responses: list, metadata: list) -> list[float]:
        try:
            return self._post(prompts, responses, metadata)
        except _Skip as e:
            if self.errors == "stop":
                raise RewardError(f"reward endpoint {self.name}: {e}. With "
                                  "reward.remote_errors=skip such batches are dropped "
                                  "(counted) instead of stopping the run.") from None
            self._count("skipped")
            self._count("skipped_samples", len(responses))
            return [math.nan] * len(responses)

    def _post(self, prompts: list, responses: list, metadata: list) -> list[float]:
        body = json.dumps({"prompts": prompts, "responses": responses,
                           "metadata": metadata}).encode()
        headers = {"Content-Type": "application/json"}
        token = os.environ.get(self.auth_env, "") if self.auth_env else ""
        if token:
            headers["Authorization"] = f"Bearer {token}"
        why = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retried")
                time.sleep(0.5 * 2 ** (attempt - 1))
            self._count("requests")
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as answer:
                    raw = answer.read()
            except urllib.error.HTTPError as e:
                if e.code != 429 and 400 <= e.code < 500:
                    raise RewardError(
                        f"reward endpoint {self.name} answered HTTP {e.code} {e.reason}: "
                        + ("check the token in $" + self.auth_env if e.code in (401, 403)
                           else "check reward.remote_url") + ".") from None
                why = f"HTTP {e.code} {e.reason}"
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                why = (f"no answer in {self.timeout_s:g} s" if isinstance(reason, TimeoutError)
                       or "timed out" in str(reason) else f"{type(reason).__name__}: {reason}")
                self._count("timeouts" if why.startswith("no answer") else "errors")
                continue
            return self._parse(raw, len(responses))
        raise _Skip(f"a batch of {len(responses)} failed {self.retries + 1} times ({why}); if "
                    "the endpoint is only slow, raise reward.timeout_s")

    def _parse(self, raw: bytes, n: int) -> list[float]:
        """{"scores": [n finite numbers]} -> the floats; _Skip naming what is wrong."""
        shown = raw[:120].decode(errors="replace")
        try:
            scores = json.loads(raw)["scores"]
            values = [float(v) for v in scores]
        except (ValueError, KeyError, TypeError):
            self._count("malformed")
            raise _Skip(f"answered {shown!r}, not {{\"scores\": [one number per response]}}"
                        ) from None
        if len(values) != n or not all(math.isfinite(v) for v in values):
            self._count("malformed")
            raise _Skip(f"answered {len(values)} scores for {n} responses"
                        + ("" if len(values) != n else " with a non-finite one")
                        + f" ({shown!r})")
        return values
