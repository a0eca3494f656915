"""KTO's step on unpaired examples (rlhf.kto): first the KL reference point z0 over the
whole global batch, then each micro-batch's losses against it.

begin_step runs the policy, without gradients, on every micro-batch's mismatched pairs
(prompt, another example's completion: rlhf.data.unpaired), and the reference on both of
each example's responses in one pair batch (the prompt run once when packing; its own
completion's log-probs kept for micro_step), and sums log pi - log pi_ref and the pair
count over the micro-batches and the workers: z0 is the global mean, clamped at 0
(rlhf.core.losses.kl_reference_point). TRL estimates it per device and averages the
devices' estimates; here the loss is the same however the global batch is split over
workers and micro-batches. micro_step then runs the policy (with gradients) on the
examples themselves: rlhf.core.losses.kto_loss, normalised by the global example count.

The reference is a frozen DeepSpeed engine, the policy with its LoRA adapters off, or
none at all with loss.precompute_reference (its log-probs stream in with the examples:
rlhf.train.reference).
"""

from __future__ import annotations

import torch

from cluster.worker import all_reduce_sums
from rlhf.config import KTOConfig
from rlhf.core.logprobs import (UNPAIRED_SIDES, dummy_unpaired_rows, rows_pair_batch,
                                rows_response_batch, split_pairs)
from rlhf.core.losses import kl_reference_point, kto_loss
from rlhf.data.unpaired import UNPAIRED
from rlhf.train.reference import UNPAIRED_REFERENCE, streamed_logps
from rlhf.train.tasks.base import PAIR_FLAGS, Task, reference_logps, response_logps

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
        self.ref_engine = self.build_reference(
            lc, world, none_because=("none here: its log-probs come with the examples"
                                     if self.cfg.loss.precompute_reference else ""))
        # the reference log-probs (B,) of each micro-batch's completions, made by
        # begin_step beside the KL pass and used by micro_step, in the step's order
        self.step_refs: list[torch.Tensor] = []

    # ---------------------------------------------------------------- log-probs, z0

    def _policy(self, engine, rows: list[dict], grad: bool, response: str) -> torch.Tensor:
        """(B,) summed log-probs of each row's `response` given its prompt (the dummy row,
        weight 0, for rows == [])."""
        cfg = self.cfg
        batch = rows_response_batch(rows or self.dummy, pad_id=self.pad_id,
                                    packing=cfg.data.packing,
                                    attn_implementation=cfg.model.attn_implementation,
                                    response=response)
        with torch.set_grad_enabled(grad):
            return response_logps(engine, batch, engine.device)[0]

    def _reference(self, rows: list[dict], kl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(completion (B,), mismatched completion (B,) or None) reference log-probs: as
        streamed in (loss.precompute_reference), or one forward of the reference (kl: on
        both responses as a pair batch, the prompt once)."""
        cfg, rows = self.cfg, rows or self.dummy
        device = self.engine.device
        if cfg.loss.precompute_reference:
            ref, ref_kl = streamed_logps(rows, UNPAIRED_REFERENCE, device)
            return ref, ref_kl
        build = rows_pair_batch if kl else rows_response_batch
        batch = build(rows, pad_id=self.pad_id, packing=cfg.data.packing,
                      attn_implementation=cfg.model.attn_implementation,
                      **({"sides": UNPAIRED_SIDES} if kl else {}))
        ref, _ = reference_logps(self.engine, self.ref_engine, batch, device)
        return split_pairs(ref) if kl else (ref, None)

    def _kl_sums(self, engine, rows: list[dict], ref_kl: torch.Tensor) -> dict[str, float]:
        """One micro-batch's sum of log pi - log pi_ref over its mismatched pairs, and
        their count (an empty micro-batch runs as the zero-weight dummy: ZeRO-3's gathers
        need every rank)."""
        policy = self._policy(engine, rows, False, "kl_completion_ids")
        if not rows:
            return {"kl_sum": 0.0, "kl_n": 0.0}
        return {"kl_sum": float((policy - ref_kl).sum()), "kl_n": float(len(rows))}

    def begin_step(self, micro_batches: list[list], timer) -> None:
        self.step_refs = []
        if self.cfg.loss.type != "kto":  # apo_zero_unpaired has no reference point
            return
        sums = {"kl_sum": 0.0, "kl_n": 0.0}
        for rows in micro_batches:
            ref, ref_kl = self._reference(rows, kl=True)
            self.step_refs.append(ref)
            for key, value in self._kl_sums(self.engine, rows, ref_kl).items():
                sums[key] += value
        sums = all_reduce_sums(sums)
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
        policy = self._policy(engine, rows, grad, "completion_ids")
        if timer:
            timer.mark("forward")
        ref_kl = None
        if self.step_refs:  # training, loss.type kto: begin_step ran the reference
            ref = self.step_refs.pop(0)
        else:  # evaluation (with the held-out KL pairs), or apo_zero_unpaired
            ref, ref_kl = self._reference(rows, kl=totals is None and lo.type == "kto")
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
            if ref_kl is not None:
                sums.update(self._kl_sums(engine, rows, ref_kl))
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
