"""Reward scoring from Ray: as an actor of its own (evaluation), or as a frozen DeepSpeed
engine inside the training workers (PPO).

    scorer = reward_actor("runs/rm-.../model", num_gpus=1)
    scores = ray.get(scorer.score.remote(prompts, responses))

The actor is rlhf.scoring.RewardScorer itself, placed with its own CPU/GPU request.
"""

from __future__ import annotations

from typing import Any


def reward_actor(path: str, *, num_cpus: float = 1, num_gpus: float = 0, **scorer_kwargs):
    """A started Ray actor holding the reward model at `path` (an rlhf.rm export)."""
    import ray

    from rlhf.scoring import RewardScorer

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(RewardScorer).remote(
        path, **scorer_kwargs)


def sharded_scorer(path: str, ds_config: dict[str, Any], dtype: str):
    """The reward model at `path` as a frozen DeepSpeed engine (ZeRO-3 sharded across the
    training workers and/or offloaded to CPU, as ds_config says), behind RewardScorer's
    tokenisation and score(). It scores a whole call in one forward, so that ZeRO-3
    ranks gather in step: every rank calls score() (or, with nothing to score,
    dummy_forward()) the same number of times."""
    from cluster.deepspeed import frozen_engine
    from rlhf.scoring import RewardScorer

    scorer = RewardScorer(path, dtype=dtype, device="cpu", batch_size=None)
    scorer.model = frozen_engine(scorer.model, ds_config)
    scorer.device = str(scorer.model.device)
    return scorer
