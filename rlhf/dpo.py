"""DPO on Ray Train + DeepSpeed ZeRO, with preference pairs streamed by Ray Data.

    python -m rlhf.dpo                          # laptop: local Ray, CPU, tiny model, demo data
    python -m rlhf.dpo train.max_steps=20 cluster.zero_stage=3
    python -m rlhf.dpo --config launch/recipes/dpo-llama3-8b.yaml
    ray job submit --working-dir . -- python -m rlhf.dpo --config launch/recipes/dpo-llama3-8b.yaml
    python -m rlhf.dpo --help                   # every field, its default and meaning

Reads top to bottom: parse config -> Ray -> model and data -> trainer -> fit -> export
-> print where the results are. What DPO computes per micro-batch is `DPOTask`; the
loop around it (engines, resume, checkpoints, evaluation) is cluster/loop.py, shared
with rlhf.rm and rlhf.sft.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from cluster.loop import PairTask
from rlhf.config import DPOConfig, build

NAN_ADVICE = ("Likely causes: a learning rate too high for this model (try half), a beta "
              "too small, or fp16 overflow (use bf16 or fp32). The last good checkpoint is "
              "kept; fix the setting and rerun with train.resume=true.")


# ============================================================================ worker


def _logps(engine, batch: dict, device, adapters_off: bool = False):
    """(2B,) summed response log-probs and token counts of a `pair_batch` (either layout)."""
    import contextlib

    from rlhf.core.logprobs import model_inputs, batch_logprobs

    ctx = engine.module.disable_adapter() if adapters_off else contextlib.nullcontext()
    with ctx:
        out = engine(**model_inputs(batch, device))
    return batch_logprobs(out.logits, batch)


def _pair_forward(engine, ref_engine, batch, cfg, device, grad: bool, rows: list[dict],
                  timer=None):
    """Policy (and reference) forward on one micro-batch -> losses and rewards (B,)."""
    import torch

    from rlhf.core.logprobs import split_pairs
    from rlhf.core.losses import dpo_loss

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


METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
               "rewards/margin", "logps/chosen", "logps/rejected", "nll")


def _sums(out, pc, pr, nc, weight: float) -> list[float]:
    """Per-micro-batch sums of the metrics (divided by the pair count later)."""
    cr, rr = out.chosen_rewards, out.rejected_rewards
    return [weight * float(v) for v in (
        out.losses.detach().sum(), cr.sum(), rr.sum(), (cr > rr).float().sum(),
        (cr - rr).sum(), pc.detach().sum(), pr.detach().sum(), -pc.detach().sum())]


class DPOTask(PairTask):
    """What cluster.loop.train_loop needs to train DPO (see its docstring)."""

    nan_advice = NAN_ADVICE

    def prepare(self, engine, lc: dict, world: int, accum: int) -> None:
        cfg = self.cfg
        self.world, self.accum, self.ref_engine = world, accum, None
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


def train_loop_per_worker(lc: dict) -> None:
    """Runs on every Ray Train worker. Everything it needs comes in `lc`."""
    from cluster.loop import train_loop

    train_loop(lc, DPOTask(build(DPOConfig, lc["config"])))


# ============================================================================ driver


def run(cfg: DPOConfig, dataset: Any = None, eval_dataset: Any = None, *,
        crash_once_at_step: int | None = None) -> Path:
    """Train; returns the run directory (see rlhf.train.runner.run_training for the arguments)."""
    from cluster.models import check_reference, resolve_model_path
    from rlhf.evaluate import after_training_of
    from rlhf.train.runner import run_training

    ref_path = policy_path = resolve_model_path(cfg.model.name_or_path)
    notes: list[str] = []
    if cfg.model.ref_name_or_path:
        ref_path = resolve_model_path(cfg.model.ref_name_or_path, "model.ref_name_or_path")
        notes = check_reference(policy_path, ref_path)
        for n in notes:
            print(f"warning: {n}", file=sys.stderr)

    def reference_pass(pipes, model_path: str) -> None:
        if not cfg.loss.precompute_reference:
            return
        from cluster.models import load_tokenizer
        from rlhf.train.reference import add_reference_logps

        kw = dict(model_path=ref_path, model_cfg=cfg.model,
                  pad_id=load_tokenizer(model_path).pad_token_id,
                  micro_batch_size=cfg.train.micro_batch_size, packing=cfg.data.packing,
                  actors=cfg.cluster.reference_actors,
                  gpus_per_actor=cfg.cluster.reference_gpus_per_actor)
        pipes.train = add_reference_logps(pipes.train, **kw)
        # The held-out pairs are scored once and kept (Ray's object store; a held-out set
        # is small): every evaluation would otherwise start the actor pool again, load
        # the reference and score the same pairs (7 s a time on a CPU, for the tiny model).
        pipes.eval = add_reference_logps(pipes.eval, **kw).materialize()

    return run_training(cfg, prefix="dpo", loop=train_loop_per_worker, dataset=dataset,
                        eval_dataset=eval_dataset, loop_config={"ref_path": ref_path},
                        add_to_pipelines=reference_pass, notes=notes,
                        plot_keys=("loss", "rewards/accuracy"),
                        crash_once_at_step=crash_once_at_step,
                        evaluate=after_training_of(cfg))


def main(argv: list[str] | None = None) -> int:
    from rlhf.train import runner

    return runner.main(DPOConfig, "rlhf.dpo", run, lambda s: (
        f"held-out reward accuracy {s['eval/rewards/accuracy']:.3f}, margin "
        f"{s['eval/rewards/margin']:+.3f} over {s['eval/pairs']} pairs"), argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
