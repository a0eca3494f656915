"""Supervised fine-tuning on Ray Train + DeepSpeed ZeRO, examples streamed by Ray Data:
the first stage of SFT -> reward model -> PPO.

    python -m rlhf.sft                       # laptop: local Ray, CPU, tiny model, demo data
    python -m rlhf.sft data.path=chats.jsonl model.name_or_path=/models/Llama-3.1-8B
    python -m rlhf.sft --config launch/recipes/sft-llama3-8b.yaml
    python -m rlhf.sft --help                # every field, its default and meaning

Data: prompt/completion pairs, conversations (chat template; loss on the assistant
messages), plain text, or the chosen side of preference pairs (what the embedded
default trains on: the demo's prompts and their chosen answers); see rlhf/data/examples.py.
The loss is the mean next-token NLL over every trained token of the global batch,
however the batch is split over workers and micro-batches. With data.packing (the
default) a micro-batch runs as one row, each example attending to itself only.

Reads top to bottom: what a micro-batch computes (`SFTTask`), then the shared driver
(rlhf/train/runner.py) and worker loop (cluster/loop.py).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

from cluster.loop import Task
from rlhf.config import SFTConfig, build

NAN_ADVICE = ("Likely causes: a learning rate too high for this model (try half) or fp16 "
              "overflow (use bf16 or fp32). The last good checkpoint is kept; fix the "
              "setting and rerun with train.resume=true.")


class SFTTask(Task):
    """What cluster.loop.train_loop needs to fine-tune on examples (see its docstring)."""

    name = "examples"
    flags = {"truncated": "truncated"}
    eval_at_start = True  # the held-out loss before training, to compare the end with
    nan_advice = NAN_ADVICE

    def dummy_rows(self, token_id: int) -> list[dict]:
        from rlhf.core.logprobs import dummy_sequence_rows

        return dummy_sequence_rows(token_id)

    def batch_builder(self):
        from rlhf.core.logprobs import rows_sequence_batch

        return rows_sequence_batch

    def trainable(self, lc: dict):
        model = super().trainable(lc)
        if self.cfg.data.chat_template:  # saved with the export's tokenizer
            self.tok.chat_template = self.cfg.data.chat_template
        return model

    def prepare(self, engine, lc: dict, world: int, accum: int) -> None:
        self.world, self.accum = world, accum

    def step_counts(self, micro_batches: list[list[dict]]) -> dict[str, float]:
        import numpy as np

        rows = [r for mb in micro_batches for r in mb]
        n = sum(len(r["input_ids"]) for r in rows)
        # Trained tokens: the loss is their mean over the global batch. Position 0 is
        # never predicted.
        trained = sum(int(np.asarray(r["loss_mask"][1:]).sum()) for r in rows)
        return {"samples": len(rows), "tokens": n, "unique_tokens": n,
                "trained_tokens": trained}

    def micro_step(self, engine, rows: list[dict], totals: dict | None, grad: bool, timer):
        import torch

        from rlhf.core.logprobs import batch_logprobs, model_inputs

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


def train_loop_per_worker(lc: dict) -> None:
    """Runs on every Ray Train worker. Everything it needs comes in `lc`."""
    from cluster.loop import train_loop

    train_loop(lc, SFTTask(build(SFTConfig, lc["config"])))


# ============================================================================ driver


def run(cfg: SFTConfig, dataset: Any = None, eval_dataset: Any = None, *,
        crash_once_at_step: int | None = None) -> Path:
    """Train; returns the run directory (see rlhf.train.runner.run_training for the arguments)."""
    from rlhf.train.runner import run_training
    from rlhf.data.examples import EXAMPLES, resolve_chat_template

    cfg.data.chat_template = resolve_chat_template(cfg.data.chat_template)
    return run_training(cfg, prefix="sft", loop=train_loop_per_worker, dataset=dataset,
                        eval_dataset=eval_dataset, plot_keys=("loss",), kind=EXAMPLES,
                        crash_once_at_step=crash_once_at_step)


def main(argv: list[str] | None = None) -> int:
    from rlhf.train import runner

    return runner.main(SFTConfig, "rlhf.sft", run, lambda s: (
        f"held-out loss {s['start/eval/loss']:.3f} -> {s['eval/loss']:.3f} (perplexity "
        f"{s['start/eval/perplexity']:.1f} -> {s['eval/perplexity']:.1f}) over "
        f"{s['eval/examples']} examples" if "start/eval/loss" in s else
        f"held-out loss {s['eval/loss']:.3f} over {s['eval/examples']} examples"), argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
