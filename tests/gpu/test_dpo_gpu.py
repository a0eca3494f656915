"""GPU paths: bf16 + QLoRA (bitsandbytes 4-bit) and ZeRO-3 bf16 on NCCL. Skipped
without a CUDA GPU; run on a GPU machine with `make setup EXTRA=gpu` then
`.venv/bin/python -m pytest -m gpu tests/gpu`."""

import json

import pytest

pytestmark = pytest.mark.gpu


def _run(tmp_path, *overrides):
    import torch

    from rlhf.config import DPOConfig, parse_args
    from rlhf.dpo import run

    n = torch.cuda.device_count()
    cfg = parse_args(DPOConfig, [f"output.dir={tmp_path}", "cluster.use_gpu=true",
                                 f"cluster.num_workers={n}", "cluster.cpus_per_worker=1",
                                 f"train.global_batch_size={4 * n}", "train.micro_batch_size=4",
                                 "data.demo_pairs=256", "data.demo_eval_pairs=32",
                                 "model.dtype=bf16", *overrides], "rlhf.dpo")
    return json.loads((run(cfg) / "summary.json").read_text())


def test_qlora_bf16(tmp_path):
    s = _run(tmp_path, "model.lora.enabled=true", "model.lora.load_in_4bit=true",
             "cluster.zero_stage=2", "train.learning_rate=1e-3")
    assert s["eval/rewards/accuracy"] > 0.6


def test_zero3_bf16_full(tmp_path):
    s = _run(tmp_path, "cluster.zero_stage=3", "model.gradient_checkpointing=true")
    assert s["eval/rewards/accuracy"] > 0.6
