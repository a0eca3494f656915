"""DPO's micro-step: the policy's and the reference's summed response log-probs of each
pair, the loss of loss.type (rlhf.core.losses.dpo_loss: TRL's DPO family, alone or
weighted; the reference-free SimPO, CPO and ORPO), the chosen-NLL term, and the
implicit-reward metrics.

The reference is a frozen DeepSpeed engine (moved towards the policy every N steps with
TR-DPO's loss.reference_sync_every), the policy with its LoRA adapters off, log-probs
streamed in with the pairs (loss.precompute_reference: rlhf.train.reference), or none
(SimPO, CPO, ORPO: no reference is loaded).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf.config import DPOConfig
from rlhf.core.logprobs import split_pairs
from rlhf.core.losses import dpo_loss, sft_weight
from rlhf.train.moving_reference import MovingReference
from rlhf.train.reference import PAIR_REFERENCE, streamed_logps
from rlhf.train.tasks.base import PairTask, reference_logps, response_logps

METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
               "rewards/margin", "logps/chosen", "logps/rejected", "nll")


def _pair_forward(engine, ref_engine, batch, cfg, device, grad: bool, rows: list[dict],
                  timer=None):
    """Policy (and reference) forward on one micro-batch -> losses and rewards (B,)."""
    lo = cfg.loss
    with torch.set_grad_enabled(grad):
        logps, ntok = response_logps(engine, batch, device, ld_alpha=lo.ld_alpha)
    if timer:
        timer.mark("forward")
    ref_c = ref_r = None
    if lo.precompute_reference:  # streamed in with the pairs: no forward here
        ref_c, ref_r = streamed_logps(rows, PAIR_REFERENCE, logps.device)
    elif not lo.reference_free:
        ref_logps, _ = reference_logps(engine, ref_engine, batch, device, ld_alpha=lo.ld_alpha)
        ref_c, ref_r = split_pairs(ref_logps)
        if timer:
            timer.mark("reference")
    pc, pr = split_pairs(logps)
    nc, nr = split_pairs(ntok)
    out = dpo_loss(pc, pr, ref_c, ref_r, loss_type=lo.type, weights=lo.weights,
                   beta=lo.beta, label_smoothing=lo.label_smoothing, chosen_lengths=nc,
                   rejected_lengths=nr, simpo_gamma=lo.simpo_gamma,
                   f_divergence=lo.f_divergence, f_alpha=lo.f_alpha,
                   discopop_tau=lo.discopop_tau, alphapo=lo.alphapo)
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
        lo = self.cfg.loss
        # the whole weight of the chosen NLL in the loss as trained and as reported:
        # RPO's / CPO's / ORPO's, plus an "sft" type's
        self.nll_weight = lo.nll_weight + sft_weight(lo.type, lo.weights)
        moving = (f", moved towards the policy every {lo.reference_sync_every} steps by "
                  f"{lo.reference_mixup} (TR-DPO)") if lo.reference_sync_every else ""
        self.ref_engine = self.build_reference(
            lc, world,
            none_because=(f"none (loss.type={lo.type[0]} needs none)" if lo.reference_free
                          else "none here: its log-probs come with the pairs"
                          if lo.precompute_reference else ""), note=moving)
        self.moving = MovingReference(self.ref_engine, lo.reference_sync_every,
                                      lo.reference_mixup)

    # TR-DPO: a reference that moves (rlhf/train/moving_reference.py)

    def end_step(self, engine, step: int, timer) -> None:
        if self.moving.step(engine, step) and timer:
            timer.mark("reference_sync")

    def save_state(self, folder: Path) -> None:
        self.moving.save(folder)

    def load_state(self, folder: Path) -> None:
        self.moving.load(folder)

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
        if self.nll_weight:  # a token mean over the global batch's chosen responses
            nll = -pc.sum() * (k / max(totals["chosen_tokens"], 1))
            loss = loss + self.nll_weight * nll
        return loss * w, sums

    def metrics(self, sums: dict, totals: dict | None, split: str) -> dict:
        n = sums["pairs"]
        out = {f"{split}/{k}": sums[k] / max(n, 1) for k in METRIC_KEYS}
        tokens = totals["chosen_tokens"] if totals else sums["scored_chosen_tokens"]
        out[f"{split}/nll"] = sums["nll"] / max(tokens, 1)
        # the loss as trained: the pair terms plus the chosen NLL's (RPO, CPO, ORPO, "sft")
        out[f"{split}/loss"] += self.nll_weight * out[f"{split}/nll"]
        if split == "eval":
            out["eval/pairs"] = int(n)
        return out

    @staticmethod
    def summary_line(s: dict) -> str:
        return (f"held-out reward accuracy {s['eval/rewards/accuracy']:.3f}, margin "
                f"{s['eval/rewards/margin']:+.3f} over {s['eval/pairs']} pairs")
