"""Unpaired preference data for KTO through the pipeline of rlhf/data/pipeline.py: one
response per row with a thumbs-up or thumbs-down, or pairs split in two.

Formats (detected from the first row's columns):
    unpaired    TRL's: {"prompt", "completion", "label": true/false}, text or lists of
                {role, content} messages (label 1/0 reads as true/false)
    preference  a pair in any format rlhf.dpo reads (explicit, implicit hh-rlhf,
                conversational, UltraFeedback, OpenAssistant): each usable pair gives a
                desirable example (its chosen response) and an undesirable one (its
                rejected response), ids (pair id << 1) | 0 and | 1

Pairs are split after the held-out split and the driver's count, so the two halves of a
pair fall on the same side, and the counts the driver prints are pairs.

Every tokenised row also carries `kl_completion_ids`: another row's completion, to the
same prompt (KTO's mismatched pairs, whose log-ratio estimates the KL reference point).
It is chosen here, once, from the rows of the same block: the nearest earlier row (going
round) with another prompt. So the pairing is a property of the row, not of how a batch
is split over workers and micro-batches, and the estimate does not depend on the split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhf.config import ColumnsConfig, DataConfig
from rlhf.config.kto import KTODataConfig
from rlhf.data.pipeline import (DROP_EMPTY, DROP_MISSING, DataError, RowKind, _is_messages,
                                _tokenizer, detect_layout, pair_tokens)
from rlhf.data.readers import ROWS_PER_BLOCK

DROP_LABEL = "label not true or false"
NORMALISED_COLUMNS = ("id", "prompt", "completion", "label", "chat", "drop")
TOKENISED_COLUMNS = ("id", "prompt_ids", "completion_ids", "kl_completion_ids", "label",
                     "prompt_truncated", "response_truncated", "drop", "full_prompt_length",
                     "full_length")


@dataclass(frozen=True)
class UnpairedLayout:
    """How to read TRL's unpaired rows: prompt / completion / label."""

    chat: bool
    prompt: str
    completion: str
    label: str
    format: str = "unpaired"

    def table(self, ids: list[int], rows: list[dict]):
        import pyarrow as pa

        out = [normalise_unpaired(r, self) for r in rows]
        return pa.table({
            "id": pa.array(ids, pa.int64()),
            "prompt": pa.array([o[0] for o in out], pa.string()),
            "completion": pa.array([o[1] for o in out], pa.string()),
            "label": pa.array([o[2] for o in out], pa.bool_()),
            "chat": pa.array([o[3] for o in out], pa.bool_()),
            "drop": pa.array([o[4] for o in out], pa.string()),
        })


def _label(v: Any) -> bool | None:
    """A thumbs-up (True) or thumbs-down (False); None for anything else."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    return None


def normalise_unpaired(row: dict, lay: UnpairedLayout) -> tuple[str, str, bool, bool, str]:
    """Raw row -> (prompt, completion, label, is_chat, drop reason or ""); chat values
    come back JSON-encoded, templated where the tokenizer is loaded."""
    if any(c not in row for c in (lay.prompt, lay.completion, lay.label)):
        return "", "", False, lay.chat, DROP_MISSING
    label = _label(row[lay.label])
    if label is None:
        return "", "", False, lay.chat, DROP_LABEL
    p, c = row[lay.prompt], row[lay.completion]
    if lay.chat:
        if isinstance(p, str):
            p = [{"role": "user", "content": p}]
        if isinstance(c, str):
            c = [{"role": "assistant", "content": c}]
        if not (_is_messages(p) and _is_messages(c)) or any(
                not isinstance(m["content"], str) or not m["content"].strip() for m in c):
            return "", "", False, True, DROP_EMPTY
        return json.dumps(p), json.dumps(c), label, True, ""
    if not isinstance(p, str) or not isinstance(c, str) or not c.strip():
        return "", "", False, False, DROP_EMPTY
    return p, c, label, False, ""


def detect_kto_layout(row: dict, cfg: KTODataConfig, source_name: str) -> Any:
    """Unpaired rows (prompt, completion, label) or pairs (rlhf.dpo's detection), from the
    first row; missing columns fail here with the flags that map them."""
    cols = cfg.columns
    found = ", ".join(row) or "(none)"
    if cols.completion in row or cols.label in row:
        missing = [(k, c) for k, c in (("prompt", cols.prompt), ("completion", cols.completion),
                                       ("label", cols.label)) if c not in row]
        if missing:
            raise DataError(
                f"{source_name} looks unpaired but has no column(s) "
                f"{', '.join(repr(c) for _, c in missing)} (columns found: {found}). Map "
                "them with " + " ".join(f"data.columns.{k}=<column>" for k, _ in missing)
                + ".")
        return UnpairedLayout(_is_messages(row[cols.completion])
                              or _is_messages(row[cols.prompt]),
                              cols.prompt, cols.completion, cols.label)
    if cols.chosen not in row and cols.rejected not in row:
        raise DataError(
            f"Could not find KTO's columns in {source_name}: unpaired rows need "
            f"{cols.prompt!r}, {cols.completion!r} and {cols.label!r} (true for a desirable "
            f"response); pairs need {cols.chosen!r} and {cols.rejected!r}. Columns found: "
            f"{found}. Map yours with data.columns.completion=<column> "
            "data.columns.label=<column>, or data.columns.chosen=<column> "
            "data.columns.rejected=<column>.")
    pair_cfg = DataConfig(format=cfg.format, assistant_marker=cfg.assistant_marker,
                          columns=ColumnsConfig(prompt=cols.prompt, chosen=cols.chosen,
                                                rejected=cols.rejected))
    return detect_layout(row, pair_cfg, source_name)


def _kl_partners(prompts: list[list[int]]) -> list[int]:
    """For each row, the index of the nearest earlier row (going round) with another
    prompt; itself where every row has the same prompt."""
    n = len(prompts)
    out = []
    for i in range(n):
        for k in range(1, n):
            if prompts[(i - k) % n] != prompts[i]:
                out.append((i - k) % n)
                break
        else:
            out.append(i)
    return out


def tokenize_kto_batch(batch: dict[str, np.ndarray], tokenizer_path: str, max_length: int,
                       max_prompt_length: int, truncation: str) -> Any:
    """map_batches body: normalised unpaired rows, or normalised pairs (split in two) ->
    token ids with a label and a mismatched completion for the KL estimate."""
    import pyarrow as pa

    tok = _tokenizer(tokenizer_path)
    paired = "chosen" in batch
    rows: list[tuple] = []  # (id, prompt, completion, label, p_cut, r_cut, drop, full)
    for i in range(len(batch["id"])):
        rid, drop = int(batch["id"][i]), str(batch["drop"][i])
        if paired:
            res = (pair_tokens(tok, str(batch["prompt"][i]), str(batch["chosen"][i]),
                               str(batch["rejected"][i]), bool(batch["chat"][i]),
                               max_length, max_prompt_length, truncation)
                   if not drop else ([], [], [], False, False, drop, (0, 0)))
            p, c, r, p_cut, r_cut, drop, full = res
            if drop:  # a pair that cannot be used is one dropped row, counted once
                rows.append((rid << 1, [], [], True, False, False, drop, full))
            else:
                rows.append((rid << 1, p, c, True, p_cut, r_cut, "", full))
                rows.append((rid << 1 | 1, p, r, False, p_cut, r_cut, "", full))
            continue
        if drop:
            rows.append((rid, [], [], False, False, False, drop, (0, 0)))
            continue
        completion = str(batch["completion"][i])
        p, c, _, p_cut, r_cut, drop, full = pair_tokens(
            tok, str(batch["prompt"][i]), completion, completion, bool(batch["chat"][i]),
            max_length, max_prompt_length, truncation)
        rows.append((rid, p, c, bool(batch["label"][i]), p_cut, r_cut, drop, full))
    usable = [j for j, r in enumerate(rows) if not r[6]]
    partners = _kl_partners([rows[j][1] for j in usable])
    kl: list[list[int]] = [[] for _ in rows]
    for j, partner in zip(usable, partners):
        room = max_length - len(rows[j][1])
        kl[j] = rows[usable[partner]][2][:room]
    ids = pa.list_(pa.int32())
    return pa.table({
        "id": pa.array([r[0] for r in rows], pa.int64()),
        "prompt_ids": pa.array([r[1] for r in rows], ids),
        "completion_ids": pa.array([r[2] for r in rows], ids),
        "kl_completion_ids": pa.array(kl, ids),
        "label": pa.array([r[3] for r in rows], pa.bool_()),
        "prompt_truncated": pa.array([r[4] for r in rows], pa.bool_()),
        "response_truncated": pa.array([r[5] for r in rows], pa.bool_()),
        "drop": pa.array([r[6] for r in rows], pa.string()),
        "full_prompt_length": pa.array([r[7][0] for r in rows], pa.int32()),
        "full_length": pa.array([r[7][1] for r in rows], pa.int32()),
    })


def tokenize_kto(ds, tokenizer_path: str, cfg: KTODataConfig):
    return ds.map_batches(
        tokenize_kto_batch, batch_format="numpy", batch_size=ROWS_PER_BLOCK,
        fn_kwargs={"tokenizer_path": tokenizer_path, "max_length": cfg.max_length,
                   "max_prompt_length": cfg.max_prompt_length, "truncation": cfg.truncation})


# Public formats (UltraFeedback, OpenAssistant) give pairs, split in two at tokenising.
UNPAIRED = RowKind("examples", detect_kto_layout, tokenize_kto, formats_as="pairs",
                   rows_per=lambda layout: 1 if isinstance(layout, UnpairedLayout) else 2)
