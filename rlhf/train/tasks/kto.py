"""KTO's step on unpaired examples (rlhf.kto): first the KL reference point z0 over the
whole global batch, then each micro-batch's losses against it.

begin_step runs the policy and the reference, without gradients, on every micro-batch's
mismatched pairs (prompt, another example's completion: rlhf.data.unpaired), and sums
log pi - log pi_ref and the pair count over the micro-batches and the workers: z0 is the
global mean, clamped at 0 (rlhf.core.losses.kl_reference_point). TRL estimates it per
device and averages the devices' estimates; here the loss is the same however the global
batch is split over workers and micro-batches. micro_step then runs the policy (with
gradients) and the reference on the examples themselves: rlhf.core.losses.kto_loss,
normalised by the global example count.

The reference is a frozen DeepSpeed engine, or the policy with its LoRA adapters off.
"""

from __future__ import annotations

import torch

from cluster.worker import all_reduce_sums
from rlhf.config import KTOConfig
from rlhf.core.logprobs import dummy_unpaired_rows, rows_response_batch
from rlhf.core.losses import kl_reference_point, kto_loss
from rlhf.data.unpaired import UNPAIRED
from rlhf.train.tasks.base import PAIR_FLAGS, Task, response_logps

SIDES = ("chosen", "rejected")  # desirable, undesirable: TRL's metric names


class KTOTask(Task):
    """KTO on unpaired preference data (rlhf.kto)."""

    config_cls = KTOConfig
    prefix = "kto"
    rows = UNPAIRED
    name = "examples"
    flags = PAIR_FLAGS
    plot_keys = ("loss", "kl")
    nan_causes = ("a learning rate too high for this model (try half), a beta too small, or "
                  "fp16 overflow (use bf16 or fp32)")

    def dummy_rows(self, token_id: int) -> list[dict]:
        return dummy_unpaired_rows(token_id)

    def batch_builder(self):
        return rows_response_batch

    def prepare(self, engine, lc: dict, world: int, accum: int) -> None:
        super().prepare(engine, lc, world, accum)
        self.engine, self.kl = engine, 0.0
        self.ref_engine = self.build_reference(lc, world)

    # ---------------------------------------------------------------- log-probs, z0

    def _logps(self, engine, rows: list[dict], grad: bool, response: str = "completion_ids"):
        """(policy (B,), reference (B,)) summed log-probs of each row's `response` given
        its prompt; the dummy row (weight 0) for rows == []."""
        cfg = self.cfg
        batch = rows_response_batch(rows or self.dummy, pad_id=self.pad_id,
                                    packing=cfg.data.packing,
                                    attn_implementation=cfg.model.attn_implementation,
                                    response=response)
        with torch.set_grad_enabled(grad):
            policy, _ = response_logps(engine, batch, engine.device)
        with torch.no_grad():
            if self.ref_engine is not None:
                ref, _ = response_logps(self.ref_engine, batch, engine.device)
            else:  # LoRA: the base model is the policy with its adapters off
                ref, _ = response_logps(engine, batch, engine.device, adapters_off=True)
        return policy, ref

    def _kl_sums(self, engine, micro_batches: list[list[dict]]) -> dict[str, float]:
        """This worker's sum of log pi - log pi_ref over its mismatched pairs, and their
        count (every micro-batch runs, empty ones as the zero-weight dummy: ZeRO-3's
        gathers need every rank)."""
        out = {"kl_sum": 0.0, "kl_n": 0.0}
        with torch.no_grad():
            for rows in micro_batches:
                policy, ref = self._logps(engine, rows, False, "kl_completion_ids")
                if rows:
                    out["kl_sum"] += float((policy - ref).sum())
                    out["kl_n"] += len(rows)
        return out

    def begin_step(self, micro_batches: list[list], timer) -> None:
        if self.cfg.loss.type != "kto":  # apo_zero_unpaired has no reference point
            return
        sums = all_reduce_sums(self._kl_sums(self.engine, micro_batches))
        self.kl = kl_reference_point(sums["kl_sum"], sums["kl_n"])
        if timer:
            timer.mark("kl")

    # --------------------------------------------------------------------------- a step

    def step_counts(self, micro_batches: list[list[dict]]) -> dict[str, float]:
        rows = [r for mb in micro_batches for r in mb]
        n = sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
        return {"samples": len(rows), "tokens": n, "unique_tokens": n}

    def micro_step(self, engine, rows: list[dict], totals: dict | None, grad: bool, timer):
        lo = self.cfg.loss
        policy, ref = self._logps(engine, rows, grad)
        if timer:
            timer.mark("forward")
        labels = torch.tensor([bool(r["label"]) for r in rows or self.dummy],
                              device=policy.device)
        out = kto_loss(policy, ref, labels, self.kl, loss_type=lo.type, beta=lo.beta,
                       desirable_weight=lo.desirable_weight,
                       undesirable_weight=lo.undesirable_weight)
        w = 1.0 if rows else 0.0
        sums = {"loss": w * float(out.losses.detach().sum()), "examples": w * len(rows)}
        for side, mask in zip(SIDES, (labels, ~labels)):
            sums[f"n/{side}"] = w * float(mask.sum())
            sums[f"rewards/{side}"] = w * float(out.rewards[mask].sum())
            sums[f"logps/{side}"] = w * float(policy.detach()[mask].sum())
        if totals is None:  # evaluation: the held-out KL estimate too
            if lo.type == "kto":
                sums.update(self._kl_sums(engine, [rows]))
            return None, sums
        # DeepSpeed divides by accum and averages over workers; scaling by
        # world * accum / n_global makes the update the mean over the global batch.
        loss = out.losses.sum() * (self.world * self.accum / totals["samples"])
        return loss * w, sums

    def metrics(self, sums: dict, totals: dict | None, split: str) -> dict:
        out = {f"{split}/loss": sums["loss"] / max(sums["examples"], 1)}
        for side in SIDES:
            n = max(sums[f"n/{side}"], 1)
            out[f"{split}/rewards/{side}"] = sums[f"rewards/{side}"] / n
            out[f"{split}/logps/{side}"] = sums[f"logps/{side}"] / n
        out[f"{split}/rewards/margin"] = (out[f"{split}/rewards/chosen"]
                                          - out[f"{split}/rewards/rejected"])
        if split == "eval":
            out["eval/examples"] = int(sums["examples"])
            out["eval/kl"] = kl_reference_point(sums.get("kl_sum", 0.0), sums.get("kl_n", 0.0))
        else:
            out["train/kl"] = self.kl
        return out

    @staticmethod
    def summary_line(s: dict) -> str:
        return (f"held-out rewards: desirable {s['eval/rewards/chosen']:+.3f}, undesirable "
                f"{s['eval/rewards/rejected']:+.3f} (margin {s['eval/rewards/margin']:+.3f}) "
                f"over {s['eval/examples']} examples")
