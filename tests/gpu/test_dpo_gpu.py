"""GPU paths: bf16 + QLoRA (bitsandbytes 4-bit) and ZeRO-3 bf16 on NCCL, for DPO, ORPO
(no reference model) and KTO (its KL point all-reduced over NCCL). Skipped
without a CUDA GPU; run on a GPU machine with `make setup EXTRA=gpu` then
`.venv/bin/python -m pytest -m gpu tests/gpu`."""

import json

import pytest

pytestmark = pytest.mark.gpu


def _run(tmp_path, *overrides, kto: bool = False):
    import torch

    from rlhf import dpo, kto as kto_entry
    from rlhf.config import DPOConfig, KTOConfig, parse_args

    n = torch.cuda.device_count()
    run = kto_entry.run if kto else dpo.run
    cfg = parse_args(KTOConfig if kto else DPOConfig, [
                                 f"output.dir={tmp_path}", "cluster.use_gpu=true",
                                 f"cluster.num_workers={n}", "cluster.cpus_per_worker=1",
                                 f"train.global_batch_size={4 * n}", "train.micro_batch_size=4",
                                 "data.demo_pairs=256", "data.demo_eval_pairs=32",
                                 "model.dtype=bf16", *overrides], "x")
    return json.loads((run(cfg) / "summary.json").read_text())


def test_qlora_bf16(tmp_path):
    s = _run(tmp_path, "model.lora.enabled=true", "model.lora.load_in_4bit=true",
             "cluster.zero_stage=2", "train.learning_rate=1e-3")
    assert s["eval/rewards/accuracy"] > 0.6


def test_zero3_bf16_full(tmp_path):
    s = _run(tmp_path, "cluster.zero_stage=3", "model.gradient_checkpointing=true")
    assert s["eval/rewards/accuracy"] > 0.6


def test_orpo_qlora_bf16(tmp_path):
    s = _run(tmp_path, "loss.type=orpo", "model.lora.enabled=true",
             "model.lora.load_in_4bit=true", "cluster.zero_stage=2", "train.learning_rate=1e-3")
    assert s["eval/rewards/accuracy"] > 0.6  # ORPO's own: beta x mean token log-prob


def test_kto_zero3_bf16(tmp_path):
    s = _run(tmp_path, "cluster.zero_stage=3", "train.learning_rate=1e-3", kto=True)
    assert s["eval/rewards/margin"] > 0.5 and s["eval/examples"] == 64
