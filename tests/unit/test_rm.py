"""The reward model's scores, loss and metrics against TRL 1.16's RewardTrainer, end to
end from the same strings on the same tiny model, within 1e-5 in fp32; and where the
score is read, by hand. TRL is a test-only dependency; no Ray here."""

import copy
import os
import tempfile

import pytest
import torch

os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1",
                  WANDB_DISABLED="true")

from rlhf.config import RMConfig  # noqa: E402
from rlhf.core.logprobs import pack_pairs, pad_pairs, sequence_end_values  # noqa: E402


def test_score_position_by_hand():
    P, C, R = [[1, 2], [3]], [[4], [5, 6, 0]], [[8, 9], [10]]  # pad id 0 ends chosen 1
    values = torch.arange(20.0)[None]  # value = position
    packed = pack_pairs(P, C, R)  # row: 1 2 4 8 9 3 5 6 0 10
    assert sequence_end_values(values[:, :10], packed).tolist() == [2, 8, 4, 9]
    # reading as transformers does (last token that is not padding): 6 at position 7
    assert sequence_end_values(values[:, :10], packed, pad_id=0).tolist() == [2, 7, 4, 9]
    padded = pad_pairs(P, C, R, pad_id=0)
    rows = torch.arange(4.0)[:, None] * 100 + torch.arange(padded["input_ids"].shape[1])
    # rows: c0 = 1 2 4, c1 = 3 5 6 0, r0 = 1 2 8 9, r1 = 3 10
    assert sequence_end_values(rows, padded).tolist() == [2, 103, 203, 301]
    assert sequence_end_values(rows, padded, pad_id=0).tolist() == [2, 102, 203, 301]


def _rows():
    from rlhf.data.demo import demo_pair

    pairs = [demo_pair(i) for i in range(4)]
    pairs.append({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello! How can I help?",
                  "rejected": " no"})
    return pairs


@pytest.fixture(scope="module")
def reward_model(tiny_model_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1,
                                                           dtype=torch.float32)
    with torch.no_grad():  # a head that separates the texts, so rewards are not all equal
        m.score.weight.normal_(0, 0.5)
    return m.eval()


@pytest.mark.parametrize("packing", [True, False])
def test_matches_trl_reward_trainer(reward_model, tokenizer, tiny_model_path, packing):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from cluster.models import load_causal_lm
    from rlhf.data.pipeline import tokenize_pair
    from rlhf.core.losses import bradley_terry_loss
    from rlhf.train.tasks.rm import RMTask

    data = _rows()
    margins = [0.5, 0.0, 1.0, 0.2, 0.0]  # Llama 2's margin term, as TRL reads it
    ds = Dataset.from_dict({**{k: [r[k] for r in data] for k in ("prompt", "chosen", "rejected")},
                            "margin": margins})
    args = trl.RewardConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(data),
                            bf16=False, fp16=False, use_cpu=True, report_to="none",
                            max_length=1024, disable_tqdm=True, dataloader_pin_memory=False,
                            center_rewards_coefficient=0.01)
    trainer = trl.RewardTrainer(model=copy.deepcopy(reward_model), args=args, train_dataset=ds,
                                processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    trainer.model.train()  # TRL records its metrics in training mode (no dropout here)
    with torch.no_grad():
        trl_loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    trl_c, trl_r = torch.chunk(out.logits.squeeze(-1), 2)

    # ours: the pipeline's tokenisation, the worker's batch layout and score position
    cfg = RMConfig()
    cfg.data.packing = packing
    task = RMTask(cfg)
    model = load_causal_lm(tiny_model_path, cfg.model, trainable=False, use_gpu=False,
                           packing=packing, reward_head=True)
    model.load_state_dict(reward_model.state_dict())
    task.pad_id = tokenizer.pad_token_id
    task.prepare(model, {}, world=1, accum=1)
    rows = []
    for r in data:
        p, c, rj, *_ = tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], False,
                                     1024, 512, "truncate")
        rows.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": rj})
    with torch.no_grad():
        rc, rr = task.rewards(model, rows)
    assert torch.allclose(rc, trl_c, atol=1e-5) and torch.allclose(rr, trl_r, atol=1e-5)
    ours = bradley_terry_loss(rc, rr, margin=torch.tensor(margins),
                              center_coefficient=0.01).mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    m = trainer._metrics["train"]
    assert (rc > rr).float().mean().item() == pytest.approx(m["accuracy"][-1], abs=1e-6)
    assert (rc - rr).mean().item() == pytest.approx(m["margin"][-1], abs=1e-5)
