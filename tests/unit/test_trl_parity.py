"""Our tokenisation, log-probs and losses against TRL 1.16's DPOTrainer, end to end
from the same strings on the same tiny model, within 1e-5 in fp32.

TRL is a test-only dependency. No Ray here: the worker computes exactly this chain
(tokenize_pair -> pad_pairs -> forward -> sequence_logprobs -> dpo_loss).
"""

import copy
import os
import tempfile

import pytest
import torch

os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1",
                  WANDB_DISABLED="true")

trl = pytest.importorskip("trl")

from rlhf.data.pipeline import tokenize_pair  # noqa: E402
from rlhf.data.demo import demo_pair  # noqa: E402
from rlhf.core.logprobs import pad_pairs, sequence_logprobs, split_pairs  # noqa: E402
from rlhf.core.losses import dpo_loss  # noqa: E402

BETA = 0.1


@pytest.fixture(scope="module")
def models(tiny_model_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs, so rewards are not all zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, ref


def rows():
    pairs = [demo_pair(i) for i in range(4)]
    pairs.append({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello! How can I help?",
                  "rejected": " no"})
    return pairs


def trl_metrics(policy, ref, tok, loss_types, weights=None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = rows()
    ds = Dataset.from_dict({k: [r[k] for r in data] for k in ("prompt", "chosen", "rejected")})
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(data),
                     bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
                     report_to="none", beta=BETA, loss_type=loss_types, loss_weights=weights,
                     max_length=1024, remove_unused_columns=False, disable_tqdm=True, seed=0,
                     dataloader_pin_memory=False)
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                         train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ds))])
    trainer.model.train()  # metrics are filed under the model's mode; no dropout here
    loss = trainer.compute_loss(trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics


def ours(policy, ref, tok, loss_type, rpo_alpha=0.0):
    toks = [tokenize_pair(tok, r["prompt"], r["chosen"], r["rejected"], False, 1024, 512,
                          "truncate") for r in rows()]
    batch = pad_pairs([t[0] for t in toks], [t[1] for t in toks], [t[2] for t in toks],
                      tok.pad_token_id)
    policy.eval()
    with torch.no_grad():
        lp, n = sequence_logprobs(policy(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).logits,
                                  batch["input_ids"], batch["loss_mask"])
        rlp, _ = sequence_logprobs(ref(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).logits,
                                   batch["input_ids"], batch["loss_mask"])
    pc, pr = split_pairs(lp)
    rc, rr = split_pairs(rlp)
    nc, nr = split_pairs(n)
    out = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=BETA, chosen_lengths=nc,
                   rejected_lengths=nr)
    loss = out.losses.mean() + rpo_alpha * (-pc.sum() / nc.sum())
    return loss.item(), {
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean().item(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean().item(),
        "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_matches_trl(models, tokenizer, loss_type):
    policy, ref = models
    trl_loss, trl_m = trl_metrics(policy, ref, tokenizer, [loss_type])
    our_loss, our_m = ours(policy, ref, tokenizer, loss_type)
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
    for key, value in our_m.items():
        # logps are sums over ~30 tokens (magnitude ~200): compare relatively as well
        assert value == pytest.approx(trl_m[key], abs=1e-5, rel=1e-6), (key, trl_m)
    assert our_m["rewards/chosen"] != 0.0


def test_rpo_nll_term_matches_trl_sft_loss(models, tokenizer):
    """Our rpo_alpha term equals TRL 1.16's loss_type=[sigmoid, sft] with weights [1, a]."""
    policy, ref = models
    trl_loss, _ = trl_metrics(policy, ref, tokenizer, ["sigmoid", "sft"], [1.0, 0.5])
    our_loss, _ = ours(policy, ref, tokenizer, "sigmoid", rpo_alpha=0.5)
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
