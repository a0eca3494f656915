"""Secrets taken out of everything a run writes or prints: configs, summaries, messages,
the model card's command line, the error log and every tracker.

    redact({"hub_token": "hf_abc", "data": {"path": "s3://k:s@bucket/x"}})
    # {"hub_token": "***", "data": {"path": "s3://***@bucket/x"}}

What looks like one: the values of keys named like a token, API key, secret or
password; URL userinfo (https://user:pass@host); secret-named URL query parameters; the
values of this process's secret-named environment variables.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***"

_SECRET_NAME = re.compile(
    r"(?:^|_)(?:token|secret|password|passwd|passphrase|pwd|credentials?|auth|"
    r"authorization|api_?key|apikey|private_?key|access_?key|signature)(?:_|$)")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@?#]+@")
_QUERY_PARAM = re.compile(r"([?&;])([^=&#\s]+)=([^&#\s]*)")
_MIN_ENV_SECRET = 8  # shorter values are not replaced in text (they would mangle it)


def secret_name(name: str) -> bool:
    """Whether a key or variable name says its value is a secret: a word of it (split at
    `_`, `-`, `.`, and camelCase) is token, secret, password, api_key, ... (max_new_tokens
    and tokenizer are not)."""
    snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()
    return bool(_SECRET_NAME.search("_".join(re.split(r"[^a-z0-9]+", snake))))


def _env_secrets() -> list[str]:
    vals = {v for k, v in os.environ.items() if secret_name(k) and len(v) >= _MIN_ENV_SECRET}
    return sorted(vals, key=len, reverse=True)


def redact_text(text: str) -> str:
    """`text` with URL userinfo (scheme://user:pass@host), the values of secret-named
    URL query parameters (?token=..., X-Amz-Signature=...) and the values of secret-named
    environment variables of this process replaced by ***."""
    if not text:
        return text
    text = _URL_USERINFO.sub(rf"\1{REDACTED}@", text)

    def param(m: re.Match) -> str:
        name = m.group(2)
        if secret_name(name) or name.lower() in ("key", "sig"):
            return f"{m.group(1)}{name}={REDACTED}"
        return m.group(0)

    if "=" in text:
        text = _QUERY_PARAM.sub(param, text)
    for value in _env_secrets():
        text = text.replace(value, REDACTED)
    return text


def redact(obj: Any) -> Any:
    """A copy of a config or summary tree (dicts, lists, strings, numbers) without
    secrets: the string values of secret-named keys become ***, every other string goes
    through redact_text."""
    if isinstance(obj, dict):
        return {k: (REDACTED if secret_name(str(k)) and isinstance(v, str) and v
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj
