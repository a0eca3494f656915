import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.config import ConfigError, DPOConfig, field_docs, help_text, parse_args, resolved_learning_rate

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_seed_practice():
    cfg = DPOConfig()
    assert cfg.loss.beta == 0.1 and cfg.train.epochs == 1
    assert cfg.data.max_length == 1024 and cfg.data.max_prompt_length == 512
    assert resolved_learning_rate(parse_args(DPOConfig, ["model.name_or_path=/m"], "x")) == 5e-7
    assert resolved_learning_rate(cfg) == 1e-3  # builtin tiny model starts from scratch


def test_dotted_overrides_and_types():
    cfg = parse_args(DPOConfig, ["train.learning_rate=5e-7", "cluster.zero_stage=3",
                                 "model.lora.enabled=true", "model.lora.target_modules=q_proj,v_proj",
                                 "data.columns.chosen=preferred"], "x")
    assert cfg.train.learning_rate == 5e-7 and cfg.cluster.zero_stage == 3
    assert cfg.model.lora.enabled and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.columns.chosen == "preferred"


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 3\nloss:\n  beta: 0.2\n")
    cfg = parse_args(DPOConfig, ["--config", str(recipe), "loss.beta=0.3"], "x")
    assert cfg.train.epochs == 3 and cfg.loss.beta == 0.3


@pytest.mark.parametrize("args, match", [
    (["train.learnig_rate=1"], "Unknown config key 'train.learnig_rate'"),
    (["nope.x=1"], "Unknown config key 'nope'"),
    (["train.epochs=abc"], "train.epochs must be an integer"),
    (["loss.type=dpo"], "loss.type='dpo' is not one of"),
    (["loss.type=sigmoid,orpo"], "stand alone; for an NLL term beside one use loss.rpo_alpha"),
    (["loss.type=sigmoid,sft", "loss.weights=1"], "1 values for 2 loss types"),
    (["loss.type=exo_pair"], "needs loss.label_smoothing > 0"),
    (["loss.type=bco_pair", "loss.label_smoothing=0.1"], "only applies to"),
    (["loss.type=bco_pair", "loss.f_divergence=js_divergence"], "drop loss.f_divergence"),
    (["loss.type=orpo", "loss.precompute_reference=true"], "uses no reference"),
    (["loss.type=cpo", "model.ref_name_or_path=x"], "drop model.ref_name_or_path"),
    (["loss.reference_sync_every=4", "model.lora.enabled=true"], "adapters off"),
    (["loss.alphapo=0.2"], "alphapo applies to cpo and simpo"),
    (["loss.ld_alpha=2"], r"must be in \[0, 1\]"),
    (["train.global_batch_size=6"], "multiple of"),
    (["data.max_prompt_length=2000"], "leaves no room"),
    (["model.lora.load_in_4bit=true", "model.lora.enabled=true"], "needs GPUs"),
    (["cluster.offload_params=true"], "zero_stage=3"),
    (["model.dtype=fp16"], "needs GPUs"),
    (["--config", "/no/such.yaml"], "no such file"),
    (["oops"], "Cannot read argument"),
    (["cluster.num_workers=[3,1]"], r"a range \[min, max\] with min <= max"),
    (["cluster.num_workers=[1,2,3]"], "a range"),
    (["cluster.num_workers=[0,2]"], "at least 1"),
    (["cluster.num_workers=[2,3]", "train.global_batch_size=8", "train.micro_batch_size=2"],
     r"over 3 of them.*\(2 do\).*multiple of 12"),
])
def test_bad_settings_fail_with_a_fix(args, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(DPOConfig, args, "x")


def test_every_field_has_help():
    from dataclasses import fields, is_dataclass

    def walk(cls):
        docs = field_docs(cls)
        for f in fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            default = f.default_factory() if callable(f.default_factory) else f.default
            if is_dataclass(default):
                walk(type(default))

    from rlhf.config import RMConfig

    walk(DPOConfig)
    walk(RMConfig)
    text = help_text(DPOConfig, "rlhf.dpo")
    assert "loss.beta = 0.1" in text and "train.learning_rate = None" in text


def test_help_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "rlhf.dpo", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "model.lora.r = 16" in out.stdout


def test_every_recipe_loads():
    recipes = sorted((ROOT / "launch" / "recipes").glob("*.yaml"))
    assert recipes, "no recipes"
    from rlhf.config import KTOConfig, PPOConfig, RMConfig, SFTConfig

    for r in recipes:
        cls = {"dpo": DPOConfig, "kto": KTOConfig, "rm": RMConfig, "sft": SFTConfig,
               "ppo": PPOConfig}[r.name.split("-")[0]]
        cfg = parse_args(cls, ["--config", str(r)], "x")
        assert cfg.train.learning_rate is not None, r
        if cls is PPOConfig:  # 2 nodes x 8 GPUs: 8 training workers, 3 engines x TP 2,
            # 2 reward model replicas
            r, rw = cfg.rollout, cfg.reward
            assert cfg.cluster.num_workers + r.engines * r.tensor_parallel_size + \
                rw.replicas * rw.gpus_per_replica == 16


def test_reward_model_config():
    from rlhf.config import RMConfig, resolved_learning_rate

    cfg = parse_args(RMConfig, ["loss.center_coefficient=0.01"], "rlhf.rm")
    assert cfg.loss.center_coefficient == 0.01
    assert resolved_learning_rate(cfg) == 1e-3  # the built-in tiny model
    cfg = parse_args(RMConfig, ["model.name_or_path=org/model"], "rlhf.rm")
    assert resolved_learning_rate(cfg) == 1e-5  # pretrained: a reward model's usual rate
    with pytest.raises(ConfigError, match="center_coefficient"):
        parse_args(RMConfig, ["loss.center_coefficient=-1"], "rlhf.rm")
    with pytest.raises(ConfigError, match="merge_on_export"):
        parse_args(RMConfig, ["model.lora.enabled=true", "model.lora.merge_on_export=false"],
                   "rlhf.rm")
    with pytest.raises(ConfigError, match="loss.beta"):  # DPO's loss has no place here
        parse_args(RMConfig, ["loss.beta=0.2"], "rlhf.rm")


def test_sft_config():
    from rlhf.config import SFTConfig, resolved_learning_rate

    cfg = parse_args(SFTConfig, ["data.completion_only=false"], "rlhf.sft")
    assert not cfg.data.completion_only and cfg.data.format == "auto"
    assert resolved_learning_rate(parse_args(SFTConfig, ["model.name_or_path=org/m"],
                                             "x")) == 2e-5
    with pytest.raises(ConfigError, match="data.format='implicit' is not one of"):
        parse_args(SFTConfig, ["data.format=implicit"], "rlhf.sft")
    with pytest.raises(ConfigError, match="Unknown config key 'data.max_prompt_length'"):
        parse_args(SFTConfig, ["data.max_prompt_length=10"], "rlhf.sft")
    # inherited fields keep their help text
    from rlhf.config import help_text

    assert "Held-out data, same forms as `path`" in help_text(SFTConfig, "rlhf.sft")


def test_overrides_keep_an_entry_points_own_section_defaults():
    """rlhf.ppo gives its train section other defaults; overriding one key keeps the rest."""
    from rlhf.config import PPOConfig

    cfg = parse_args(PPOConfig, ["train.max_steps=4"], "rlhf.ppo")
    assert (cfg.train.max_steps, cfg.train.lr_scheduler, cfg.train.global_batch_size) == \
        (4, "constant", 16)
    assert parse_args(DPOConfig, ["train.max_steps=4"], "x").train.lr_scheduler == "cosine"


def test_ppo_config_checks():
    from rlhf.config import PPOConfig

    cfg = parse_args(PPOConfig, ["algo.algorithm=ppo", "rollout.samples_per_prompt=1",
                                 "train.micro_batch_size=4", "algo.mini_batches=2"], "x")
    assert cfg.algo.algorithm == "ppo" and cfg.algo.mini_batches == 2
    with pytest.raises(ConfigError, match="samples_per_prompt must be at least 2: rloo"):
        parse_args(PPOConfig, ["algo.algorithm=rloo", "rollout.samples_per_prompt=1"], "x")
    # 16 prompts / (8 per micro-batch x 2 workers) = 1 micro-batch per worker: no split
    with pytest.raises(ConfigError, match="mini_batches=2 does not divide the 1 micro"):
        parse_args(PPOConfig, ["algo.mini_batches=2"], "x")
    with pytest.raises(ConfigError, match="kl_penalty=reward too"):
        parse_args(PPOConfig, ["algo.kl_target=0.1"], "x")
    with pytest.raises(ConfigError, match="No reward: give reward.functions"):
        parse_args(PPOConfig, ["reward.functions=[]"], "x")
    # a reward model is served whatever it is called, so every filter can use its score
    one = parse_args(PPOConfig, ["reward.model=rm", "reward.model_weight=0.5",
                                 "algo.dynamic_sampling=true", "reward.min_score=0"], "x")
    assert one.reward.served() == (["rm"], 0.5)
    assert parse_args(PPOConfig, ["reward.models=[a, b]"], "x").reward.served() == \
        (["a", "b"], 1.0)
    from rlhf.config.ppo import is_function  # reward.gold: a function or a reward model

    assert is_function("rlhf.core.tasks:demo_opening")
    assert not any(map(is_function, ("builtin:demo-rm", "s3://b/rm", "org/model", "runs/m")))
    with pytest.raises(ConfigError, match="'a2c' is not one of grpo, rloo, reinforce"):
        parse_args(PPOConfig, ["algo.algorithm=a2c"], "x")


def test_async_and_environment_config_checks():
    from rlhf.config import PPOConfig, resolved_rollout_is
    from rlhf.online.setup import weight_sync_path

    def cfg(*argv):
        return parse_args(PPOConfig, list(argv), "x")

    # rollout correction: none on-policy, truncated importance sampling when stale
    assert resolved_rollout_is(cfg()) == "none"
    assert resolved_rollout_is(cfg("rollout.max_staleness=1")) == "tis"
    assert resolved_rollout_is(cfg("rollout.max_staleness=1", "algo.rollout_is=mis")) == "mis"
    env = cfg("rollout.environment=rlhf.core.tasks:BoxLookupEnv", "rollout.max_turns=2",
              "rollout.env_args={latency_s: 0.2}", "reward.functions=[]")  # env: a reward
    assert env.rollout.env_args == {"latency_s": 0.2}
    for argv, why in (
            (["rollout.max_staleness=-1"], "0 \\(on-policy\\) or more"),
            (["rollout.max_turns=2"], "needs an environment"),
            (["rollout.env_args={a: 1}"], "no rollout.environment"),
            (["rollout.environment=x:Y", "rollout.env_args=3"], "must be a mapping"),
            (["rollout.env_errors=ignore"], "skip, stop"),
            (["algo.rollout_is=clip"], "auto, none, tis, mis"),
            (["algo.rollout_is_cap=0.5"], "above 1"),
            (["algo.dynamic_sampling=true", "algo.algorithm=reinforce++"], "grpo and rloo"),
            (["reward.model=a", "reward.models=[b]"], r"reward.models=\[a, b\]"),
            (["reward.aggregation=normalise_then_sum", "rollout.samples_per_prompt=1",
              "algo.algorithm=ppo"], "samples_per_prompt >= 2"),
            (["reward.aggregation=product"], "sum_then_normalise, normalise_then_sum"),
            (["reward.remote_url=localhost:8000"], "http:// or https://"),
            (["reward.remote_url=https://u:p@rm.example.com/score"], r"\$RLHF_REWARD_TOKEN"),
            (["reward.remote_errors=ignore"], "skip, stop"),
            (["reward.ensemble=median"], "mean, min, uwo, mean_minus_std"),
            (["reward.min_score=1", "reward.max_score=0"], "no sample could be kept"),
            (["reward.models=[rm]", "reward.replicas=0"], "at least 1 replica"),
            (["reward.functions=[]"], "No reward: give reward.functions"),
            (["algo.overlong=cut"], "none, filter, penalty"),
            (["rollout.placement=spread"], "colocated, separate"),
            (["rollout.partial_rollouts=true", "rollout.chunk_tokens=0"], "chunk_tokens"),
            (["algo.algorithm=online_dpo", "algo.dpo_loss=orpo"], "sigmoid, hinge, ipo"),
            (["algo.algorithm=online_dpo", "algo.pairs=worst"], "best_worst, best_random"),
            (["algo.algorithm=online_dpo", "algo.beta=0"], "beta=0.0 must be positive"),
            (["algo.algorithm=online_dpo", "algo.kl_penalty=reward"], "no reward to shape"),
            (["algo.algorithm=online_dpo", "algo.ppo_epochs=2"], "one update per batch"),
            (["algo.algorithm=online_dpo", "algo.reference_sync_every=4",
              "algo.dpo_loss=simpo"], "there is none"),
            (["algo.algorithm=online_dpo", "rollout.samples_per_prompt=1"],
             "at least 2: online_dpo")):
        with pytest.raises(ConfigError, match=why):
            cfg(*argv)
    dpo = cfg("algo.algorithm=online_dpo", "algo.pairs=all", "algo.min_pair_gap=0.5",
              "algo.dpo_loss=ipo", "algo.reference_sync_every=4")
    assert (dpo.algo.pairs, dpo.algo.dpo_loss, dpo.algo.reference_sync_every) == \
        ("all", "ipo", 4)
    # engines on nodes of their own cannot read the trainer's /dev/shm
    assert weight_sync_path(cfg("rollout.placement=separate")) == "store"
    with pytest.raises(ConfigError, match="weight_sync=shm needs the engines"):
        weight_sync_path(cfg("rollout.placement=separate", "rollout.weight_sync=shm"))


def test_elastic_worker_range():
    c = parse_args(DPOConfig, ["cluster.num_workers=[1,2]", "train.global_batch_size=8",
                               "train.micro_batch_size=4"], "x").cluster
    assert (c.num_workers, c.worker_range, c.elastic) == ([1, 2], (1, 2), True)
    c = parse_args(DPOConfig, ["cluster.num_workers=2"], "x").cluster
    assert (c.worker_range, c.elastic) == ((2, 2), False)


def test_builtin_models_are_cached_under_their_configs_hash():
    """rlhf.ppo's SFT policy and rlhf.evaluate's judge are cached under a hash of the
    resolved config that trains them: another setting (an override, a changed default)
    gets a model of its own; where the run writes its files does not."""
    from rlhf.config import RMConfig
    from rlhf.builtin_models import default_model_key

    def key(*argv):
        return default_model_key(parse_args(RMConfig, list(argv), "x"))

    assert key("data.demo_pairs=800") == key("data.demo_pairs=800", "output.dir=/elsewhere")
    assert key("data.demo_pairs=800") != key()
    assert key("data.demo_pairs=2400") == key()  # the default, spelt out: the same config
    assert key() != default_model_key(parse_args(DPOConfig, [], "x"))
    assert len(key()) == 12 and key() == key()


def test_unknown_keys_point_at_what_they_may_mean():
    """By last name in another section, by the TRL/OpenRLHF flag name, by spelling."""
    from rlhf.config import DPOConfig, PPOConfig, suggest

    assert suggest("beta", DPOConfig) == ["loss.beta"]
    assert suggest("learning_rate", DPOConfig) == ["train.learning_rate"]
    assert suggest("per_device_train_batch_size", DPOConfig) == ["train.micro_batch_size"]
    assert suggest("lora_r", DPOConfig) == ["model.lora.r"]
    assert suggest("loss.bta", DPOConfig) == ["loss.beta"]
    assert suggest("train.lr", DPOConfig) == ["train.learning_rate"]
    assert suggest("num_generations", PPOConfig) == ["rollout.samples_per_prompt"]
    assert suggest("num_generations", DPOConfig) == []  # no such setting in DPO
    with pytest.raises(ConfigError, match=r"Unknown config key 'beta'. Did you mean loss.beta\?"):
        parse_args(DPOConfig, ["beta=0.1"], "rlhf.dpo")


def test_every_peer_flag_points_at_a_real_key():
    from rlhf.config import PEER_FLAGS, DPOConfig, KTOConfig, PPOConfig, RMConfig, SFTConfig
    from rlhf.config.loader import _leaf_keys

    known = {k for cls in (DPOConfig, KTOConfig, PPOConfig, RMConfig, SFTConfig)
             for k in _leaf_keys(cls)}
    assert {v.split("=")[0] for v in PEER_FLAGS.values()} <= known


def test_load_is_the_command_line_from_python(tmp_path):
    """rlhf.config.load: defaults <- recipe <- overrides, checked as on the command line."""
    from rlhf.config import ConfigError, DPOConfig, load

    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss:\n  beta: 0.3\ntrain:\n  max_steps: 7\n")
    cfg = load(DPOConfig, recipe, ["loss.beta=0.2"])
    assert (cfg.loss.beta, cfg.train.max_steps) == (0.2, 7)
    assert load(DPOConfig).loss.beta == DPOConfig().loss.beta
    with pytest.raises(ConfigError, match="Did you mean loss.beta"):
        load(DPOConfig, overrides=["beta=0.1"])


def test_one_table_of_entry_points():
    """Each entry of rlhf.config.entry_points is a `python -m` module with main() and
    its config; launch/ has a recipe for each one that trains."""
    import importlib
    from pathlib import Path

    from rlhf.config import help_text
    from rlhf.config.entry_points import ENTRY_POINTS, TRAINING

    for e in ENTRY_POINTS.values():
        module = importlib.import_module(e.module)
        assert callable(module.main), e.module
        assert help_text(e.config, e.module).startswith(f"usage: python -m {e.module}")
    recipes = Path(__file__).resolve().parents[2] / "launch" / "recipes"
    assert {r.name.split("-")[0] for r in recipes.glob("*.yaml")} == set(TRAINING)
