"""Reward scoring as a Ray actor, for the stages that score from Ray (PPO, evaluation).

    scorer = reward_actor("runs/rm-.../model", num_gpus=1)
    scores = ray.get(scorer.score.remote(prompts, responses))

The actor is rlhf.scoring.RewardScorer itself, placed with its own CPU/GPU request.
"""

from __future__ import annotations


def reward_actor(path: str, *, num_cpus: float = 1, num_gpus: float = 0, **scorer_kwargs):
    """A started Ray actor holding the reward model at `path` (an rlhf.rm export)."""
    import ray

    from rlhf.scoring import RewardScorer

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(RewardScorer).remote(
        path, **scorer_kwargs)
