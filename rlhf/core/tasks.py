"""Reward functions for the project's own online-RL tasks (and examples of the
`module:function` form rlhf.core.rewards loads: (prompts, responses, metadata) -> floats).

demo_opening: the embedded default's verifiable target. After the built-in SFT on the
demo's chosen answers the tiny model opens with one of four learned phrasings about as
often each; the reward is 1 for the answers that open with "Of course", so its mean
starts near 0.25 and a working RL loop drives it towards 1 within minutes, while the
answers stay fluent (the reference KL keeps them near the SFT model).
"""

from __future__ import annotations

from collections.abc import Sequence


def demo_opening(prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[dict]) -> list[float]:
    return [1.0 if r.strip().startswith("Of course") else 0.0 for r in responses]


# ------------------------------------------------------------------- environments
# For rlhf.ppo's rollout.environment (see rlhf/core/environments.py).

from rlhf.core.environments import Environment, Step, ToolEnvironment  # noqa: E402


class BoxLookupEnv(ToolEnvironment):
    """The tool demo (data.path=builtin:tools, rlhf.data.demo.tool_demo_row): the fruit in the
    box is the row's `answer`, shown only by the tool `open_box`. The final answer earns
    1 when it names that fruit and the tool was called first, else 0: the reward can only
    be earned through the tool (a guess earns nothing, however lucky). latency_s: each
    step waits that long, as a tool behind a network call would."""

    def __init__(self, latency_s: float = 0.0):
        super().__init__()
        self.latency_s = latency_s
        self.tools = {"open_box": self.open_box}
        self.answer = ""

    def reset(self, row: dict) -> None:
        self.answer = str(row["answer"])

    def open_box(self) -> str:
        return f"a {self.answer}"

    def score(self, answer: str) -> float:
        return 1.0 if self.calls and self.answer in answer else 0.0

    def step(self, text: str) -> Step:
        if self.latency_s:
            import time

            time.sleep(self.latency_s)
        return super().step(text)


class OpeningEnv(Environment):
    """`demo_opening` as a one-turn environment (rollout.max_turns=1) that takes
    latency_s to answer: the embedded default's task behind a slow scorer, for measuring
    what overlapping rollouts with training buys (bench/async_rollout.py)."""

    def __init__(self, latency_s: float = 0.2):
        self.latency_s = latency_s

    def step(self, text: str) -> Step:
        import time

        time.sleep(self.latency_s)
        return Step("", demo_opening([""], [text], [{}])[0], done=True)
