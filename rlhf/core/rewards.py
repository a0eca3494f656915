"""Rewards for online RL (rlhf.ppo): Python functions named `module:function`
(verifiable rewards), reward models exported by rlhf.rm, or a weighted sum of several;
then clipping and normalisation.

A reward function is called once per batch:

    def my_reward(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]

metadata holds each prompt row's other columns (e.g. the expected answer). Whatever
goes wrong inside or with its result stops the run with an error naming the function:
an exception, a result of the wrong length or type, a NaN or infinite value.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch comes with it; this module's users may not need it
    from rlhf.core.reward_ensemble import ModelEnsemble


class RewardError(ValueError):
    """A reward source is unusable; the message names it and what to fix."""


def import_callable(spec: str, what: str, kind: str, example: str,
                    error: type[Exception] = ValueError) -> Callable:
    """'package.module:name' -> that callable (the module must be importable on every
    node: part of the project, installed, or in the job's working directory). `what`
    names the setting in messages, `kind` the callable (function, class)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"{what} {spec!r}: write it as module:{kind}, e.g. {example}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise error(f"{what} {spec}: cannot import {module_name!r} ({e}). Put the module "
                    "in the working directory that `ray job submit --working-dir` ships, "
                    "or install it on every node.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise error(f"{what} {spec}: {module_name} has no {kind} {attr!r}.")
    return fn


def load_function(spec: str) -> Callable:
    """'package.module:function' -> the reward function."""
    return import_callable(spec, "reward function", "function", "rlhf.core.tasks:count_reward",
                           RewardError)


def call_function(fn: Callable, name: str, prompts: Sequence[str], responses: Sequence[str],
                  metadata: Sequence[dict]) -> list[float]:
    """fn's rewards for a batch, checked: one finite number per response."""
    try:
        out = fn(list(prompts), list(responses), list(metadata))
    except Exception as e:
        raise RewardError(f"reward function {name} raised {type(e).__name__}: {e}") from e
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise RewardError(f"reward function {name} returned {type(out).__name__} "
                          f"{str(out)[:80]!r}; it must return one number per response."
                          ) from None
    if len(values) != len(responses):
        raise RewardError(f"reward function {name} returned {len(values)} rewards for "
                          f"{len(responses)} responses; it must return one per response.")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RewardError(
            f"reward function {name} returned {values[bad[0]]} for response {bad[0]} "
            f"({len(bad)} non-finite in all), e.g. for {str(responses[bad[0]])[:80]!r}.")
    return values


@dataclass
class RewardSource:
    """One term of the reward: `weight` x a function's or a reward model's score."""

    name: str
    weight: float
    score: Callable[[Sequence[str], Sequence[str], Sequence[dict]], list[float]]


def function_source(spec: str, weight: float = 1.0) -> RewardSource:
    fn = load_function(spec)
    return RewardSource(spec, weight, lambda p, r, m: call_function(fn, spec, p, r, m))


@dataclass
class Rewards:
    """The sources made one reward per response (their weighted sum, or each normalised
    within its group first: `aggregation`, rlhf.core.reward_ensemble.aggregate), and each
    source's own scores (for the per-step report). `models`: reward models combined into
    one source (rlhf.core.reward_ensemble.ModelEnsemble: each model's scores, the
    combined score and the models' disagreement among the parts). `gold`: a reward kept
    out of the sum, scored for the reward-hacking monitor (parts["gold"])."""

    sources: list[RewardSource] = field(default_factory=list)
    models: ModelEnsemble | None = None
    aggregation: str = "sum_then_normalise"
    gold: Callable[[Sequence[str], Sequence[str], Sequence[dict]], list[float]] | None = None

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[dict] | None = None, groups: Sequence[int] | None = None,
                 extra: Sequence[tuple[str, float, list[float]]] = ()
                 ) -> tuple[list[float], dict]:
        """(B rewards, {source name: its B scores}). groups: each response's prompt (for
        normalise_then_sum); extra: sources scored elsewhere, as (name, weight, scores)
        (the environment's turn rewards). A source may give NaN for a response it could
        not score (a remote endpoint's skipped batch): that response's reward is NaN."""
        import torch

        from rlhf.core.reward_ensemble import aggregate

        metadata = metadata if metadata is not None else [{} for _ in prompts]
        terms: list[tuple[str, float, list[float]]] = []
        parts: dict[str, list[float]] = {}
        for s in self.sources:
            terms.append((s.name, s.weight, s.score(prompts, responses, metadata)))
        terms += list(extra)
        if self.models is not None and responses:
            combined, model_parts = self.models(prompts, responses)
            terms.append(("ensemble", self.models.weight, combined))
            parts.update(model_parts)
        for name, _, scores in terms:
            parts[name] = scores
        if self.gold is not None and responses:
            parts["gold"] = self.gold(prompts, responses, metadata)
        if not terms or not responses:
            return [0.0] * len(responses), parts
        table = torch.tensor([list(map(float, sc)) for _, _, sc in terms], dtype=torch.float64)
        total = aggregate(table, [w for _, w, _ in terms], self.aggregation, groups)
        return total.tolist(), parts


def shape_scores(scores, clip: float | None = None, normalise: bool = False,
                 eps: float = 1e-8):
    """(B,) tensor of scores -> clipped to [-clip, clip] and/or normalised to zero mean and
    unit (unbiased) variance over the batch."""
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    if normalise and scores.numel() > 1:
        scores = (scores - scores.mean()) / (scores.std() + eps)
    return scores


def reward_spec(spec: str) -> tuple[str, float]:
    """'module:function' or 'module:function=weight' -> (function spec, weight)."""
    name, _, weight = spec.partition("=")
    return name.strip(), float(weight) if weight else 1.0
