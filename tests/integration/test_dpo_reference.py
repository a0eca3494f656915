"""loss.precompute_reference: reference log-probs from a Ray Data actor pool equal a
direct forward of the reference, row by row. That they line up with their pairs in
training (step 1's loss is log 2, and a resumed run's losses are an uninterrupted run's)
is checked in test_dpo_invariance."""

import pytest
import torch


def test_streamed_reference_equals_direct_forward(ray_cluster, tiny_model_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from rlhf.data import pipeline as data
    from rlhf.config import DataConfig, ModelConfig
    from rlhf.core.logprobs import pad_pairs, sequence_logprobs
    from rlhf.train.reference import add_reference_logps

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
