"""Our tokenisation, log-probs and losses against TRL 1.16's DPOTrainer, end to end
from the same strings on the same tiny model, within 1e-5 in fp32: all 15 loss types,
MPO's weighted mix, the f-divergences and LD-DPO; CPO (with AlphaPO) and ORPO against
trl.experimental's loss functions on the same log-probs.

TRL is a test-only dependency. No Ray here: the worker computes exactly this chain
(tokenize_pair -> pad_pairs -> forward -> sequence_logprobs -> dpo_loss).
"""

import copy
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch

os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1",
                  WANDB_DISABLED="true")

trl = pytest.importorskip("trl")

from rlhf.data.pipeline import tokenize_pair  # noqa: E402
from rlhf.data.demo import demo_pair  # noqa: E402
from rlhf.core.logprobs import (ld_sums, pad_pairs, response_batch,  # noqa: E402
                                scored_token_logprobs, sequence_logprobs, split_pairs)
from rlhf.config.sections import DPO_LOSS_TYPES  # noqa: E402
from rlhf.core.losses import (dpo_loss, kl_reference_point, kto_loss,  # noqa: E402
                              reference_free_loss)
from rlhf.data.unpaired import tokenize_kto_batch  # noqa: E402

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


def trl_metrics(policy, ref, tok, loss_types, weights=None, **kw):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = rows()
    ds = Dataset.from_dict({k: [r[k] for r in data] for k in ("prompt", "chosen", "rejected")})
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(data),
                     bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
                     report_to="none", beta=BETA, loss_type=loss_types, loss_weights=weights,
                     max_length=1024, remove_unused_columns=False, disable_tqdm=True, seed=0,
                     dataloader_pin_memory=False, **kw)
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                         train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ds))])
    trainer.model.train()  # metrics are filed under the model's mode; no dropout here
    loss = trainer.compute_loss(trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics


def our_logps(model, tok, ld_alpha=None):
    """(chosen sums, rejected sums, chosen lengths, rejected lengths) as the worker gets
    them, plain or LD-DPO-weighted."""
    toks = [tokenize_pair(tok, r["prompt"], r["chosen"], r["rejected"], False, 1024, 512,
                          "truncate") for r in rows()]
    batch = pad_pairs([t[0] for t in toks], [t[1] for t in toks], [t[2] for t in toks],
                      tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    if ld_alpha is None:
        lp, n = sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"])
    else:
        per_token, seq = scored_token_logprobs(logits, batch)
        lp, n = ld_sums(per_token, seq, batch["input_ids"].shape[0], ld_alpha)
    return (*split_pairs(lp), *split_pairs(n))


def ours(policy, ref, tok, loss_type, rpo_alpha=0.0, ld_alpha=None, **kw):
    pc, pr, nc, nr = our_logps(policy, tok, ld_alpha)
    rc, rr, _, _ = our_logps(ref, tok, ld_alpha)
    out = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=BETA, chosen_lengths=nc,
                   rejected_lengths=nr, **kw)
    nll = -pc.sum() / nc.sum()  # the token mean over the batch, as the worker normalises
    loss = out.losses.mean() + (rpo_alpha + out.nll_weight) * nll
    return loss.item(), {
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean().item(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean().item(),
        "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item()}


# (TRL's loss_type list, its loss_weights, the other DPOConfig settings): every loss type
# alone, with label smoothing where TRL reads it; MPO's weighted mix; the f-divergences;
# LD-DPO. TRL's "sigmoid" ignores label_smoothing since 1.x (ours keeps cDPO's): none here.
CASES = [([t], None, {}) for t in DPO_LOSS_TYPES
         if t not in ("robust", "exo_pair", "aot", "aot_unpaired")] + [
    (["robust"], None, {"label_smoothing": 0.1}),
    (["exo_pair"], None, {"label_smoothing": 1e-3}),
    (["aot"], None, {"label_smoothing": 0.1}),
    (["aot_unpaired"], None, {}),
    (["discopop"], None, {"discopop_tau": 0.2}),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),
    (["sigmoid"], None, {"f_divergence_type": "forward_kl"}),
    (["sigmoid"], None, {"f_divergence_type": "js_divergence"}),
    (["hinge", "ipo"], [1.0, 0.5], {"f_divergence_type": "alpha_divergence",
                                    "f_alpha_divergence_coef": 0.3}),
    (["sigmoid"], None, {"ld_alpha": 0.5}),
]
OUR_NAMES = {"f_divergence_type": "f_divergence", "f_alpha_divergence_coef": "f_alpha"}


@pytest.mark.parametrize("types,weights,kw", CASES,
                         ids=lambda c: ",".join(map(str, c)) if isinstance(c, list) else
                         "-".join(f"{k}={v}" for k, v in c.items()) if isinstance(c, dict)
                         else "")
def test_matches_trl(models, tokenizer, types, weights, kw):
    policy, ref = models
    trl_loss, trl_m = trl_metrics(policy, ref, tokenizer, types, weights, **kw)
    our_loss, our_m = ours(policy, ref, tokenizer, types, weights=weights,
                           **{OUR_NAMES.get(k, k): v for k, v in kw.items()})
    # float32 sums: 1e-5 absolute, or 1e-6 of a large loss (alpha-divergence IPO: ~5e3)
    assert our_loss == pytest.approx(trl_loss, abs=1e-5, rel=1e-6)
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


# AlphaPO with simpo only: on summed log-probs (~-200 here) TRL's exp(log p) underflows to
# 0 in float32 and its loss is inf/nan, where ours (-expm1(-alpha log p) / alpha) is
# finite; test_losses checks that case by hand.
@pytest.mark.parametrize("loss_type,alpha", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                             ("simpo", 0.0), ("simpo", 0.3)])
def test_cpo_and_alphapo_match_trl(models, tokenizer, loss_type, alpha):
    """Our reference-free CPO family against trl.experimental's CPOTrainer.cpo_loss on the
    same log-probs (sums, or per-token means for ipo and simpo, as CPO computes them)."""
    from trl.experimental.cpo import CPOTrainer

    policy, _ = models
    pc, pr, nc, nr = our_logps(policy, tokenizer)
    mean = loss_type in ("ipo", "simpo")
    trl_self = SimpleNamespace(alpha=alpha, loss_type=loss_type, beta=BETA,
                               label_smoothing=0.1 if loss_type == "sigmoid" else 0.0,
                               simpo_gamma=0.5, accelerator=SimpleNamespace(device="cpu"))
    want = CPOTrainer.cpo_loss(trl_self, pc / nc if mean else pc, pr / nr if mean else pr)
    ours_type = {"sigmoid": "cpo", "hinge": "cpo_hinge", "ipo": "cpo_ipo"}.get(loss_type,
                                                                             loss_type)
    # CPO's simpo_gamma is the margin itself; ours is gamma / beta (TRL's gamma_beta_ratio)
    got = reference_free_loss(pc, pr, loss_type=ours_type, beta=BETA,
                              label_smoothing=trl_self.label_smoothing, chosen_lengths=nc,
                              rejected_lengths=nr, simpo_gamma=0.5 / BETA, alphapo=alpha)
    for ours_t, trl_t in zip((got.losses, got.chosen_rewards, got.rejected_rewards), want):
        assert ours_t.tolist() == pytest.approx(trl_t.tolist(), abs=1e-5, rel=1e-6)


def test_orpo_matches_trl(models, tokenizer):
    """ORPO's odds-ratio term against trl.experimental's ORPOTrainer.odds_ratio_loss (which
    it subtracts from the NLL; we add its negation) on per-token mean log-probs."""
    from trl.experimental.orpo import ORPOTrainer

    policy, _ = models
    pc, pr, nc, nr = our_logps(policy, tokenizer)
    trl_self = SimpleNamespace(beta=BETA, accelerator=SimpleNamespace(device="cpu"))
    want, want_c, want_r, _, _ = ORPOTrainer.odds_ratio_loss(trl_self, pc / nc, pr / nr)
    got = reference_free_loss(pc, pr, loss_type="orpo", beta=BETA, chosen_lengths=nc,
                              rejected_lengths=nr)
    assert got.losses.tolist() == pytest.approx((-want).tolist(), abs=1e-5)
    assert got.chosen_rewards.tolist() == pytest.approx(want_c.tolist(), abs=1e-6)
    assert got.rejected_rewards.tolist() == pytest.approx(want_r.tolist(), abs=1e-6)


def unpaired_rows():
    """Unpaired examples with distinct prompts: the demo's chosen answers (desirable) and
    rejected ones (undesirable), alternating."""
    out = []
    for i, p in enumerate(rows()):
        out.append({"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"],
                    "label": bool(i % 2)})
    return out


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(models, tokenizer, tiny_model_path, loss_type):
    """KTO end to end from the same strings: our tokenising (rlhf.data.unpaired, whose
    mismatched completion for row i is row i-1's when prompts differ, as TRL rotates
    them), log-probs, KL point and loss against TRL 1.16's KTOTrainer on one batch."""
    import numpy as np
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    # the perturbed model as the reference: the unperturbed one gives the mismatched
    # completions more probability, so the KL point is positive, not clamped to 0
    ref, policy = models
    data = unpaired_rows()
    args = KTOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(data),
                     bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
                     report_to="none", beta=BETA, loss_type=loss_type, max_length=1024,
                     desirable_weight=1.0, undesirable_weight=0.8,
                     remove_unused_columns=False, disable_tqdm=True, seed=0,
                     dataloader_pin_memory=False)
    ds = Dataset.from_dict({k: [r[k] for r in data] for k in ("prompt", "completion", "label")})
    trainer = KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                         train_dataset=ds, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ds))])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch).item()
    trl_m = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    cols = {k: np.array([r[k] for r in data], dtype=object) for k in ("prompt", "completion")}
    table = tokenize_kto_batch({"id": np.arange(len(data)), "drop": np.array([""] * len(data)),
                                "label": np.array([r["label"] for r in data]),
                                "chat": np.array([False] * len(data)), **cols},
                               tiny_model_path, 1024, 512, "truncate").to_pylist()
    sums = {}
    for name, model in (("policy", policy), ("ref", ref)):
        model.eval()
        for key in ("completion_ids", "kl_completion_ids"):
            b = response_batch([r["prompt_ids"] for r in table], [r[key] for r in table],
                               pad_id=tokenizer.pad_token_id, packing=False)
            with torch.no_grad():
                sums[name, key] = sequence_logprobs(
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                    b["input_ids"], b["loss_mask"])[0]
    kl = kl_reference_point(float((sums["policy", "kl_completion_ids"]
                                   - sums["ref", "kl_completion_ids"]).sum()), len(table))
    labels = torch.tensor([r["label"] for r in table])
    out = kto_loss(sums["policy", "completion_ids"], sums["ref", "completion_ids"], labels,
                   kl if loss_type == "kto" else 0.0, loss_type=loss_type, beta=BETA,
                   desirable_weight=1.0, undesirable_weight=0.8)
    assert out.losses.mean().item() == pytest.approx(trl_loss, abs=1e-5)
    if loss_type == "kto":
        assert kl == pytest.approx(trl_m["kl"], abs=1e-5) and kl > 0
    assert out.rewards[labels].mean().item() == pytest.approx(trl_m["rewards/chosen"], abs=1e-5)
    assert out.rewards[~labels].mean().item() == pytest.approx(trl_m["rewards/rejected"],
                                                               abs=1e-5)
    assert sums["policy", "completion_ids"][labels].mean().item() == pytest.approx(
        trl_m["logps/chosen"], rel=1e-6)
