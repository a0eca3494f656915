"""`python -m launch` and ray-cluster.yaml: the plan's memory model against hand-computed
numbers, every recipe fits a node type of the cluster file, the out-of-memory run is
predicted, the cluster file is valid for Ray's launcher and keeps its ports private."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.plan import (OVERHEAD_BYTES, Arch, Bundle, NodeType, make_plan,
                         memory_plan, nodes_needed, node_types, plan_recipe,
                         resource_bundles)
from rlhf.config import DPOConfig, KTOConfig, parse_args

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "ray-cluster.yaml"


def test_memory_model_by_hand():
    # hidden 64, 2 layers, 4 heads (head_dim 16, kv 64), intermediate 128, vocab 1000, tied:
    # block = 2*64*64 + 2*64*64 + 3*64*128 + 2*64 = 41,088; P = 1000*64 + 2*41,088 + 64
    arch = Arch(64, 2, 4, 4, 128, 1000, tied=True)
    assert arch.params == 146_240
    cfg = parse_args(DPOConfig, ["model.dtype=bf16", "cluster.zero_stage=2",
                                 "cluster.num_workers=4", "train.micro_batch_size=2",
                                 "train.global_batch_size=8", "data.max_length=16",
                                 "data.max_prompt_length=8",
                                 "model.gradient_checkpointing=false"], "x")
    policy, ref = memory_plan("dpo", cfg, arch)
    assert policy.weights == 2 * 146_240                  # ZeRO-2 keeps whole weights
    assert policy.gradients == 2 * 146_240 / 4            # ... and shards gradients
    assert policy.optimizer == 12 * 146_240 / 4           # fp32 master + 2 Adam moments
    # 2 pairs x 2 sequences x 16 tokens = 64 tokens; per block 64 * (6*64 + 2*64 + 4*128)
    # * 2 bytes = 131,072, 2 blocks; logits 64 * 1000 * (2 + 4)
    assert policy.activations == 2 * 131_072 + 384_000
    assert (ref.role, ref.total) == ("reference", 2 * 146_240)
    plan = make_plan("dpo", cfg, arch, [])
    want = (policy.total + ref.total) * 1.05 + OVERHEAD_BYTES
    assert plan.per_gpu == pytest.approx(want)
    # ZeRO-3 shards the weights too; LoRA drops the reference (adapters off)
    cfg.cluster.zero_stage = 3
    assert memory_plan("dpo", cfg, arch)[0].weights == 2 * 146_240 / 4
    # offload_frozen: the reference sharded in host memory, whatever the policy's stage
    cfg.cluster.zero_stage, cfg.cluster.offload_frozen = 2, True
    policy, ref = memory_plan("dpo", cfg, arch)
    assert (ref.total, ref.cpu) == (0, 2 * 146_240 / 4)
    assert policy.weights == 2 * 146_240
    # SimPO, CPO and ORPO hold no reference at all: the policy alone
    cfg.cluster.offload_frozen = False
    for kind in ("orpo", "cpo", "simpo"):
        cfg.loss.type = [kind]
        assert [m.role for m in memory_plan("dpo", cfg, arch)] == ["policy"]
    assert make_plan("dpo", cfg, arch, []).per_gpu == pytest.approx(
        policy.total * 1.05 + OVERHEAD_BYTES)
    # KTO holds a reference beside its policy, and one sequence per example
    kto = parse_args(KTOConfig, ["cluster.num_workers=4", "train.micro_batch_size=2",
                                 "train.global_batch_size=8"], "x")
    assert [m.role for m in memory_plan("kto", kto, arch)] == ["policy", "reference"]
    # ... but not with its log-probs precomputed: reference actors, off the workers
    kto.loss.precompute_reference, kto.cluster.reference_actors = True, 2
    assert [m.role for m in memory_plan("kto", kto, arch)] == ["policy"]
    assert [(b.what, b.count) for b in resource_bundles("kto", kto)][1] == \
        ("reference actor", 2)


def test_ppo_frozen_models_shard_and_offload():
    """PPO's reference is a frozen engine: whole under ZeRO-2, /N under ZeRO-3, in host
    memory with offload_frozen; the critic trains like the policy; the reward model is
    served beside the engines (a bundle per replica, the gold one too), never on the
    training workers."""
    from rlhf.config import PPOConfig

    arch = Arch(64, 2, 4, 4, 128, 1000, tied=True)
    args = ["model.dtype=bf16", "cluster.num_workers=4", "train.micro_batch_size=2",
            "train.global_batch_size=8", "algo.algorithm=ppo", "reward.model=rm"]
    roles = lambda ms: {m.role: m for m in ms}  # noqa: E731
    cfg = parse_args(PPOConfig, args, "x")
    z2 = roles(memory_plan("ppo", cfg, arch))
    assert set(z2) == {"policy", "reference", "critic"}
    assert z2["reference"].weights == 2 * 146_240
    z3 = roles(memory_plan("ppo", parse_args(PPOConfig, [*args, "cluster.zero_stage=3"],
                                             "x"), arch))
    assert z3["reference"].weights == 2 * 146_240 / 4
    off = roles(memory_plan("ppo", parse_args(PPOConfig, [*args, "cluster.offload_frozen=true"],
                                              "x"), arch))
    assert off["reference"].total == 0 and off["reference"].cpu == 2 * 146_240 / 4
    assert off["critic"].weights == z2["critic"].weights  # the trained models stay
    served = {b.what: b.count for b in resource_bundles("ppo", parse_args(
        PPOConfig, [*args, "reward.replicas=2", "reward.gold=gold-rm"], "x"))}
    assert served["reward model replica"] == 3
    served = {b.what: b.count for b in resource_bundles("ppo", parse_args(  # + a judge
        PPOConfig, [*args, "reward.replicas=2", "reward.judge=lm"], "x"))}
    assert served["reward model replica"] == 4


def test_elastic_plan_asks_for_max_and_sizes_memory_at_min():
    arch = Arch(64, 2, 4, 4, 128, 1000, tied=True)
    cfg = parse_args(DPOConfig, ["cluster.num_workers=[2,4]", "cluster.zero_stage=3",
                                 "train.global_batch_size=24", "train.micro_batch_size=2"],
                     "x")
    assert memory_plan("dpo", cfg, arch)[0].weights == 4 * 146_240 / 2  # fp32, 2 shards
    plan = make_plan("dpo", cfg, arch, [])
    assert plan.bundles[0].count == 4


def test_packing_onto_nodes_by_hand():
    node = NodeType("n", cpus=16, gpus=8, gpu_memory=80e9, max_workers=4)
    # 8 workers (1 GPU, 8 CPU) need 4 nodes by CPU; 4 engines of 2 GPUs add GPUs only
    assert nodes_needed([Bundle("w", 8, 1, 8)], node) == 4
    assert nodes_needed([Bundle("w", 1, 1, 8), Bundle("e", 1, 2, 4)], node) == 2
    assert nodes_needed([Bundle("e", 1, 16, 1)], node) is None  # an engine spans no nodes


def test_every_recipe_fits_the_cluster_and_the_oom_is_predicted():
    types = node_types(CLUSTER)
    assert {t.name for t in types} >= {"gpu-h100x8", "gpu-a100x8", "gpu-a100x8-spot"}
    for recipe in sorted((ROOT / "launch" / "recipes").glob("*.yaml")):
        arch = "meta-llama/Llama-3.1-8B" if recipe.name.startswith("ppo") else None
        plan, _ = plan_recipe(recipe, [], CLUSTER, arch)
        assert plan.ok, (recipe.name, plan.fits)
        assert plan.per_gpu < 80e9
    # DPO of the 8B model in full, unsharded: weights, gradients and Adam alone are
    # 16 + 16 + 96 GB per GPU. The plan says no, and how to fit.
    plan, _ = plan_recipe(ROOT / "launch/recipes/dpo-llama3-8b.yaml",
                          ["model.lora.enabled=false", "cluster.zero_stage=0"], CLUSTER)
    assert not plan.ok and plan.per_gpu > 128e9
    assert all("GiB per training GPU" in v for v in plan.fits.values())


def test_separate_placement_plans_each_side_on_its_own_nodes():
    """rollout.placement=separate: the engines fit only node types labelled
    rlhf-role=rollout, the training workers only the others; both must fit."""
    plan, cfg = plan_recipe(ROOT / "launch/recipes/ppo-async-llama3-8b.yaml", [], CLUSTER,
                            "meta-llama/Llama-3.1-8B")
    assert plan.ok and cfg.rollout.placement == "separate"
    assert plan.fits["gpu-h100x8-rollout"].startswith("rollout side: yes")
    assert plan.fits["gpu-h100x8"].startswith("training side: yes")
    assert {b.side for b in plan.bundles} == {"training", "rollout"}
    # the served reward model: its replicas beside the engines, packed on rollout nodes
    replicas = [b for b in plan.bundles if b.what == "reward model replica"]
    assert [(b.count, b.gpus, b.side) for b in replicas] == [(2, 1, "rollout")]
    served, _ = plan_recipe(ROOT / "launch/recipes/ppo-async-llama3-8b.yaml",
                            ["reward.model=null", "reward.models=[a,b]", "reward.replicas=2",
                             "reward.gpus_per_replica=0.5"], CLUSTER, "meta-llama/Llama-3.1-8B")
    replicas = [b for b in served.bundles if b.what == "reward model replica"]
    assert [(b.count, b.gpus, b.side) for b in replicas] == [(4, 0.5, "rollout")]
    assert served.ok and served.fits["gpu-h100x8-rollout"].startswith("rollout side: yes")
    no_rollout_nodes = [t for t in node_types(CLUSTER) if not t.rollout]
    plan = make_plan("ppo", cfg, plan.arch, no_rollout_nodes)
    assert not plan.ok and "no node type is labelled" in plan.fits["(rollout nodes)"]


def test_cli_plan_and_submit_dry_run():
    run = [sys.executable, "-m", "launch"]
    out = subprocess.run(run + ["plan", "launch/recipes/dpo-llama3-8b.yaml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "8.03B parameters" in out.stdout and "fits: yes" in out.stdout
    out = subprocess.run(run + ["plan", "launch/recipes/dpo-llama3-8b.yaml",
                                "model.lora.enabled=false", "cluster.zero_stage=0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "fits: NO" in out.stdout and "zero_stage=3" in out.stdout
    out = subprocess.run(run + ["plan", "launch/recipes/ppo-llama3-8b.yaml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--arch" in out.stderr  # the SFT path is not here
    out = subprocess.run(run + ["submit", "launch/recipes/rm-llama3-8b.yaml",
                                "train.max_steps=5", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 1)[1].strip() == (
        f"job submit --address http://127.0.0.1:8265 --working-dir {ROOT} -- python -m "
        "rlhf.rm --config launch/recipes/rm-llama3-8b.yaml train.max_steps=5")


def test_cluster_file_is_valid_for_ray_and_keeps_ports_private():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = CLUSTER.read_text()
    cfg = yaml.safe_load(text)
    validate_config(prepare_config(yaml.safe_load(text)))  # what `ray up` checks
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs no training
    for name, t in cfg["available_node_types"].items():
        if name != cfg["head_node_type"]:
            assert t["min_workers"] == 0 and t["max_workers"] >= 2 and t["resources"]["GPU"]
    assert cfg["idle_timeout_minutes"] > 0
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "--num-cpus=0" in start
    assert all("RAY_AUTH_MODE=token" in c for c in
               cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:])
    assert "security_group" not in str(cfg["provider"])  # no ports opened by us
    for secret in ("AWS_SECRET", "aws_secret_access_key", "WANDB_API_KEY", "HF_TOKEN",
                   "hf_", "RAY_AUTH_TOKEN="):
        assert secret not in text


def test_iterative_dpo_scores_each_round_by_gold(tmp_path):
    """launch.iterate's per-round gold figures from rlhf.evaluate's samples.jsonl, by hand:
    the demo rule's mean on each side and the aligned model's win rate by it (a tie
    counts half)."""
    import json

    from launch.iterate import gold_of

    rows = [{"prompt": "p1", "aligned": [" Of course.", " No."], "base": [" Sure!", " No."]},
            {"prompt": "p2", "aligned": [" Sure!"], "base": [" Of course!"]}]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = gold_of(tmp_path, "rlhf.core.tasks:demo_opening")
    # aligned 1, 0, 0 against base 0, 0, 1: a win, a tie, a loss
    assert got == {"gold": 1 / 3, "gold_base": 1 / 3, "gold_win_rate": 0.5}
