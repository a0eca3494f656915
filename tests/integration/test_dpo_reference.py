"""loss.precompute_reference: reference log-probs from a Ray Data actor pool equal a
direct forward of the reference, row by row, and line up with their pairs in training."""

import math

import pytest
import torch

from tests.integration.conftest import dpo, metrics


def test_streamed_reference_equals_direct_forward(ray_cluster, tiny_model_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from rlhf import data
    from rlhf.config import DataConfig, ModelConfig
    from rlhf.logprobs import pad_pairs, sequence_logprobs
    from rlhf.reference import add_reference_logps

    cfg = DataConfig(demo_pairs=40, demo_eval_pairs=8)
    pipes = data.build(data.inspect(cfg), cfg, tiny_model_path, seed=0)
    ds = add_reference_logps(pipes.train, model_path=tiny_model_path, model_cfg=ModelConfig(),
                             pad_id=tokenizer.pad_token_id, micro_batch_size=4, packing=True,
                             actors=1, gpus_per_actor=0)
    rows = ds.take_all()
    assert len(rows) == 40
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    for r in rows[:12]:
        b = pad_pairs([r["prompt_ids"]], [r["chosen_ids"]], [r["rejected_ids"]], 0)
        with torch.no_grad():
            lp, _ = sequence_logprobs(model(input_ids=b["input_ids"],
                                            attention_mask=b["attention_mask"]).logits,
                                      b["input_ids"], b["loss_mask"])
        assert float(r["ref_chosen"]) == pytest.approx(lp[0].item(), rel=1e-6, abs=1e-5)
        assert float(r["ref_rejected"]) == pytest.approx(lp[1].item(), rel=1e-6, abs=1e-5)


def test_training_with_streamed_reference(ray_cluster, tmp_path):
    run_dir = dpo(tmp_path, "loss.precompute_reference=true", "train.max_steps=6",
                  "train.eval_every=3")
    losses = [r["train/loss"] for r in metrics(run_dir) if "train/loss" in r]
    # Step 1: the policy is still the reference, so every pair's loss is log 2 exactly
    # when each row carries its own reference values (a misaligned row would not be).
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[-1] < losses[0]
    evals = [r for r in metrics(run_dir) if "eval/rewards/accuracy" in r]
    assert evals and evals[-1]["eval/pairs"] == 32
