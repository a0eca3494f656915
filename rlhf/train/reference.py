"""Reference log-probs computed once, in a Ray Data pass, instead of on every step.

With loss.precompute_reference the tokenised pairs flow through an actor pool that
holds the frozen reference model; each row leaves with `ref_chosen` and `ref_rejected`
(summed response log-probs), and the training workers hold no reference model at all.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cluster.models import load_causal_lm
from rlhf.core.logprobs import batch_logprobs, model_inputs, pair_batch, split_pairs


class ReferenceLogps:
    """map_batches callable (one instance per actor): tokenised rows -> + ref columns."""

    def __init__(self, model_path: str, model_cfg: Any, pad_id: int, micro_batch_size: int,
                 packing: bool):
        import torch

        use_gpu = torch.cuda.is_available()
        self.device = "cuda" if use_gpu else "cpu"
        self.model = load_causal_lm(model_path, model_cfg, trainable=False, use_gpu=use_gpu,
                                    packing=packing).to(self.device)
        self.pad_id, self.micro, self.packing = pad_id, micro_batch_size, packing
        self.attn = model_cfg.attn_implementation

    def _score(self, rows: list[int], batch: dict[str, np.ndarray]):
        import torch

        t = pair_batch([batch["prompt_ids"][i].tolist() for i in rows],
                       [batch["chosen_ids"][i].tolist() for i in rows],
                       [batch["rejected_ids"][i].tolist() for i in rows], pad_id=self.pad_id,
                       packing=self.packing, attn_implementation=self.attn)
        with torch.no_grad():
            lp, _ = batch_logprobs(self.model(**model_inputs(t, self.device)).logits, t)
        rc, rr = split_pairs(lp.float().cpu())
        return rc.numpy(), rr.numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["id"])
        ref_c = np.full(n, np.nan, dtype=np.float32)
        ref_r = np.full(n, np.nan, dtype=np.float32)
        good = [i for i in range(n) if not batch["drop"][i]]
        for at in range(0, len(good), self.micro):
            rows = good[at:at + self.micro]
            ref_c[rows], ref_r[rows] = self._score(rows, batch)
        return {**batch, "ref_chosen": ref_c, "ref_rejected": ref_r}


def add_reference_logps(ds, *, model_path: str, model_cfg: Any, pad_id: int,
                        micro_batch_size: int, packing: bool, actors: int,
                        gpus_per_actor: float):
    """Tokenised pairs -> the same rows with ref_chosen / ref_rejected, streamed."""
    import ray.data

    return ds.map_batches(
        ReferenceLogps, batch_format="numpy", batch_size=micro_batch_size * 8,
        fn_constructor_kwargs={"model_path": model_path, "model_cfg": model_cfg,
                               "pad_id": pad_id, "micro_batch_size": micro_batch_size,
                               "packing": packing},
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
        num_gpus=gpus_per_actor or None)
