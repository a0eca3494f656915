"""Reward functions for the project's own online-RL tasks (and examples of the
`module:function` form rlhf.rewards loads: (prompts, responses, metadata) -> floats).

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
