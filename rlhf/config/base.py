"""What every config module shares: the built-in names and ConfigError."""

from __future__ import annotations

from typing import Any


BUILTIN_MODEL = "builtin:tiny-llama"


BUILTIN_DATA = "builtin:demo"


BUILTIN_TOOLS = "builtin:tools"  # the tool demo (rlhf.data.demo.tool_demo_row)


class ConfigError(ValueError):
    """A config value or combination is wrong; the message says what to change."""


def one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}.")

