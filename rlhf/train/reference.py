"""Reference log-probs computed once, in a Ray Data pass, instead of on every step.

With loss.precompute_reference the tokenised rows flow through an actor pool that holds
the frozen reference model; each row leaves with its two responses' summed log-probs
under the reference (DPO: `ref_chosen`, `ref_rejected`; KTO: `ref_completion` and
`ref_kl`, its mismatched completion's), and the training workers hold no reference model
at all.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cluster.models import load_causal_lm, load_tokenizer
from rlhf.core.logprobs import (PAIR_SIDES, UNPAIRED_SIDES, batch_logprobs, model_inputs,
                                pair_batch, split_pairs)

# (response column, reference log-prob column) x 2, per task
PAIR_REFERENCE = tuple(zip(PAIR_SIDES, ("ref_chosen", "ref_rejected")))
UNPAIRED_REFERENCE = tuple(zip(UNPAIRED_SIDES, ("ref_completion", "ref_kl")))


class ReferenceLogps:
    """map_batches callable (one instance per actor): tokenised rows -> + ref columns.
    Both responses of a row run in one pair batch (the prompt once, when packing)."""

    def __init__(self, model_path: str, model_cfg: Any, pad_id: int, micro_batch_size: int,
                 packing: bool, columns: tuple = PAIR_REFERENCE):
        import torch

        use_gpu = torch.cuda.is_available()
        self.device = "cuda" if use_gpu else "cpu"
        self.model = load_causal_lm(model_path, model_cfg, trainable=False, use_gpu=use_gpu,
                                    packing=packing).to(self.device)
        self.pad_id, self.micro, self.packing = pad_id, micro_batch_size, packing
        self.attn = model_cfg.attn_implementation
        self.columns = columns

    def _score(self, rows: list[int], batch: dict[str, np.ndarray]):
        import torch

        (first, _), (second, _) = self.columns
        t = pair_batch([batch["prompt_ids"][i].tolist() for i in rows],
                       [batch[first][i].tolist() for i in rows],
                       [batch[second][i].tolist() for i in rows], pad_id=self.pad_id,
                       packing=self.packing, attn_implementation=self.attn)
        with torch.no_grad():
            lp, _ = batch_logprobs(self.model(**model_inputs(t, self.device)).logits, t)
        a, b = split_pairs(lp.float().cpu())
        return a.numpy(), b.numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["id"])
        out = [np.full(n, np.nan, dtype=np.float32) for _ in self.columns]
        good = [i for i in range(n) if not batch["drop"][i]]
        for at in range(0, len(good), self.micro):
            rows = good[at:at + self.micro]
            out[0][rows], out[1][rows] = self._score(rows, batch)
        return {**batch, **{name: values for (_, name), values in zip(self.columns, out)}}


def streamed_logps(rows: list[dict], columns: tuple, device) -> list:
    """The two reference columns of `columns` that rows carry (loss.precompute_reference)
    as (B,) tensors; a row without them (the zero-weight dummy of an empty micro-batch)
    reads 0."""
    import torch

    return [torch.tensor([float(r.get(name, 0.0)) for r in rows], device=device)
            for _, name in columns]


def add_reference_logps(ds, *, model_path: str, model_cfg: Any, pad_id: int,
                        micro_batch_size: int, packing: bool, actors: int,
                        gpus_per_actor: float, columns: tuple = PAIR_REFERENCE):
    """Tokenised rows -> the same rows with the reference columns of `columns`, streamed."""
    import ray.data

    return ds.map_batches(
        ReferenceLogps, batch_format="numpy", batch_size=micro_batch_size * 8,
        fn_constructor_kwargs={"model_path": model_path, "model_cfg": model_cfg,
                               "pad_id": pad_id, "micro_batch_size": micro_batch_size,
                               "packing": packing, "columns": columns},
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
        num_gpus=gpus_per_actor or None)


def reference_pass(cfg: Any, ref_path: str, columns: tuple = PAIR_REFERENCE,
                   noun: str = "pairs"):
    """The driver's add_to_pipelines stage for loss.precompute_reference (a no-op
    without it): the train and held-out rows get their reference columns."""

    def add(pipes, model_path: str) -> None:
        if not cfg.loss.precompute_reference:
            return
        kw = dict(model_path=ref_path, model_cfg=cfg.model,
                  pad_id=load_tokenizer(model_path).pad_token_id,
                  micro_batch_size=cfg.train.micro_batch_size, packing=cfg.data.packing,
                  actors=cfg.cluster.reference_actors,
                  gpus_per_actor=cfg.cluster.reference_gpus_per_actor, columns=columns)
        pipes.train = add_reference_logps(pipes.train, **kw)
        if cfg.train.epochs > 1:
            # A stream runs again every epoch: the actor pool would start, load the
            # reference and score every row anew each time (15 s an epoch for 8 pairs of
            # the tiny model on a CPU). Scored once and kept in Ray's object store
            # (spilled to disk past its memory), as TRL keeps its precomputed columns.
            print(f"reference: scoring the {pipes.train_rows} training {noun} once for "
                  f"{cfg.train.epochs} epochs (loss.precompute_reference)", flush=True)
            pipes.train = pipes.train.materialize()
        # The held-out rows are scored once and kept (Ray's object store; a held-out set
        # is small): every evaluation would otherwise start the actor pool again, load
        # the reference and score the same rows (7 s a time on a CPU, for the tiny model).
        pipes.eval = add_reference_logps(pipes.eval, **kw).materialize()

    return add
