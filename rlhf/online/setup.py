"""What an online run starts beside its trainers, and stops after them: the environment
checked, the vLLM engine actors, the weight-sync path, the critic's starting model, the
rollout coordinator.

    online = OnlineRun(cfg)                       # rlhf.ppo
    run_training(cfg, RLTask, setup=online.setup, extra_cpus=online.cpus, ...)
    online.close()                                # the coordinator, the shared memory
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

from cluster.models import is_reward_model, load_tokenizer, resolve_model_path
from cluster.ray_cluster import root_cause
from cluster.reward_service import ServedJudge, ServedScorer, start_reward_pool
from cluster.vllm_engines import VLLM_DTYPES, RolloutSettings, rollout_actor
from cluster.weight_sync import shm_dir, weight_store
from rlhf.config import ConfigError, PPOConfig
from rlhf.config.ppo import is_function
from rlhf.core.environments import load_environment
from rlhf.data.pipeline import DataError
from rlhf.online.coordinator import coordinator_actor


class OnlineRun:
    """The pieces of one online run outside Ray Train (see the module docstring)."""

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.sync = weight_sync_path(cfg)
        self.weights_dir = shm_dir(f"{os.getpid()}-{int(time.time())}")
        self.coordinator = None
        self.reward_pools: list = []
        self.gold_pool = self.judge_pool = None
        r, rw = cfg.rollout, cfg.reward
        # for a local Ray this run starts: the engines and the served reward models
        served = rw.served_replicas()
        self.cpus = r.engines * r.cpus_per_engine + served * rw.cpus_per_replica

    def setup(self, model_path: str, plan, pipes, total_steps: int, run_dir: Path) -> dict:
        """rlhf.train.driver.run_training's setup: after the pipelines, before training;
        returns what joins the workers' loop config."""
        cfg, r = self.cfg, self.cfg.rollout
        check_environment(cfg)
        if r.max_turns > 1 and not plan.train_layout.chat:
            raise DataError("rollout.max_turns > 1: a multi-turn episode is a conversation, "
                            "so the prompts must be chat messages (a list of {role, content} "
                            "in the prompt column) and the tokenizer needs a chat template.")
        engines = start_engines(cfg, model_path)
        self.reward_pools, self.gold_pool, self.judge_pool = start_reward_models(cfg)
        store = weight_store() if self.sync == "store" else None
        self.coordinator = coordinator_actor(cfg, engines, self.sync, str(self.weights_dir),
                                             store, pipes.train, model_path, str(run_dir),
                                             total_steps, self.reward_pools, self.gold_pool,
                                             self.judge_pool)
        print(f"starting {len(engines)} vLLM engine(s) ({r.placement}); weights reach them "
              f"through {self.sync}; rollouts at most {r.max_staleness} version(s) behind "
              "the policy", flush=True)
        return {"engines": engines, "coordinator": self.coordinator,
                "weights_dir": str(self.weights_dir), "sync": self.sync, "store": store,
                "critic_path": critic_path(cfg, model_path)}

    def close(self) -> None:
        """The coordinator stopped (best effort: the run is over either way) and the
        weight files' shared memory given back."""
        import ray

        if self.coordinator is not None and ray.is_initialized():
            try:
                ray.get(self.coordinator.close.remote(), timeout=10)
                ray.kill(self.coordinator)
            except Exception:  # noqa: BLE001 - best effort
                pass
        pools = [*self.reward_pools, self.gold_pool, self.judge_pool]
        for pool in pools if ray.is_initialized() else []:
            if pool is not None:
                pool.close()
        shutil.rmtree(self.weights_dir, ignore_errors=True)


def check_environment(cfg: PPOConfig) -> None:
    """rollout.environment: a wrong module, class or argument fails here, not mid-run."""
    r = cfg.rollout
    if not r.environment:
        return
    try:
        make = load_environment(r.environment, r.env_args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        make()
    except Exception as e:  # noqa: BLE001 - the user's class: any error, named
        raise ConfigError(f"rollout.environment={r.environment} cannot be built with "
                          f"rollout.env_args={r.env_args}: {type(e).__name__}: {e}") from None


def critic_path(cfg: PPOConfig, policy_path: str) -> str | None:
    """Where algo=ppo's critic starts: algo.critic_model (same vocabulary as the policy,
    since it reads the policy's tokens) or the policy itself."""
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


def start_reward_models(cfg: PPOConfig) -> tuple[list, object, object]:
    """(the served reward models (reward.models, or reward.model), each a pool of
    reward.replicas actors; reward.gold's pool (one replica) when it is a reward model;
    reward.judge's pool), up and loaded when this returns: a path that is not a reward
    model fails here."""
    rw = cfg.reward
    specs = [("reward.model" if rw.model else f"reward.models[{i}]", spec, rw.replicas,
              ServedScorer) for i, spec in enumerate(rw.served()[0])]
    if rw.gold and not is_function(rw.gold):
        specs.append(("reward.gold", rw.gold, 1, ServedScorer))
    if rw.judge:
        specs.append(("reward.judge", rw.judge, rw.replicas, ServedJudge))
    served: dict = {}  # setting -> its pool
    for what, spec, replicas, actor in specs:
        path = resolve_model_path(spec, what)
        if actor is ServedScorer and not is_reward_model(path):
            raise ConfigError(f"{what}={spec}: not a reward model: neither exported by "
                              "rlhf.rm (rlhf_reward.json) nor a Hugging Face "
                              "sequence-classification model with one output. Train one "
                              "with python -m rlhf.rm and give its run directory's model/.")
        try:
            served[what] = start_reward_pool(
                path, replicas=replicas, num_cpus=rw.cpus_per_replica,
                num_gpus=rw.gpus_per_replica, dtype=cfg.model.dtype,
                timeout_s=rw.timeout_s, separate=cfg.rollout.placement == "separate",
                actor=actor)
        except Exception as e:  # noqa: BLE001 - the replica's own error, named
            for pool in served.values():
                pool.close()
            cause = root_cause(e)
            raise ConfigError(f"{what}={spec}: cannot serve it "
                              f"({type(cause).__name__}: {cause})") from None
    gold_pool, judge = served.pop("reward.gold", None), served.pop("reward.judge", None)
    pools = list(served.values())  # the reward models, in reward.models' order
    if pools or judge:
        print(f"serving {len(pools)} reward model(s), {rw.replicas} replica(s) each"
              + (f", combined by {rw.ensemble}" if len(pools) > 1 else "")
              + (", a pairwise judge" if judge else "")
              + (", and the gold reward model" if gold_pool else ""), flush=True)
    return pools, gold_pool, judge


def start_engines(cfg: PPOConfig, model_path: str) -> list:
    """rollout.engines vLLM actors, started now; each call waits for its engine."""
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
