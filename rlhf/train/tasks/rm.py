"""The reward model's micro-step: a causal LM backbone with a scalar head, scored at the
last token of prompt + response + EOS (or the chat template's closing turn), exactly
where transformers' AutoModelForSequenceClassification reads it, trained with the
Bradley-Terry loss (an optional margin, and centring). The export records how it scores
in rlhf_reward.json, so that PPO and evaluation score as training did. With data.packing
each pair runs as [prompt | chosen | rejected], the prompt once (rlhf/core/attention.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cluster.models import export_hf, score_head
from rlhf.config import RMConfig
from rlhf.core.logprobs import model_inputs, sequence_end_values, split_pairs
from rlhf.core.losses import bradley_terry_loss
from rlhf.train.tasks.base import PairTask

METRIC_KEYS = ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margin")


class RMTask(PairTask):
    """A reward model on preference pairs (rlhf.rm)."""

    config_cls = RMConfig
    prefix = "rm"
    plot_keys = ("loss", "accuracy")
    reward_head = True

    def prepare(self, engine, lc: dict, world: int, accum: int) -> None:
        super().prepare(engine, lc, world, accum)
        self._values = None

        def keep(module, inputs, output):  # the head's output at every position
            self._values = output

        score_head(engine).register_forward_hook(keep)

    def rewards(self, engine, rows: list[dict]):
        """(chosen (B,), rejected (B,)) scores of a micro-batch (empty: the dummy pair),
        float32."""
        batch = self.batch(rows)
        inputs = model_inputs(batch, engine.device)
        inputs.pop("logits_to_keep", None)  # a causal-LM option; the head is per position
        engine(**inputs)
        return split_pairs(sequence_end_values(self._values[..., 0].float(), batch,
                                               pad_id=self.pad_id))

    def micro_step(self, engine, rows: list[dict], totals: dict | None, grad: bool, timer):
        with torch.set_grad_enabled(grad):
            rc, rr = self.rewards(engine, rows)
        if timer:
            timer.mark("forward")
        margin = None
        if self.cfg.data.columns.margin and rows:
            margin = torch.tensor([float(r["margin"]) for r in rows], device=rc.device)
        losses = bradley_terry_loss(rc, rr, margin=margin,
                                    center_coefficient=self.cfg.loss.center_coefficient)
        w = 1.0 if rows else 0.0
        c, r = rc.detach(), rr.detach()
        sums = {k: w * float(v) for k, v in zip(METRIC_KEYS, (
            losses.detach().sum(), (c > r).float().sum(), c.sum(), r.sum(), (c - r).sum()))}
        sums["pairs"] = w * len(rows)
        if totals is None:
            return None, sums
        # The global-batch mean however the batch was split (see DPOTask.micro_step).
        return losses.sum() * (self.world * self.accum / totals["samples"]) * w, sums

    def metrics(self, sums: dict, totals: dict | None, split: str) -> dict:
        n = sums["pairs"]
        out = {f"{split}/{k}": sums[k] / max(n, 1) for k in METRIC_KEYS}
        if split == "eval":
            out["eval/pairs"] = int(n)
        return out

    def export(self, full_state: dict, out_dir: Path) -> None:
        export_hf(full_state, self.model_path, out_dir, self.cfg.model, self.tok,
                  reward_head=True)
        d = self.cfg.data
        (out_dir / "rlhf_reward.json").write_text(json.dumps({
            "score": "the head's output at the last token of the tokenised prompt + "
                     "response, as AutoModelForSequenceClassification reads it",
            "text": "prompt + response + eos_token (plain text), or the chat template "
                    "applied to prompt + response messages (conversational data)",
            "eos_appended": True, "max_length": d.max_length,
            "max_prompt_length": d.max_prompt_length, "truncation": d.truncation,
            "center_coefficient": self.cfg.loss.center_coefficient}, indent=2))

    @staticmethod
    def summary_line(s: dict) -> str:
        return (f"held-out pairwise accuracy {s['eval/accuracy']:.3f}, margin "
                f"{s['eval/rewards/margin']:+.3f} over {s['eval/pairs']} pairs")
