"""SFT examples through the pipeline of rlhf/data/pipeline.py: detect the format, normalise to
prompt / completion, apply the chat template, tokenise with a loss mask, truncate, count.

Formats (data.format; `auto` looks for these columns in the first row, in this order):
    conversational     {"messages": [{role, content}, ...]}: loss on the assistant messages
    prompt_completion  {"prompt": ..., "completion": ...}, text or messages: loss on the
                       completion
    preference         a pair in any format rlhf.dpo reads (explicit, implicit hh-rlhf,
                       conversational): the prompt and its chosen response
    text               {"text": ...}: loss on every token

Sources, row ids, the held-out split, drop counting and streaming are rlhf/data/pipeline.py's;
this module supplies the `EXAMPLES` row kind. Tokenising follows the DPO pipeline
(rlhf.data.pipeline.tokenize_pair): plain text gets EOS appended, chat turns are closed by the
template, and the boundary between prompt and completion is found by common prefix of
the token ids, so a model SFT'd here sees the layout DPO and the reward model use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhf.config import ColumnsConfig, DataConfig, SFTDataConfig
from rlhf.data.pipeline import (DROP_EMPTY, DROP_MISSING, DROP_TOO_LONG, DataError, Layout, RowKind,
                       common_prefix_len, _is_messages, _tokenizer, detect_layout, encode,
                       normalise_row)
from rlhf.data.readers import ROWS_PER_BLOCK, Splits

DROP_NO_ASSISTANT = "no assistant message to train on"
DROP_NO_TARGET = "no completion token within max_length"

NORMALISED_COLUMNS = ("id", "prompt", "completion", "chat", "drop")
TOKENISED_COLUMNS = ("id", "input_ids", "loss_mask", "truncated", "drop", "full_length")


@dataclass(frozen=True)
class SFTLayout:
    """How to turn a raw row into prompt / completion."""

    format: str  # conversational | prompt_completion | preference | text
    chat: bool  # the first row holds messages (the tokenizer needs a chat template)
    prompt: str
    completion: str
    messages: str
    text: str
    pair: Layout | None = None  # preference: how rlhf.data.pipeline reads the pair

    def table(self, ids: list[int], rows: list[dict]):
        import pyarrow as pa

        out = [normalise_example(r, self) for r in rows]
        return pa.table({
            "id": pa.array(ids, pa.int64()),
            "prompt": pa.array([o[0] for o in out], pa.string()),
            "completion": pa.array([o[1] for o in out], pa.string()),
            "chat": pa.array([o[2] for o in out], pa.bool_()),
            "drop": pa.array([o[3] for o in out], pa.string()),
        })


def detect_sft_layout(row: dict, cfg: SFTDataConfig, source_name: str) -> SFTLayout:
    """Pick the format from the first row and the config; missing columns fail here."""
    cols = cfg.columns
    fmt = cfg.format
    found = ", ".join(row) or "(none)"
    if fmt == "auto":
        for name, col in (("conversational", cols.messages),
                          ("prompt_completion", cols.completion),
                          ("preference", cols.chosen), ("text", cols.text)):
            if col in row:
                fmt = name
                break
        else:
            raise DataError(
                f"Could not tell the SFT format of {source_name}: it has none of the "
                f"columns {cols.messages!r} (a conversation), {cols.completion!r} "
                f"(prompt/completion), {cols.chosen!r} (preference pairs) or {cols.text!r} "
                f"(plain text). Columns found: {found}. Name yours, e.g. "
                "data.columns.completion=<column> or data.columns.messages=<column>.")
    need = {"conversational": (("messages", cols.messages),),
            "prompt_completion": (("prompt", cols.prompt), ("completion", cols.completion)),
            "text": (("text", cols.text),)}.get(fmt, ())
    missing = [(key, col) for key, col in need if col not in row]
    if missing:
        raise DataError(
            f"data.format={fmt} needs column(s) "
            f"{', '.join(repr(c) for _, c in missing)} in {source_name}. Columns found: "
            f"{found}. Set " + " ".join(f"data.columns.{k}=<column>" for k, _ in missing)
            + (" (or data.format=text for plain text with no prompt)."
               if fmt == "prompt_completion" else "."))
    pair = None
    chat = fmt == "conversational"
    if fmt == "preference":
        pair = detect_layout(row, DataConfig(
            columns=ColumnsConfig(prompt=cols.prompt, chosen=cols.chosen,
                                  rejected=cols.rejected),
            assistant_marker=cfg.assistant_marker), source_name)
        chat = pair.chat
    elif fmt == "prompt_completion":
        chat = _is_messages(row[cols.completion])
    elif fmt == "conversational" and not _is_messages(row[cols.messages]):
        raise DataError(
            f"data.format=conversational but {source_name}'s {cols.messages!r} holds "
            f"{type(row[cols.messages]).__name__}, not a list of {{role, content}} messages.")
    return SFTLayout(fmt, chat, cols.prompt, cols.completion, cols.messages, cols.text, pair)


def _chat_ok(msgs: Any) -> bool:
    return _is_messages(msgs) and all(isinstance(m["content"], str) for m in msgs)


def _assistant_ok(msgs: list[dict]) -> str:
    """"" if the messages have something to train on, else the drop reason."""
    assistant = [m for m in msgs if m["role"] == "assistant"]
    if not assistant:
        return DROP_NO_ASSISTANT
    if any(not m["content"].strip() for m in assistant):
        return DROP_EMPTY
    return ""


def normalise_example(row: dict, lay: SFTLayout) -> tuple[str, str, bool, str]:
    """Raw row -> (prompt, completion, is_chat, drop reason or "").

    Chat values come back JSON-encoded (lists of messages); a conversation is all
    completion (prompt "[]"), its assistant messages being what is trained on.
    """
    if lay.format == "text":
        v = row.get(lay.text)
        if not isinstance(v, str) or not v.strip():
            return "", "", False, DROP_EMPTY
        return "", v, False, ""
    if lay.format == "preference":
        p, c, _, chat, drop = normalise_row(row, lay.pair)
        if not drop and not chat and not c.strip():
            drop = DROP_EMPTY  # the pair's empty side is the chosen one: nothing to learn
        return (p, c, chat, "") if not drop else ("", "", chat, drop)
    if lay.format == "conversational":
        msgs = row.get(lay.messages)
        if msgs is None:
            return "", "", True, DROP_MISSING
        if not _chat_ok(msgs):
            return "", "", True, DROP_EMPTY
        drop = _assistant_ok(msgs)
        return ("[]", json.dumps(msgs), True, "") if not drop else ("", "", True, drop)
    p, c = row.get(lay.prompt), row.get(lay.completion)
    if p is None or c is None:
        return "", "", False, DROP_MISSING
    if isinstance(p, str) and isinstance(c, str):
        return (p, c, False, "") if c.strip() else ("", "", False, DROP_EMPTY)
    if isinstance(p, str):  # a plain prompt before a chat completion is one user turn
        p = [{"role": "user", "content": p}] if p else []
    if not _chat_ok(c) or not (p == [] or _chat_ok(p)):
        return "", "", True, DROP_EMPTY
    drop = _assistant_ok(c)
    return (json.dumps(p), json.dumps(c), True, "") if not drop else ("", "", True, drop)


def tokenize_example(tok, prompt: str, completion: str, chat: bool, max_length: int,
                     truncation: str, completion_only: bool = True,
                     chat_template: str | None = None):
    """Strings (or JSON message lists) -> (input_ids, loss_mask, truncated, drop reason);
    `example_tokens` also gives the example's length before truncation."""
    return example_tokens(tok, prompt, completion, chat, max_length, truncation,
                          completion_only, chat_template)[:4]


def example_tokens(tok, prompt: str, completion: str, chat: bool, max_length: int,
                   truncation: str, completion_only: bool = True,
                   chat_template: str | None = None):
    """Strings (or JSON message lists) -> (input_ids, loss_mask, truncated, drop reason,
    tokens before truncation).

    loss_mask[t] = 1 where token t is trained on (predicted from the tokens before it):
    the completion, or for chat the assistant messages of the completion with their
    closing tokens (so the model learns to end its turn), or every token when
    completion_only is false. Position 0 is never predicted, whatever its mask.
    chat_template: replaces the tokenizer's own (data.chat_template).
    """
    if chat:
        p_msgs, c_msgs = json.loads(prompt), json.loads(completion)
        msgs = p_msgs + c_msgs

        def render(messages: list[dict], gen: bool = False) -> list[int]:
            return encode(tok, tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen,
                chat_template=chat_template or None), True)

        ids = render(msgs)
        mask = [0] * len(ids)
        for k in range(len(p_msgs), len(msgs)):
            if msgs[k]["role"] != "assistant":
                continue
            # The turn's tokens: what the template adds for message k after the
            # generation prompt (found by common prefix, so merges at the seams are fine).
            start = 0 if k == 0 else common_prefix_len(render(msgs[:k], gen=True), ids)
            end = common_prefix_len(render(msgs[:k + 1]), ids)
            mask[start:end] = [1] * max(end - start, 0)
    else:
        eos = tok.eos_token or ""
        ids = encode(tok, prompt + completion + ("" if completion.endswith(eos) else eos), False)
        n = common_prefix_len(encode(tok, prompt, False), ids) if prompt else 0
        mask = [0] * n + [1] * (len(ids) - n)
    if not completion_only:
        mask = [1] * len(ids)
    full = len(ids)
    truncated = full > max_length
    if truncated:
        if truncation == "drop":
            return [], [], False, DROP_TOO_LONG, full
        cut = slice(-max_length, None) if truncation == "keep_end" else slice(max_length)
        ids, mask = ids[cut], mask[cut]
    if not any(mask[1:]):
        return [], [], truncated, DROP_NO_TARGET, full
    return ids, mask, truncated, "", full


def tokenize_sft_batch(batch: dict[str, np.ndarray], tokenizer_path: str, max_length: int,
                       truncation: str, completion_only: bool, chat_template: str) -> Any:
    """map_batches body: normalised examples -> input_ids and loss_mask columns."""
    import pyarrow as pa

    tok = _tokenizer(tokenizer_path)
    out: dict[str, list] = {k: [] for k in TOKENISED_COLUMNS}
    for i in range(len(batch["id"])):
        drop = str(batch["drop"][i])
        res = (([], [], False, drop, 0) if drop else
               example_tokens(tok, str(batch["prompt"][i]), str(batch["completion"][i]),
                              bool(batch["chat"][i]), max_length, truncation,
                              completion_only, chat_template))
        out["id"].append(int(batch["id"][i]))
        for key, val in zip(TOKENISED_COLUMNS[1:], res):
            out[key].append(val)
    return pa.table({
        "id": pa.array(out["id"], pa.int64()),
        "input_ids": pa.array(out["input_ids"], pa.list_(pa.int32())),
        "loss_mask": pa.array(out["loss_mask"], pa.list_(pa.int8())),
        "truncated": pa.array(out["truncated"], pa.bool_()),
        "drop": pa.array(out["drop"], pa.string()),
        "full_length": pa.array(out["full_length"], pa.int32()),  # before truncation
    })


def tokenize_sft(ds, tokenizer_path: str, cfg: SFTDataConfig):
    return ds.map_batches(
        tokenize_sft_batch, batch_format="numpy", batch_size=ROWS_PER_BLOCK,
        fn_kwargs={"tokenizer_path": tokenizer_path, "max_length": cfg.max_length,
                   "truncation": cfg.truncation, "completion_only": cfg.completion_only,
                   "chat_template": cfg.chat_template})


def resolve_chat_template(value: str) -> str:
    """data.chat_template: a file's contents, or the Jinja string itself."""
    from pathlib import Path

    if value and "{" not in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise DataError(f"data.chat_template={value}: no such file (give a file holding "
                            "a Jinja chat template, or the template itself).")
        return path.read_text()
    return value


EXAMPLES = RowKind("examples", detect_sft_layout, tokenize_sft,
                   Splits(("train_sft", "train"), ("test_sft", "test", "validation", "eval")))
