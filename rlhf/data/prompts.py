"""Prompts for online RL through the pipeline of rlhf/data/pipeline.py: detect the prompt column,
keep the other columns as metadata for reward functions, render chat prompts with the
generation prompt, tokenise, drop (and count) prompts that are empty or too long.

Sources, row ids, the held-out split, drop counting and streaming are rlhf/data/pipeline.py's;
this module supplies the `PROMPTS` row kind. Preference data works as a prompt source
too (its chosen/rejected columns become metadata), so `builtin:demo` serves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhf.config import PromptDataConfig
from rlhf.data.pipeline import (DROP_EMPTY, DROP_MISSING, DataError, RowKind, _is_messages,
                                _tokenizer, encode)
from rlhf.data.readers import ROWS_PER_BLOCK, Splits

DROP_PROMPT_TOO_LONG = "prompt longer than max_prompt_length"


@dataclass(frozen=True)
class PromptLayout:
    prompt: str
    chat: bool  # the first row's prompt is a list of messages

    def table(self, ids: list[int], rows: list[dict]):
        import pyarrow as pa

        out = [normalise_prompt(r, self) for r in rows]
        return pa.table({
            "id": pa.array(ids, pa.int64()),
            "prompt": pa.array([o[0] for o in out], pa.string()),
            "chat": pa.array([o[1] for o in out], pa.bool_()),
            "metadata": pa.array([o[2] for o in out], pa.string()),
            "drop": pa.array([o[3] for o in out], pa.string()),
        })


def detect_prompt_layout(row: dict, cfg: PromptDataConfig, source_name: str) -> PromptLayout:
    if cfg.prompt_column not in row:
        raise DataError(
            f"Could not find the prompt column {cfg.prompt_column!r} in {source_name}. "
            f"Columns found: {', '.join(row) or '(none)'}. Set "
            "data.prompt_column=<column>.")
    return PromptLayout(cfg.prompt_column, _is_messages(row[cfg.prompt_column]))


def normalise_prompt(row: dict, lay: PromptLayout) -> tuple[str, bool, str, str]:
    """Raw row -> (prompt text or JSON messages, is_chat, metadata JSON, drop reason)."""
    p = row.get(lay.prompt)
    meta = json.dumps({k: v for k, v in row.items() if k != lay.prompt}, default=str)
    if p is None:
        return "", False, meta, DROP_MISSING
    if _is_messages(p):
        if not all(isinstance(m["content"], str) for m in p):
            return "", True, meta, DROP_EMPTY
        return json.dumps(p), True, meta, ""
    if not isinstance(p, str) or not p.strip():
        return "", False, meta, DROP_EMPTY
    return p, False, meta, ""


def tokenize_prompt(tok, prompt: str, chat: bool, max_prompt_length: int
                    ) -> tuple[list[int], str]:
    """(prompt token ids, drop reason or ""): chat prompts end with the template's
    generation prompt, so the model answers as the assistant."""
    if chat:
        text = tok.apply_chat_template(json.loads(prompt), tokenize=False,
                                       add_generation_prompt=True)
        ids = encode(tok, text, True)
    else:
        ids = encode(tok, prompt, False)
    if len(ids) > max_prompt_length:
        return [], DROP_PROMPT_TOO_LONG
    return ids, ""


def tokenize_prompt_batch(batch: dict[str, np.ndarray], tokenizer_path: str,
                          max_prompt_length: int) -> Any:
    import pyarrow as pa

    tok = _tokenizer(tokenizer_path)
    ids, drops = [], []
    for i in range(len(batch["id"])):
        drop = str(batch["drop"][i])
        res = ([], drop) if drop else tokenize_prompt(
            tok, str(batch["prompt"][i]), bool(batch["chat"][i]), max_prompt_length)
        ids.append(res[0])
        drops.append(res[1])
    return pa.table({
        "id": pa.array(np.asarray(batch["id"], dtype=np.int64)),
        "prompt_ids": pa.array(ids, pa.list_(pa.int32())),
        "metadata": pa.array([str(m) for m in batch["metadata"]], pa.string()),
        "drop": pa.array(drops, pa.string()),
    })


def tokenize_prompts(ds, tokenizer_path: str, cfg: PromptDataConfig):
    return ds.map_batches(tokenize_prompt_batch, batch_format="numpy",
                          batch_size=ROWS_PER_BLOCK,
                          fn_kwargs={"tokenizer_path": tokenizer_path,
                                     "max_prompt_length": cfg.max_prompt_length})


PROMPTS = RowKind("prompts", detect_prompt_layout, tokenize_prompts,
                  Splits(("train_gen", "train"), ("test_gen", "test", "validation", "eval")))
