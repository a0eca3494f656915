"""python -m rlhf.kto on a real local Ray cluster: the demo's pairs split into unpaired
examples. The same global batch gives the same losses (and the same KL reference point)
on one worker with one micro-batch of 16 examples, packed, the reference's log-probs
precomputed by a Ray Data actor pool (no reference model on the worker), as on two
workers of micro 2 x accumulation 4 under ZeRO-3, padded, the reference a frozen engine
run once per micro-batch on both of each example's responses: z0 is reduced over every
rank and micro-batch (TRL estimates it per device, so its loss depends on the split),
and the precomputed values line up with their examples. The two-worker run learns and
exports a model with its card. KTO with LoRA in bf16 uses the base (adapters off) as its
reference and exports the adapters merged."""

import math

import pytest

from tests.integration.conftest import kto, metrics, summary

ONE_BATCH = ["data.demo_pairs=8", "train.epochs=3", "train.max_steps=-1",
             "train.eval_every=0", "train.global_batch_size=16", "train.warmup_ratio=0",
             "train.lr_scheduler=constant", "data.preserve_order=true",
             # desirable examples weigh most: the policy then gives the other prompts'
             # completions more probability too, so z0 is > 0 from step 2 and its
             # reduction over the split is tested (with equal weights it stays clamped at 0)
             "loss.undesirable_weight=0.1"]


def test_kto_same_losses_however_the_batch_is_split_and_learns(ray_cluster, tmp_path):
    runs = {}
    for name, overrides in {
            "one worker": ["cluster.num_workers=1", "train.micro_batch_size=16",
                           "cluster.zero_stage=2", "loss.precompute_reference=true"],
            "two workers": ["train.micro_batch_size=2", "cluster.zero_stage=3",
                            "data.packing=false"]}.items():
        run_dir = kto(tmp_path / name.replace(" ", "_"), *ONE_BATCH, *overrides)
        runs[name] = run_dir, [r for r in metrics(run_dir) if "train/loss" in r]
    (one_dir, one), (run_dir, two) = runs["one worker"], runs["two workers"]
    assert "reference model: none here: its log-probs come with the examples" in \
        (one_dir / "run.log").read_text()
    assert [r["train/samples"] for r in two] == [16, 32, 48]  # the 8 pairs, split in two
    # step 1: the policy is the reference: every log-ratio and z0 are 0 (to float
    # rounding: the reference scores a row's two responses in one batch, the policy each
    # alone), each example's loss its weight x (1 - sigma(0)): (8 x 1 + 8 x 0.1) / 16 / 2
    assert two[0]["train/loss"] == pytest.approx(0.275, abs=1e-6)
    assert one[0]["train/kl"] < 1e-5 and two[0]["train/kl"] < 1e-5
    for key in ("train/loss", "train/kl", "train/rewards/chosen", "train/rewards/rejected"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4,
                                                      abs=1e-5), key
    # later steps run against a moved policy: a KL point that is not 0, learned
    assert two[1]["train/kl"] > 0.5 and two[2]["train/rewards/margin"] > 0.5
    assert two[2]["train/loss"] < two[0]["train/loss"] and not math.isnan(two[2]["train/loss"])
    s = summary(run_dir)
    assert s["eval/examples"] == 64, s  # the 32 held-out pairs, split in two
    assert s["eval/rewards/margin"] > 0.5 and s["eval/kl"] > 0, s  # on unseen topics
    assert s["data"]["train"]["usable"] == 8 and s["examples_left_out_by_split"] == 0
    card = (run_dir / "model" / "README.md").read_text()
    assert "KTO (Kahneman-Tversky optimisation" in card and "loss kto, beta 0.1" in card
    assert (run_dir / "model" / "config.json").is_file()


def test_kto_lora_bf16_against_the_base_and_merged_export(ray_cluster, tmp_path,
                                                          tiny_model_path):
    """KTO with LoRA in bf16 (the 8B recipe's way): no second copy of the model, the
    reference is the policy with its adapters off, so at step 1 (adapters at zero) every
    log-ratio is 0 and each example costs its weight x (1 - sigma(0)) = 0.5; the margin
    then grows, and the export is the base with the adapters merged in (only the
    attention projections LoRA targets changed)."""
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = kto(tmp_path, "model.lora.enabled=true", "model.lora.r=8", "model.dtype=bf16",
                  "train.learning_rate=1e-2", "train.max_steps=3", "data.demo_pairs=24",
                  "data.demo_eval_pairs=8", "train.eval_every=0")
    assert "reference model: the policy with its LoRA adapters off" in \
        (run_dir / "run.log").read_text()
    train = [r for r in metrics(run_dir) if "train/loss" in r]
    # bf16: the reference scores both of a row's responses in one batch, the policy each
    # alone, so the sums of ~30 bf16 log-probs round differently by up to ~1e-2
    assert train[0]["train/loss"] == pytest.approx(0.5, abs=2e-3)
    assert train[-1]["train/rewards/margin"] > train[0]["train/rewards/margin"] + 0.1, train
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path).to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not any("lora" in n for n, _ in
                                                     model.named_parameters())
    changed = {n for (n, a), b in zip(model.named_parameters(), base.parameters())
               if not torch.equal(a, b)}
    assert changed and all(any(m in n for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
                           for n in changed), changed
