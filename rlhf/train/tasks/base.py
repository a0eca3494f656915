"""The interface between the shared worker loop (rlhf.train.loop) and what one kind of
training computes: a `Task`. The loop owns engines, resume, the lock-step feed,
normalisation inputs, timing, evaluation, checkpoints and export; a task says what a row
is, what a micro-batch computes and what is reported.

    class MyTask(SequenceTask):            # or PairTask, or Task
        config_cls = SFTConfig
        def step_counts(self, micro_batches): ...
        def micro_step(self, engine, rows, totals, grad, timer): ...
        def metrics(self, sums, totals, split): ...
        @staticmethod
        def summary_line(summary): ...

The tasks: rlhf/train/tasks/{dpo,rm,sft}.py (rows from the data pipeline) and
rlhf/online/task.py (rollouts from the online coordinator). Hooks with a default are
overridden where a task needs more (online RL: its feed, the steps' begin and end, more
checkpoint state).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from cluster.deepspeed import frozen_config_for, frozen_engine
from cluster.feed import RowFeed
from cluster.models import export_hf, load_causal_lm, load_tokenizer
from cluster.worker import rank_world, say
from rlhf.core.logprobs import (batch_logprobs, dummy_pair_rows, dummy_sequence_rows, ld_sums,
                                model_inputs, rows_pair_batch, rows_sequence_batch,
                                scored_token_logprobs)
from rlhf.data.pipeline import PAIRS, RowKind

# Boolean columns of tokenised pair rows counted by the feed, with their labels.
PAIR_FLAGS = {"prompt_truncated": "prompt truncated", "response_truncated": "response truncated"}
# What a loss that stopped being finite most often means (a task may name more causes).
NAN_CAUSES = ("a learning rate too high for this model (try half) or fp16 overflow (use "
              "bf16 or fp32)")


def response_logps(engine, batch: dict, device, adapters_off: bool = False,
                   ld_alpha: float | None = None):
    """(S,) summed response log-probs and token counts of a `pair_batch` or
    `sequence_batch` (either layout) under `engine` (adapters_off: the LoRA policy's
    base); with ld_alpha (pair batches), LD-DPO's length-desensitised sums."""
    ctx = engine.module.disable_adapter() if adapters_off else contextlib.nullcontext()
    with ctx:
        out = engine(**model_inputs(batch, device))
    if ld_alpha is None:
        return batch_logprobs(out.logits, batch)
    per_token, seq = scored_token_logprobs(out.logits, batch)
    n_seqs = int(batch["n_seqs"]) if "n_seqs" in batch else batch["input_ids"].shape[0]
    return ld_sums(per_token, seq, n_seqs, ld_alpha)


def reference_logps(engine, ref_engine, batch: dict, device, ld_alpha: float | None = None):
    """`response_logps` under the reference, without gradients: the frozen engine, or
    (ref_engine None: LoRA) the policy `engine` with its adapters off."""
    with torch.no_grad():
        if ref_engine is not None:
            return response_logps(ref_engine, batch, device, ld_alpha=ld_alpha)
        return response_logps(engine, batch, device, adapters_off=True, ld_alpha=ld_alpha)


class Feed(Protocol):
    """Where a worker's steps come from: cluster.feed.RowFeed (a shard of rows) or
    rlhf.online.feed.RolloutFeed (the online coordinator's batches)."""

    consumed: list[int]  # ids of the rows trained this epoch (saved with checkpoints)
    counts: Counter  # dropped rows by reason, and flags, this epoch

    def steps(self, epoch: int = 0) -> Iterator[tuple[list[list[Any]], list[int], Counter]]:
        """(micro-batches, ids used, counts) per step, the same number of micro-batches
        on every worker, until every worker is out of rows."""

    def commit(self, ids: list[int], counts: Counter) -> None:
        """A step's rows are trained: they join `consumed` and `counts`."""


class Task(ABC):
    """One kind of training, as the worker loop (rlhf.train.loop) drives it. An instance
    lives on each Ray Train worker, built from the entry point's config."""

    config_cls: ClassVar[type]  # the entry point's config dataclass (rebuilt per worker)
    prefix: ClassVar[str]  # the entry point: its run directories are <prefix>-<time>
    rows: ClassVar[RowKind]  # what the data pipeline makes of the data set
    plot_keys: ClassVar[tuple[str, ...]] = ("loss",)  # curves.png: train and eval curves
    name: ClassVar[str] = "rows"  # what a row is called in messages: pairs, examples
    flags: ClassVar[dict[str, str]] = {}  # {boolean row column: label} counted by the feed
    eval_at_start: ClassVar[bool] = False  # evaluate before step 1 too (logged as step 0,
    # in the summary as start/eval/...)
    reward_head: ClassVar[bool] = False  # train a scalar-head model (reward model)
    train_from_shard: ClassVar[bool] = True  # False: the steps come from elsewhere
    nan_causes: ClassVar[str] = NAN_CAUSES  # the likely causes of a loss gone NaN or inf

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.world = self.accum = 1  # set by prepare()

    @property
    def nan_advice(self) -> str:
        """What a worker says when the loss stops being finite."""
        return (f"Likely causes: {self.nan_causes}. The last good checkpoint is kept; fix "
                "the setting and rerun with train.resume=true.")

    # ------------------------------------------------------------------ rows and batches

    @abstractmethod
    def dummy_rows(self, token_id: int) -> list[dict]:
        """The row(s) of a zero-weight forward: a worker with no rows left runs one so that
        ZeRO-3's parameter gathers see every rank."""

    @abstractmethod
    def batch_builder(self) -> Callable[..., dict]:
        """The rlhf.core.logprobs function that turns tokenised rows into a model input."""

    def batch(self, rows: list[dict]) -> dict:
        """The model input of a micro-batch; the dummy row when `rows` is empty."""
        cfg = self.cfg
        return self.batch_builder()(rows or self.dummy, pad_id=self.pad_id,
                                    packing=cfg.data.packing,
                                    attn_implementation=cfg.model.attn_implementation)

    # ------------------------------------------------------------------------- set-up

    def trainable(self, lc: dict):
        """The model to train, before DeepSpeed wraps it (lc: the loop config; its
        model_path). Loads the tokenizer too."""
        self.tok = load_tokenizer(lc["model_path"])
        self.pad_id, self.dummy = self.tok.pad_token_id, self.dummy_rows(self.tok.eos_token_id)
        self.model_path = lc["model_path"]
        return load_causal_lm(lc["model_path"], self.cfg.model, trainable=True,
                              use_gpu=self.cfg.cluster.use_gpu, packing=self.cfg.data.packing,
                              reward_head=self.reward_head)

    def prepare(self, engine, lc: dict, world: int, accum: int) -> None:
        """After the engine is built: anything else the task needs (frozen models, hooks).
        accum: micro-batches per worker per optimizer update."""
        self.world, self.accum = world, accum

    def frozen_reference(self, path: str, world: int):
        """A frozen DeepSpeed inference engine of the model at `path` (the reference):
        sharded like the policy under ZeRO-3, in CPU memory with cluster.offload_frozen."""
        cfg = self.cfg
        ref = load_causal_lm(path, cfg.model, trainable=False, use_gpu=cfg.cluster.use_gpu,
                             packing=cfg.data.packing)
        return frozen_engine(ref, frozen_config_for(cfg, world))

    def build_reference(self, lc: dict, world: int, none_because: str = "", note: str = ""):
        """The reference model of a preference task: a frozen engine of lc["ref_path"],
        or None where there is none to build (none_because says why) or the policy with
        its LoRA adapters off is the reference. Rank 0 says which, as built."""
        engine = None
        if none_because:
            held = none_because
        elif self.cfg.model.lora.enabled:
            held = "the policy with its LoRA adapters off"
        else:
            engine = self.frozen_reference(lc["ref_path"], world)
            held = (f"a frozen copy of {lc['ref_path']} (ZeRO-"
                    f"{engine.zero_optimization_stage()}){note}")
        if rank_world()[0] == 0:
            say(f"reference model: {held}")
        return engine

    # --------------------------------------------------------------------------- a step

    def feed(self, shard, micro: int, accum: int, skip: set[int] | None = None) -> Feed:
        """Where the steps' micro-batches come from: this worker's shard of the train
        split (online RL: its coordinator's rollouts)."""
        return RowFeed(shard, micro, accum, skip=skip, flags=self.flags,
                       shuffle_buffer=self.cfg.data.shuffle_buffer, seed=self.cfg.train.seed)

    def begin_step(self, micro_batches: list[list], timer) -> None:
        """Before a step's counts and micro-steps (online RL: score, reference, old
        log-probs, values, advantages)."""

    def updates(self, micro_batches: list[list]) -> list[list[list]]:
        """The step's optimizer updates, each a list of micro-batches, all of one length
        (default: one over all; PPO: epochs x mini-batches)."""
        return [micro_batches]

    @abstractmethod
    def step_counts(self, micro_batches: list[list]) -> dict[str, float]:
        """This worker's counts of a step (or an update's micro-batches), summed over the
        workers by the loop and handed to micro_step and metrics as `totals`. "samples",
        "tokens" and "unique_tokens" are read by the loop; every worker reports the same
        keys."""

    @abstractmethod
    def micro_step(self, engine, rows: list, totals: dict | None, grad: bool,
                   timer) -> tuple[Any, dict[str, float]]:
        """One micro-batch -> (loss or None, sums). rows == [] is a zero-weight dummy
        forward (ZeRO-3 needs every rank in every gather). totals None: evaluation (no
        loss). The loss is normalised by `totals` so that DeepSpeed's update (which
        divides by accum and averages over workers) is the global-batch mean, however
        the batch was split. Sums are added over micro-batches and workers; "max:..."
        keys keep the largest value instead."""

    def end_step(self, engine, step: int, timer) -> None:
        """After a step's optimizer updates, and after a restore with the restored step
        (online RL: publish the weights to the engines)."""

    @abstractmethod
    def metrics(self, sums: dict, totals: dict | None, split: str) -> dict:
        """"{split}/..." values from the summed sums (totals None: evaluation)."""

    # ------------------------------------------------------- checkpoints and the export

    def save_state(self, folder: Path) -> None:
        """Called on every rank when a checkpoint is written into `folder` (more state:
        PPO's critic, the adaptive KL coefficient, the rollout buffer)."""

    def load_state(self, folder: Path) -> None:
        """Called on every rank after the engine is restored from `folder`."""

    def export(self, full_state: dict, out_dir: Path) -> None:
        """The final model (rank 0): a causal LM (merged LoRA, or the adapter alone) with
        its tokenizer."""
        export_hf(full_state, self.model_path, out_dir, self.cfg.model, self.tok)

    @staticmethod
    @abstractmethod
    def summary_line(summary: dict) -> str:
        """The end of a run in one line, from its summary.json (held-out figures)."""

    @staticmethod
    def watch(evaluations: list[dict], whole_run: bool = False) -> list[str]:
        """Warnings the metrics rows so far give, from their held-out figures (rank 0,
        after each evaluation; whole_run: the driver, over the finished run's rows, each
        warning once). Online RL: the reward-hacking monitor."""
        return []


class PairTask(Task):
    """Preference pairs (DPO, the reward model): the dummy pair and a pair batch's token
    counts."""

    rows = PAIRS
    name = "pairs"
    flags = PAIR_FLAGS

    def dummy_rows(self, token_id: int) -> list[dict]:
        return dummy_pair_rows(token_id)

    def batch_builder(self) -> Callable[..., dict]:
        return rows_pair_batch

    def step_counts(self, micro_batches: list[list[dict]]) -> dict[str, float]:
        rows = [r for mb in micro_batches for r in mb]
        p = sum(len(r["prompt_ids"]) for r in rows)
        c = sum(len(r["chosen_ids"]) for r in rows)
        r = sum(len(r["rejected_ids"]) for r in rows)
        # tokens: prompt+chosen and prompt+rejected (what a padded trainer runs, less its
        # padding); unique_tokens: each prompt once (the work data.packing does);
        # chosen_tokens: DPO's RPO term is normalised by it.
        return {"samples": len(rows), "tokens": 2 * p + c + r, "unique_tokens": p + c + r,
                "chosen_tokens": c}


class SequenceTask(Task):
    """Single sequences (SFT examples, online RL's prompt + response): the dummy sequence
    and the sequence batch."""

    def dummy_rows(self, token_id: int) -> list[dict]:
        return dummy_sequence_rows(token_id)

    def batch_builder(self) -> Callable[..., dict]:
        return rows_sequence_batch
