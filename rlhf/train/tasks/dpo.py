"""DPO's micro-step: the policy's and the reference's summed response log-probs of each
pair, the loss of loss.type (rlhf.core.losses.dpo_loss: sigmoid, ipo, hinge, simpo, ...),
the RPO term, and the implicit-reward metrics.

The reference is a frozen DeepSpeed engine, the policy with its LoRA adapters off, or
log-probs streamed in with the pairs (loss.precompute_reference: rlhf.train.reference).
"""

from __future__ import annotations

import contextlib

import torch

from rlhf.config import DPOConfig
from rlhf.core.logprobs import batch_logprobs, model_inputs, split_pairs
from rlhf.core.losses import dpo_loss
from rlhf.train.tasks.base import PairTask

METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
               "rewards/margin", "logps/chosen", "logps/rejected", "nll")


def _logps(engine, batch: dict, device, adapters_off: bool = False):
    """(2B,) summed response log-probs and token counts of a `pair_batch` (either layout)."""
    ctx = engine.module.disable_adapter() if adapters_off else contextlib.nullcontext()
    with ctx:
        out = engine(**model_inputs(batch, device))
    return batch_logprobs(out.logits, batch)


def _pair_forward(engine, ref_engine, batch, cfg, device, grad: bool, rows: list[dict],
                  timer=None):
    """Policy (and reference) forward on one micro-batch -> losses and rewards (B,)."""
    with torch.set_grad_enabled(grad):
        logps, ntok = _logps(engine, batch, device)
    if timer:
        timer.mark("forward")
    ref_c = ref_r = None
    if cfg.loss.precompute_reference:  # streamed in with the pairs: no forward here
        ref_c = torch.tensor([float(r["ref_chosen"]) for r in rows], device=logps.device)
        ref_r = torch.tensor([float(r["ref_rejected"]) for r in rows], device=logps.device)
    elif cfg.loss.type != "simpo":
        with torch.no_grad():
            if ref_engine is not None:
                ref_logps, _ = _logps(ref_engine, batch, device)
            else:  # LoRA: the base model is the policy with its adapters off
                ref_logps, _ = _logps(engine, batch, device, adapters_off=True)
        ref_c, ref_r = split_pairs(ref_logps)
        if timer:
            timer.mark("reference")
    pc, pr = split_pairs(logps)
    nc, nr = split_pairs(ntok)
    out = dpo_loss(pc, pr, ref_c, ref_r, loss_type=cfg.loss.type, beta=cfg.loss.beta,
                   label_smoothing=cfg.loss.label_smoothing, chosen_lengths=nc,
                   rejected_lengths=nr, simpo_gamma=cfg.loss.simpo_gamma)
    return out, pc, pr, nc


def _sums(out, pc, pr, nc, weight: float) -> list[float]:
    """Per-micro-batch sums of the metrics (divided by the pair count later)."""
    cr, rr = out.chosen_rewards, out.rejected_rewards
    return [weight * float(v) for v in (
        out.losses.detach().sum(), cr.sum(), rr.sum(), (cr > rr).float().sum(),
        (cr - rr).sum(), pc.detach().sum(), pr.detach().sum(), -pc.detach().sum())]


class DPOTask(PairTask):
    """DPO on preference pairs (rlhf.dpo)."""

    config_cls = DPOConfig
    prefix = "dpo"
    plot_keys = ("loss", "rewards/accuracy")
    nan_causes = ("a learning rate too high for this model (try half), a beta too small, or "
                  "fp16 overflow (use bf16 or fp32)")

    def prepare(self, engine, lc: dict, world: int, accum: int) -> None:
        super().prepare(engine, lc, world, accum)
        cfg, self.ref_engine = self.cfg, None
        if (cfg.loss.type != "simpo" and not cfg.model.lora.enabled
                and not cfg.loss.precompute_reference):
            self.ref_engine = self.frozen_reference(lc["ref_path"], world)

    def micro_step(self, engine, rows: list[dict], totals: dict | None, grad: bool, timer):
        cfg = self.cfg
        batch = self.batch(rows)
        if timer:
            timer.mark("batching")
        out, pc, pr, nc = _pair_forward(engine, self.ref_engine, batch, cfg, engine.device,
                                        grad=grad, rows=rows or self.dummy, timer=timer)
        w = 1.0 if rows else 0.0
        sums = dict(zip(METRIC_KEYS, _sums(out, pc, pr, nc, w)))
        sums.update(pairs=w * len(rows), scored_chosen_tokens=w * float(nc.sum()))
        if totals is None:
            return None, sums
        # DeepSpeed divides by accum and averages over workers; scaling by
        # world * accum / n_global makes the update the mean over the global batch
        # however it was split.
        k = self.world * self.accum
        loss = out.losses.sum() * (k / totals["samples"])
        if cfg.loss.rpo_alpha:
            nll = -pc.sum() * (k / max(totals["chosen_tokens"], 1))
            loss = loss + cfg.loss.rpo_alpha * nll
        return loss * w, sums

    def metrics(self, sums: dict, totals: dict | None, split: str) -> dict:
        n = sums["pairs"]
        out = {f"{split}/{k}": sums[k] / max(n, 1) for k in METRIC_KEYS}
        tokens = totals["chosen_tokens"] if totals else sums["scored_chosen_tokens"]
        out[f"{split}/nll"] = sums["nll"] / max(tokens, 1)
        if split == "eval":
            out["eval/pairs"] = int(n)
        return out

    @staticmethod
    def summary_line(s: dict) -> str:
        return (f"held-out reward accuracy {s['eval/rewards/accuracy']:.3f}, margin "
                f"{s['eval/rewards/margin']:+.3f} over {s['eval/pairs']} pairs")
