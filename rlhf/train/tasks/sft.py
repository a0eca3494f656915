"""SFT's micro-step: the mean next-token NLL over every trained token of the global batch
(the loss mask: completions, or the assistant messages of a conversation), however the
batch is split over workers and micro-batches. With data.packing a micro-batch runs as
one row, each example attending to itself only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rlhf.config import SFTConfig
from rlhf.core.logprobs import batch_logprobs, model_inputs
from rlhf.data.examples import EXAMPLES
from rlhf.train.tasks.base import SequenceTask


class SFTTask(SequenceTask):
    """Supervised fine-tuning on examples (rlhf.sft)."""

    config_cls = SFTConfig
    prefix = "sft"
    rows = EXAMPLES
    name = "examples"
    flags = {"truncated": "truncated"}
    eval_at_start = True  # the held-out loss before training, to compare the end with

    def trainable(self, lc: dict):
        model = super().trainable(lc)
        if self.cfg.data.chat_template:  # saved with the export's tokenizer
            self.tok.chat_template = self.cfg.data.chat_template
        return model

    def step_counts(self, micro_batches: list[list[dict]]) -> dict[str, float]:
        rows = [r for mb in micro_batches for r in mb]
        n = sum(len(r["input_ids"]) for r in rows)
        # Trained tokens: the loss is their mean over the global batch. Position 0 is
        # never predicted.
        trained = sum(int(np.asarray(r["loss_mask"][1:]).sum()) for r in rows)
        return {"samples": len(rows), "tokens": n, "unique_tokens": n,
                "trained_tokens": trained}

    def micro_step(self, engine, rows: list[dict], totals: dict | None, grad: bool, timer):
        batch = self.batch(rows)
        if timer:
            timer.mark("batching")
        with torch.set_grad_enabled(grad):
            out = engine(**model_inputs(batch, engine.device))
            logps, ntok = batch_logprobs(out.logits, batch)
            nll = -logps.sum()
        if timer:
            timer.mark("forward")
        w = 1.0 if rows else 0.0
        sums = {"nll": w * float(nll.detach()), "trained_tokens": w * float(ntok.sum()),
                "examples": w * len(rows)}
        if totals is None:
            return None, sums
        # DeepSpeed divides by accum and averages over workers; scaling by
        # world * accum / trained tokens of the global batch makes the update the
        # token-weighted mean however the batch was split.
        return nll * (self.world * self.accum / totals["trained_tokens"]) * w, sums

    def metrics(self, sums: dict, totals: dict | None, split: str) -> dict:
        loss = sums["nll"] / max(sums["trained_tokens"], 1)
        out = {f"{split}/loss": loss, f"{split}/perplexity": math.exp(min(loss, 50.0))}
        if split == "eval":
            out["eval/examples"] = int(sums["examples"])
            out["eval/trained_tokens"] = int(sums["trained_tokens"])
        return out

    @staticmethod
    def summary_line(s: dict) -> str:
        if "start/eval/loss" not in s:
            return f"held-out loss {s['eval/loss']:.3f} over {s['eval/examples']} examples"
        return (f"held-out loss {s['start/eval/loss']:.3f} -> {s['eval/loss']:.3f} (perplexity "
                f"{s['start/eval/perplexity']:.1f} -> {s['eval/perplexity']:.1f}) over "
                f"{s['eval/examples']} examples")
