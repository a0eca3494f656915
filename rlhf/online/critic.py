"""PPO's critic: a DeepSpeed training engine of the backbone with a scalar head, read at
every position (the value of the state each response token is drawn in), with its own
optimizer, clipped value loss and checkpoint tag.

    critic = Critic(cfg, path, world, accum, learning_rate, total_updates, universal)
    values = critic.values(batch, n_seqs)              # (S, T), no grad by the caller
    loss, clipped = critic.update(batch, n_seqs, old_values, returns, mask, scale)
"""

from __future__ import annotations

from pathlib import Path

from cluster.checkpoints import load_engine_state
from cluster.deepspeed import training_engine
from cluster.models import load_causal_lm, score_head
from rlhf.core.logprobs import model_inputs, right_padded, scored_positions
from rlhf.core.losses import ppo_value_loss

TAG = "critic"


class Critic:
    def __init__(self, cfg, path: str, world: int, accum: int, learning_rate: float,
                 total_updates: int, universal: bool = False):
        self.cfg = cfg
        model = load_causal_lm(path, cfg.model, trainable=True, use_gpu=cfg.cluster.use_gpu,
                               packing=cfg.data.packing, reward_head=True)
        self.engine = training_engine(cfg, model, world, accum, learning_rate, total_updates,
                                      universal)
        self.universal = universal

        def keep(module, inputs, output):
            self._head_out = output

        score_head(self.engine).register_forward_hook(keep)

    def values(self, batch: dict, n_seqs: int):
        """(S, T) the critic's value of the state each response token is drawn in."""
        inputs = model_inputs(batch, self.engine.device)
        inputs.pop("logits_to_keep", None)  # a causal-LM option; the head is per position
        self.engine(**inputs)
        vals, seq = scored_positions(self._head_out[..., 0].float(), batch, full_length=True)
        return right_padded(vals, seq, n_seqs)[0]

    def update(self, batch: dict, n_seqs: int, old_values, returns, mask, scale: float,
               value_clip: float | None):
        """One micro-batch of the clipped value loss, scaled by `scale` (the global token
        normalisation), backward and step; returns (summed loss, summed clipped)."""
        values = self.values(batch, n_seqs)
        vl, clipped = ppo_value_loss(values, old_values, returns, mask, value_clip)
        self.engine.backward(vl.sum() * scale)
        self.engine.step()
        return float(vl.detach().sum()), float(clipped.sum())

    def dummy_update(self, batch: dict) -> None:
        """A zero-weight update (a rank with no samples: ZeRO-3 needs it in the gathers)."""
        v = self.values(batch, 1)
        self.engine.backward(v.sum() * 0.0)
        self.engine.step()

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=TAG, exclude_frozen_parameters=True)

    def load(self, folder: Path) -> None:
        load_engine_state(self.engine, str(folder), TAG, self.universal)
