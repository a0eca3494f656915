"""The typed rollout record that the rollout side (rlhf/online/coordinator.py) hands to the
training workers (rlhf/online/task.py), and the pure functions over records (torch only).

A record is one sampled response: a single model turn, or a multi-turn episode in which
observation tokens (tool results, environment messages) sit between the model's turns.
Every per-token list has the response's length T, in order, so position t of each
describes token t:

    prompt_ids      (L,)  the prompt as the engine saw it
    response_ids    (T,)  model tokens and observation tokens, as generated and appended
                          (token in, token out: nothing the model wrote is re-tokenised)
    logprobs        (T,)  behaviour log-probs: the engine's log-prob of each model token
                          when it was sampled (after temperature and top-p); 0.0 on
                          observation tokens
    versions        (T,)  the weights version that sampled each model token; -1 on
                          observation tokens. A partial rollout (one interrupted by a
                          weight update and continued under the new weights) holds two
                          or more versions
    loss_mask       (T,)  1 on model tokens (trained, in the KL), 0 on observation tokens
                          and on tokens left out (e.g. an over-long response filtered)

The staleness of a record, at a training step whose policy is version v (step s trains
the weights of version s - 1), is v minus the oldest version that sampled any of its
tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

OBSERVATION = -1  # the version tag of a token the model did not write


@dataclass
class RolloutRecord:
    """One response (single- or multi-turn) as the trainers consume it; see the module
    docstring for the per-token fields' shapes."""

    group: int
    """The prompt row's id: GRPO's and RLOO's group (the n samples of one prompt)."""
    sample: int
    """Which of the prompt's samples this is (0 .. n - 1)."""
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    loss_mask: list[int]
    score: float = 0.0
    """Reward known on the rollout side: reward functions, served reward models
    (reward.models), environment rewards, length shaping (reward.model's score is added
    by the trainers)."""
    parts: dict[str, float] = field(default_factory=dict)
    """Each rollout-side reward source's own unweighted score."""
    turn_rewards: list[float] = field(default_factory=list)
    """The environment's reward after each model turn (part of `score`)."""
    turn_ends: list[int] = field(default_factory=list)
    """Index in response_ids of each model turn's last token (len(turn_rewards) of them):
    where token-level algorithms (ppo, reinforce++) place each turn's reward."""
    finish_reason: str = "stop"
    """stop (end of turn), length (cut at the token budget), done (the environment
    ended the episode) or max_turns."""
    tool_calls: int = 0
    """Tool calls the environment recognised in the model's turns."""
    epoch: int = 0
    metadata: str = "{}"
    """The prompt row's other columns (JSON), as reward functions receive them."""
    role: str = ""
    """algo.algorithm=online_dpo: "chosen" or "rejected"; a group's records then come as
    consecutive (chosen, rejected) pairs, a sample in several pairs repeated."""

    def __post_init__(self) -> None:
        t = len(self.response_ids)
        if not (len(self.logprobs) == len(self.versions) == len(self.loss_mask) == t):
            raise ValueError(
                f"rollout record {self.group}/{self.sample}: response_ids, logprobs, "
                f"versions and loss_mask must have one entry per token ({t}, "
                f"{len(self.logprobs)}, {len(self.versions)}, {len(self.loss_mask)})")

    @property
    def model_versions(self) -> list[int]:
        """The distinct versions that sampled this record's tokens, oldest first."""
        return sorted({v for v in self.versions if v != OBSERVATION})

    def oldest_version(self) -> int:
        vs = self.model_versions
        return vs[0] if vs else 0

    def staleness(self, policy_version: int) -> int:
        return policy_version - self.oldest_version()

    @property
    def partial(self) -> bool:
        """Sampled under more than one weights version (a partial rollout)."""
        return len(self.model_versions) > 1

    @property
    def turns(self) -> int:
        return max(len(self.turn_ends), 1)


def record_tables(records: list[RolloutRecord], width: int | None = None
                  ) -> dict[str, torch.Tensor]:
    """Per-token fields as right-padded (S, T) tables, T = width or the longest response:
    "behaviour" (float32 log-probs), "loss_mask" (float32), "versions" (int64, -1 on
    observation tokens and padding), "turn_rewards" (float32: each turn's reward at its
    last token, 0 elsewhere); and "scores" (S,) float32."""
    t = width if width is not None else max((len(r.response_ids) for r in records), default=0)
    s = len(records)
    behaviour = torch.zeros(s, t)
    mask = torch.zeros(s, t)
    versions = torch.full((s, t), OBSERVATION, dtype=torch.int64)
    turn = torch.zeros(s, t)
    for i, r in enumerate(records):
        n = len(r.response_ids)
        behaviour[i, :n] = torch.tensor(r.logprobs, dtype=torch.float32)
        mask[i, :n] = torch.tensor(r.loss_mask, dtype=torch.float32)
        versions[i, :n] = torch.tensor(r.versions, dtype=torch.int64)
        for at, reward in zip(r.turn_ends, r.turn_rewards):
            turn[i, at] += reward
    scores = torch.tensor([r.score for r in records], dtype=torch.float32)
    return {"behaviour": behaviour, "loss_mask": mask, "versions": versions,
            "turn_rewards": turn, "scores": scores}


def staleness_counts(records: list[RolloutRecord], policy_version: int) -> dict[int, int]:
    """{staleness: number of records} at a step whose policy is `policy_version`."""
    out: dict[int, int] = {}
    for r in records:
        k = r.staleness(policy_version)
        out[k] = out.get(k, 0) + 1
    return out


def split_stale(records: list[RolloutRecord], policy_version: int, max_staleness: int
                ) -> tuple[list[RolloutRecord], list[RolloutRecord]]:
    """(records within the bound, records older than max_staleness versions). A stale
    record takes its whole group with it: GRPO and RLOO compare a prompt's samples with
    each other, and a group missing some of them would compare the rest unfairly."""
    stale_groups = {r.group for r in records if r.staleness(policy_version) > max_staleness}
    keep = [r for r in records if r.group not in stale_groups]
    drop = [r for r in records if r.group in stale_groups]
    return keep, drop


def digest(records: list[RolloutRecord]) -> str:
    """16 hex digits identifying exactly these samples (group, sample, every token and
    its version, in order): equal digests mean the same samples were trained."""
    h = hashlib.blake2b(digest_size=8)
    for r in sorted(records, key=lambda r: (r.group, r.sample)):
        h.update(repr((r.group, r.sample, r.response_ids, r.versions)).encode())
    return h.hexdigest()
