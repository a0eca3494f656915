"""A reward model on Ray Train + DeepSpeed ZeRO: a causal LM backbone with a scalar
head, trained with the Bradley-Terry loss on the preference pairs DPO reads.

    python -m rlhf.rm                        # laptop: local Ray, CPU, tiny model, demo pairs
    python -m rlhf.rm model.name_or_path=runs/sft-.../model cluster.zero_stage=3
    python -m rlhf.rm --config launch/recipes/rm-llama3-8b.yaml
    python -m rlhf.rm --help                 # every field, its default and meaning

The score of (prompt, response) is the head's output at the last token of
prompt + response + EOS (or the chat template's closing turn), exactly where
transformers' AutoModelForSequenceClassification reads it; the export records this in
rlhf_reward.json so that PPO and evaluation score as training did. With data.packing
each pair runs as [prompt | chosen | rejected], the prompt once (rlhf/core/attention.py).

Reads top to bottom: what a micro-batch computes (`RMTask`), then the shared driver
(rlhf/train/runner.py) and worker loop (cluster/loop.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from cluster.loop import PairTask
from rlhf.config import RMConfig, build

NAN_ADVICE = ("Likely causes: a learning rate too high for this model (try half) or fp16 "
              "overflow (use bf16 or fp32). The last good checkpoint is kept; fix the "
              "setting and rerun with train.resume=true.")

METRIC_KEYS = ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margin")


class RMTask(PairTask):
    """What cluster.loop.train_loop needs to train a reward model (see its docstring)."""

    nan_advice = NAN_ADVICE
    reward_head = True

    def prepare(self, engine, lc: dict, world: int, accum: int) -> None:
        from cluster.models import score_head

        self.world, self.accum = world, accum
        self._values = None

        def keep(module, inputs, output):  # the head's output at every position
            self._values = output

        score_head(engine).register_forward_hook(keep)

    def rewards(self, engine, rows: list[dict]):
        """(chosen (B,), rejected (B,)) scores of a micro-batch (empty: the dummy pair),
        float32."""
        from rlhf.core.logprobs import model_inputs, sequence_end_values, split_pairs

        batch = self.batch(rows)
        inputs = model_inputs(batch, engine.device)
        inputs.pop("logits_to_keep", None)  # a causal-LM option; the head is per position
        engine(**inputs)
        return split_pairs(sequence_end_values(self._values[..., 0].float(), batch,
                                               pad_id=self.pad_id))

    def micro_step(self, engine, rows: list[dict], totals: dict | None, grad: bool, timer):
        import torch

        from rlhf.core.losses import bradley_terry_loss

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
        from cluster.models import export_hf

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


def train_loop_per_worker(lc: dict) -> None:
    """Runs on every Ray Train worker. Everything it needs comes in `lc`."""
    from cluster.loop import train_loop

    train_loop(lc, RMTask(build(RMConfig, lc["config"])))


# ============================================================================ driver


def run(cfg: RMConfig, dataset: Any = None, eval_dataset: Any = None, *,
        crash_once_at_step: int | None = None) -> Path:
    """Train; returns the run directory (see rlhf.train.runner.run_training for the arguments)."""
    from rlhf.train.runner import run_training

    return run_training(cfg, prefix="rm", loop=train_loop_per_worker, dataset=dataset,
                        eval_dataset=eval_dataset, plot_keys=("loss", "accuracy"),
                        crash_once_at_step=crash_once_at_step)


def main(argv: list[str] | None = None) -> int:
    from rlhf.train import runner

    return runner.main(RMConfig, "rlhf.rm", run, lambda s: (
        f"held-out pairwise accuracy {s['eval/accuracy']:.3f}, margin "
        f"{s['eval/rewards/margin']:+.3f} over {s['eval/pairs']} pairs"), argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
