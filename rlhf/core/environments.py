"""Multi-turn environments and tools for online RL (rlhf.ppo with rollout.environment).

An environment is a Python class named as `module:Class` (rollout.environment), built
once per episode with rollout.env_args (a mapping) as keyword arguments:

    class MyEnv(rlhf.core.environments.Environment):
        def reset(self, row: dict) -> None: ...       # the prompt row: prompt + its columns
        def step(self, text: str) -> Step: ...        # after each model turn

`step` gets the text of the model's turn and returns Step(observation, reward, done):
the observation is the next message of the conversation (role "tool" by default: a tool
result, or "user"), the reward is this turn's, and done ends the episode. An episode also
ends at rollout.max_turns model turns or when the response budget is spent.

Token in, token out: the conversation is kept as token ids. The model's tokens are never
re-tokenised; an observation is rendered through the tokenizer's chat template exactly
as a message after the model's turn would be, and only the new text (the end of the
model's turn it did not write itself, the observation message, the next assistant
header) is tokenised and appended (`ChatCodec`). Observation tokens are masked out of
the loss and the KL (rlhf.core.rollouts.RolloutRecord.loss_mask).

Tools: `ToolEnvironment` parses tool calls from the model's turn and calls its tools.
The call format is the one the Hermes / Qwen chat templates use (and vLLM's `hermes`
parser reads), one or more of

    <tool_call>{"name": "lookup", "arguments": {"key": "value"}}</tool_call>

or, as Llama 3.1's JSON tool calling writes it, a turn that is a single JSON object
{"name": ..., "parameters": {...}}. A malformed call gets an error message back as the
observation (the model may try again); it never stops the run.

An environment that raises, hangs past rollout.env_timeout_s or returns something other
than a Step is reported with its name (`EnvironmentFailure`): the coordinator drops the
episode's prompt group and counts it (rollout.env_errors=skip) or stops the run (stop).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf.core.rewards import import_callable


@dataclass
class Step:
    """What an environment returns after a model turn."""

    observation: str = ""
    """The next message (empty: nothing is appended)."""
    reward: float = 0.0
    """This turn's reward (an episode's reward is the sum over its turns)."""
    done: bool = True
    """The episode ends here."""
    role: str = "tool"
    """The observation's chat role: tool (a tool's result) or user."""


class Environment:
    """Base class of an episode (see the module docstring); one instance per episode."""

    name = "environment"

    def reset(self, row: dict) -> None:
        """Called once before the first model turn with the prompt row: "prompt" and the
        row's other columns (e.g. the expected answer)."""

    def step(self, text: str) -> Step:
        raise NotImplementedError


class EnvironmentFailure(RuntimeError):
    """An environment raised, hung or returned a malformed step; the message names it."""

    def __init__(self, env: str, kind: str, detail: str):
        super().__init__(f"environment {env}: {kind}: {detail}")
        self.env, self.kind, self.detail = env, kind, detail


def load_environment(spec: str, args: dict | None = None) -> Callable[[], Environment]:
    """'module:Class' and its keyword arguments -> a factory of episodes."""
    cls = import_callable(spec, "rollout.environment", "class", "rlhf.core.tasks:BoxLookupEnv")
    kwargs = dict(args or {})

    def make() -> Environment:
        env = cls(**kwargs)
        if not getattr(env, "name", "") or env.name == Environment.name:
            env.name = spec
        return env

    return make


def checked_step(env_name: str, out: Any) -> Step:
    """The environment's return value, or EnvironmentFailure("malformed step")."""
    if not isinstance(out, Step):
        raise EnvironmentFailure(env_name, "malformed step",
                                 f"step() returned {type(out).__name__} {str(out)[:80]!r}; "
                                 "return rlhf.core.environments.Step(observation, reward, done)")
    if not isinstance(out.observation, str):
        raise EnvironmentFailure(env_name, "malformed step", "the observation must be a "
                                 f"string, got {type(out.observation).__name__}")
    try:
        reward = float(out.reward)
    except (TypeError, ValueError):
        raise EnvironmentFailure(env_name, "malformed step",
                                 f"reward {out.reward!r} is not a number") from None
    if not math.isfinite(reward):
        raise EnvironmentFailure(env_name, "malformed step", f"reward {reward}")
    if out.role not in ("tool", "user"):
        raise EnvironmentFailure(env_name, "malformed step",
                                 f"observation role {out.role!r}: tool or user")
    return Step(out.observation, reward, bool(out.done), out.role)


def call_all(calls: list[tuple[str, Callable[[], Any]]], timeout_s: float
             ) -> list[tuple[bool, Any]]:
    """Run the calls concurrently, each in a thread of its own, all under one deadline:
    [(True, result) | (False, EnvironmentFailure)] in order. A call past the deadline
    is abandoned (Python cannot stop a thread: it keeps running in the background, as
    a daemon, and nothing waits for it). `calls`: (environment name, call)."""
    import time

    boxes: list[dict] = [{} for _ in calls]

    def run(box: dict, fn: Callable[[], Any]) -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported with the environment's name
            box["error"] = e

    threads = []
    for box, (_, fn) in zip(boxes, calls):
        t = threading.Thread(target=run, args=(box, fn), daemon=True)
        t.start()
        threads.append(t)
    deadline = time.monotonic() + timeout_s
    out: list[tuple[bool, Any]] = []
    for (name, _), box, t in zip(calls, boxes, threads):
        t.join(max(deadline - time.monotonic(), 0.0))
        if t.is_alive():
            out.append((False, EnvironmentFailure(
                name, "timeout", f"no answer within rollout.env_timeout_s={timeout_s:g} s")))
        elif "error" in box:
            e = box["error"]
            failure = e if isinstance(e, EnvironmentFailure) else EnvironmentFailure(
                name, "raised", f"{type(e).__name__}: {e}")
            out.append((False, failure))
        else:
            out.append((True, box.get("value")))
    return out


# ------------------------------------------------------------------------------ tools


@dataclass
class ToolCall:
    name: str
    arguments: dict


class ToolCallError(ValueError):
    """A tool call the model wrote that cannot be parsed; the message says why."""


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The tool calls in a model turn (see the module docstring for the formats); [] for
    a turn without any. Raises ToolCallError for a call that is there but malformed."""
    calls = []
    for m in _TOOL_CALL.finditer(text):
        calls.append(_tool_call(m.group(1)))
    if text.count("<tool_call>") > len(calls):
        raise ToolCallError("a <tool_call> is not closed by </tool_call>")
    if not calls:
        body = text.strip()
        if body.startswith("{") and body.endswith("}"):
            try:
                obj = json.loads(body)
            except json.JSONDecodeError:
                return []
            if isinstance(obj, dict) and "name" in obj and (
                    "parameters" in obj or "arguments" in obj):
                calls.append(_tool_call(body))
    return calls


def _tool_call(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise ToolCallError(f"the call is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ToolCallError('the call needs a "name" (a string)')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ToolCallError("the arguments are not a JSON object") from None
    if not isinstance(args, dict):
        raise ToolCallError("the arguments must be a JSON object")
    return ToolCall(obj["name"], args)


class ToolEnvironment(Environment):
    """An episode in which the model may call tools before it answers.

    Subclasses set `tools` ({name: function(**arguments) -> str}) and implement
    `score(answer)`: the reward of the final turn (the first turn without a tool call).
    Each tool turn earns `call_reward` (0 by default), a malformed or unknown call
    `error_reward`, and gets the results (or the error) back as a tool message."""

    tools: dict[str, Callable[..., str]] = {}
    call_reward = 0.0
    error_reward = 0.0

    def __init__(self):
        self.calls = 0

    def score(self, answer: str) -> float:
        raise NotImplementedError

    def step(self, text: str) -> Step:
        try:
            calls = parse_tool_calls(text)
        except ToolCallError as e:
            return Step(f"error: {e}", self.error_reward, done=False)
        if not calls:
            return Step("", self.score(text), done=True)
        results = []
        reward = self.call_reward
        for call in calls:
            fn = self.tools.get(call.name)
            if fn is None:
                results.append(f"error: no tool named {call.name!r} (tools: "
                               f"{', '.join(self.tools)})")
                reward = self.error_reward
                continue
            self.calls += 1
            try:
                results.append(str(fn(**call.arguments)))
            except TypeError as e:  # wrong arguments: the model's mistake, told to it
                results.append(f"error: {e}")
                reward = self.error_reward
        return Step("\n".join(results), reward, done=False)


# --------------------------------------------------------- token in, token out (chat)

_PROBE = "\x00RLHF-PROBE\x00"


class ChatCodec:
    """Appends observations to a conversation kept as token ids, through the tokenizer's
    chat template, without re-tokenising what is already there.

    From a probe conversation it learns the text that closes an assistant turn (e.g.
    "<|end|>\\n", "<|im_end|>\\n", "<|eot_id|>") and the special tokens in it, which
    end a model turn (`stop_ids`, given to the engine). `observation_ids(turn_ids,
    role, content)` renders [probe..., assistant turn, observation] with the
    generation prompt and returns the tokens of what follows the model's turn: the part
    of the closing the model did not write itself, the observation message and the
    next assistant header."""

    def __init__(self, tok):
        if not getattr(tok, "chat_template", None):
            raise ValueError("multi-turn environments need a tokenizer with a chat template "
                             "(chat prompts: messages): this one has none")
        self.tok = tok
        self.base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}]
        text = tok.apply_chat_template(self.base, tokenize=False)
        if _PROBE not in text:
            raise ValueError("the chat template does not render an assistant message's "
                             "content as it is; multi-turn token-in-token-out needs one that "
                             "does")
        self.base_text = text
        self.closing = text[text.index(_PROBE) + len(_PROBE):]
        ids = tok(self.closing, add_special_tokens=False)["input_ids"] if self.closing else []
        # the tokenizer's special tokens: the named ones and every added token marked
        # special (chat role and end-of-turn tokens usually are only the latter)
        special = set(tok.all_special_ids) | {
            i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special}
        self.stop_ids = sorted({i for i in ids if i in special} | (
            {tok.eos_token_id} if tok.eos_token_id is not None else set()))

    def observation_ids(self, turn_ids: list[int], role: str, content: str) -> list[int]:
        after = self.tok.apply_chat_template(
            self.base + [{"role": role, "content": content}], tokenize=False,
            add_generation_prompt=True)
        if not after.startswith(self.base_text):
            raise ValueError("the chat template renders earlier turns differently once a "
                             "message follows them (it rewrites history, e.g. strips "
                             "reasoning); token-in-token-out multi-turn needs a template "
                             "that only appends")
        tail = after[len(self.base_text):]
        written = self.tok.decode(turn_ids[-8:], skip_special_tokens=False)
        k = next((k for k in range(len(self.closing), 0, -1)
                  if written.endswith(self.closing[:k])), 0)
        return self.tok(self.closing[k:] + tail, add_special_tokens=False)["input_ids"]
