"""The reward section (reward.functions, reward.models, reward.judge, reward.remote_url,
reward.gold) made into one `rlhf.core.rewards.Rewards`, wherever the scorers run: served
pools for rlhf.ppo's rollouts (rlhf/online/episodes.py), models held in process by
rlhf.sample's scoring actors (cluster/sample_stages.py). Both score the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rlhf.core.reward_ensemble import ModelEnsemble
from rlhf.core.rewards import RewardError, Rewards, RewardSource, function_source, reward_spec
from rlhf.online.remote_reward import RemoteReward

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]  # (prompts, responses)


def build_rewards(rw, model_scores: Sequence[Scorer], gold_model: Scorer | None = None
                  ) -> tuple[Rewards, RemoteReward | None]:
    """(the Rewards of config section `rw`, its remote endpoint's client or None).
    model_scores: one scorer per reward model, in reward.models' order (or reward.model);
    gold_model: reward.gold's scorer when it is a reward model (a function is loaded
    here)."""
    models = (ModelEnsemble([f"rm{i}" for i in range(len(model_scores))], list(model_scores),
                            rw.ensemble, rw.ensemble_coef, rw.served()[1])
              if model_scores else None)
    sources = [function_source(*reward_spec(s)) for s in rw.functions]
    remote = None
    if rw.remote_url:
        remote = RemoteReward(rw.remote_url, batch_size=rw.remote_batch_size,
                              timeout_s=rw.timeout_s, auth_env=rw.remote_auth_env,
                              errors=rw.remote_errors)
        sources.append(RewardSource("remote", rw.remote_weight, remote))
    gold = None
    if gold_model is not None:
        gold = lambda p, r, m: gold_model(p, r)  # noqa: E731
    elif rw.gold:
        gold = function_source(rw.gold).score
    return Rewards(sources, models, rw.aggregation, gold), remote


def judge_scores(judge: Callable[[Sequence[str], Sequence[tuple[str, str]]], list[float]],
                 baseline_column: str, texts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[dict], groups: Sequence[int], samples: Sequence[int]
                 ) -> list[float]:
    """reward.judge's P(response better than its baseline): the prompt's
    reward.judge_baseline column, or its first sample (which then scores 0.5).
    groups: each response's prompt; samples: its index among the prompt's samples."""
    first: dict[int, str] = {}
    for g, _, r in sorted(zip(groups, samples, responses)):  # each prompt's lowest sample
        first.setdefault(g, r)
    col = baseline_column
    if col and any(col not in m for m in metadata):
        raise RewardError(f"reward.judge_baseline={col}: the prompts have no such column "
                          f"(they have {sorted(metadata[0])}); name one, or leave it empty "
                          "to compare each sample with its prompt's first.")
    base = [str(m[col]) for m in metadata] if col else [first[g] for g in groups]
    return judge(texts, list(zip(responses, base)))
