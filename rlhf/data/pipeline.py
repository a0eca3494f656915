"""Preference pairs through Ray Data: read, normalise, template, tokenise, truncate, count.

    source (files | save_to_disk folder | datasets.Dataset | ray Dataset | builtin:demo)
      -> read with a stable row id per pair (file index, line)        [read tasks]
      -> normalise to prompt / chosen / rejected (+ drop reason)      [same tasks]
      -> chat template, tokenise, truncate, count                     [map_batches]
      -> train workers: get_dataset_shard(...).iter_torch_batches(...)

Rows that cannot be used are not filtered out silently: they travel with a `drop`
reason so the training workers count them, and the driver's first pass counts them
before training starts. Row ids make resumption exact: a checkpoint records the ids
already trained on, and a resumed run skips exactly those.

SFT examples take the same path (`RowKind`): rlhf/data/examples.py supplies their format
detection, normalisation and tokenising; sources, ids, the held-out split, counting and
streaming are this module's.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhf.config import DataConfig
from rlhf.data import formats
from rlhf.data.demo import demo_row
from rlhf.data.formats import SCORE_COLUMNS, SCORE_GAP
from rlhf.data.readers import (PAIR_SPLITS, ROWS_PER_BLOCK, DataError, Source,  # noqa: F401
                               Splits, iter_file_rows, peek_rows, resolve_sources)
from rlhf.data.tokenizer import auto_tokenizer
# DataError, Source, peek_rows and resolve_sources are part of this module's API too.

FILE_SHIFT = 40  # row id = file index << 40 | row number in that file

# Drop reasons, as they appear in summaries.
DROP_MISSING = "missing column"
DROP_EMPTY = "empty or non-string value"
DROP_IDENTICAL = "chosen identical to rejected"
DROP_NO_MARKER = "no assistant marker in the shared prefix"
DROP_TOO_LONG = "longer than max_length (truncation=drop)"
DROP_PROMPT_TOO_LONG = "prompt fills max_length, no room for a response"
DROP_MARGIN = "margin missing or not a number"
DROP_SCORE_MISSING = "score missing or not a number"
DROP_SCORE_REVERSED = "chosen scored below rejected"
DROP_SCORE_TIE = "scores tied (data.min_score_gap)"
DROP_SCORE_GAP = "score gap below data.min_score_gap"


# --------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class Layout:
    """How to turn a raw row into prompt / chosen / rejected."""

    format: str  # explicit | implicit
    chat: bool  # values are lists of {role, content} messages
    prompt: str
    chosen: str
    rejected: str
    marker: str
    margin: str = ""  # optional numeric column (reward model), "" for none
    scored: bool = False  # rows carry scores (score_chosen/score_rejected or score_gap)
    min_score_gap: float = 0.0

    def table(self, ids: list[int], rows: list[dict]):
        """Raw rows -> the normalised Arrow table (NORMALISED_COLUMNS)."""
        return _normalised_table(ids, rows, self)


def _is_messages(v: Any) -> bool:
    return (isinstance(v, list) and len(v) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in v))


# Words in column names, strongest first, that say which part of a pair a column holds
# (a dispreferred response says "prefer" too: the rejected words are tried first).
REJECTED_WORDS = ("rejected", "dispref", "reject", "worse", "bad", "los", "neg", "dislike")
CHOSEN_WORDS = ("chosen", "prefer", "accept", "better", "good", "win", "pos", "like")
PROMPT_WORDS = ("prompt", "instruction", "question", "query", "input", "context")


def guess_columns(found: list[str], has_prompt: bool) -> dict[str, str]:
    """{"chosen"/"rejected"/"prompt": column} guessed from the column names, for the
    error that names the flags (e.g. instruction, preferred, dispreferred)."""
    out: dict[str, str] = {}
    for key, words in (("rejected", REJECTED_WORDS), ("chosen", CHOSEN_WORDS),
                       ("prompt", () if has_prompt else PROMPT_WORDS)):
        for word in words:
            hit = [c for c in found if word in c.lower() and c not in out.values()]
            if hit:
                out[key] = hit[0]
                break
    return out


def detect_layout(row: dict, cfg: DataConfig, source_name: str) -> Layout:
    """Pick the format from the first row and the config; missing columns fail here."""
    cols = cfg.columns
    found = list(row.keys())
    missing = [c for c in (cols.chosen, cols.rejected) if c not in row]
    if missing:
        if "completion" in row and "label" in row:
            raise DataError(
                f"{source_name} holds unpaired rows (prompt, completion, label: one response "
                "with a thumbs-up or down, TRL's KTO format), not pairs. Train on them with "
                "python -m rlhf.kto (same data flags).")
        guess = guess_columns(found, cols.prompt in row)
        keys = [k for k, v in (("chosen", cols.chosen), ("rejected", cols.rejected))
                if v in missing] + (["prompt"] if "prompt" in guess else [])
        fix = " ".join(f"data.columns.{k}={guess.get(k, '<column>')}" for k in keys)
        raise DataError(
            f"Could not find column(s) {', '.join(repr(m) for m in missing)} in "
            f"{source_name}. Columns found: {', '.join(found) or '(none)'}. Tell the "
            f"pipeline which columns hold the pair: {fix}")
    has_prompt = cols.prompt in row
    fmt = cfg.format
    if fmt == "auto":
        fmt = "explicit" if has_prompt else "implicit"
        chat = _is_messages(row[cols.chosen])
    elif fmt == "conversational":
        chat = True
        fmt = "explicit" if has_prompt else "implicit"
    else:
        chat = _is_messages(row[cols.chosen])
    if fmt == "explicit" and not has_prompt:
        raise DataError(
            f"data.format=explicit but {source_name} has no column {cols.prompt!r} "
            f"(columns found: {', '.join(found)}). Set data.columns.prompt=<column>, or "
            "data.format=implicit if chosen/rejected hold whole dialogues.")
    if cfg.format == "conversational" and not _is_messages(row[cols.chosen]):
        raise DataError(
            f"data.format=conversational but {source_name}'s {cols.chosen!r} holds "
            f"{type(row[cols.chosen]).__name__}, not a list of {{role, content}} messages.")
    scored = SCORE_GAP in row or all(c in row for c in SCORE_COLUMNS)
    if cols.margin == SCORE_GAP and not scored:
        raise DataError(
            f"data.columns.margin={SCORE_GAP} takes the score difference, but {source_name} "
            f"has no scores (columns {', '.join(SCORE_COLUMNS)} or {SCORE_GAP}). Columns "
            f"found: {', '.join(found)}. Name a numeric column instead.")
    if getattr(cfg, "min_score_gap", 0.0) > 0 and not scored:
        raise DataError(
            f"data.min_score_gap={cfg.min_score_gap} needs scores, but {source_name} has "
            f"none (columns {', '.join(SCORE_COLUMNS)} or {SCORE_GAP}). Columns found: "
            f"{', '.join(found)}. Set data.min_score_gap=0.")
    return Layout(fmt, chat, cols.prompt, cols.chosen, cols.rejected, cfg.assistant_marker,
                  cols.margin, scored, getattr(cfg, "min_score_gap", 0.0))


def common_prefix_len(a: list, b: list) -> int:
    """How many leading items a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def normalise_row(row: dict, lay: Layout) -> tuple[str, str, str, bool, str]:
    """Raw row -> (prompt, chosen, rejected, is_chat, drop reason or "").

    Chat values come back JSON-encoded (lists of messages) and are templated later,
    where the tokenizer is loaded.
    """
    for col in ((lay.prompt,) if lay.format == "explicit" else ()) + (lay.chosen, lay.rejected):
        if col not in row:
            return "", "", "", lay.chat, DROP_MISSING
    c, r = row[lay.chosen], row[lay.rejected]
    if lay.chat:
        if not (_is_messages(c) and _is_messages(r)):
            return "", "", "", True, DROP_EMPTY
        k = common_prefix_len(c, r)
        if k or lay.format == "implicit":
            # Shared leading messages are the prompt (UltraFeedback style repeats the
            # user turn in both; the implicit format has nothing else).
            p, c, r = c[:k], c[k:], r[k:]
        else:
            p = row[lay.prompt]
            if isinstance(p, str):
                p = [{"role": "user", "content": p}]
            if not _is_messages(p):
                return "", "", "", True, DROP_EMPTY
        if not c or not r or any(not isinstance(m["content"], str) or not m["content"].strip()
                                 for m in c + r):
            return "", "", "", True, DROP_EMPTY
        if c == r:
            return "", "", "", True, DROP_IDENTICAL
        return json.dumps(p), json.dumps(c), json.dumps(r), True, ""
    # One empty response is a real preference (hh-rlhf: silence preferred over a harmful
    # answer) and trains as the EOS alone; two empty ones say nothing.
    if not isinstance(c, str) or not isinstance(r, str) or not (c.strip() or r.strip()):
        return "", "", "", False, DROP_EMPTY
    if lay.format == "explicit":
        p = row[lay.prompt]
        if not isinstance(p, str):
            return "", "", "", False, DROP_EMPTY
    else:
        if c == r:
            return "", "", "", False, DROP_IDENTICAL
        shared = c[: common_prefix_len(list(c), list(r))]
        cut = shared.rfind(lay.marker)
        if cut < 0:
            return "", "", "", False, DROP_NO_MARKER
        cut += len(lay.marker)
        p, c, r = c[:cut], c[cut:], r[cut:]
    if not (c.strip() or r.strip()):
        return "", "", "", False, DROP_EMPTY
    if c == r:
        return "", "", "", False, DROP_IDENTICAL
    return p, c, r, False, ""


NORMALISED_COLUMNS = ("id", "prompt", "chosen", "rejected", "chat", "drop", "margin")


def _finite(v: Any) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def score_gap(row: dict) -> float | None:
    """How much better the chosen response scored: the score_gap column, else
    score_chosen - score_rejected; None when the scores are missing or not numbers."""
    if SCORE_GAP in row:
        return _finite(row[SCORE_GAP])
    c, r = (_finite(row.get(k)) for k in SCORE_COLUMNS)
    return None if c is None or r is None else c - r


def row_margin(row: dict, lay: Layout) -> float | None:
    """The row's margin (0.0 without a margin column), or None when it is unusable."""
    if not lay.margin:
        return 0.0
    if lay.margin == SCORE_GAP:
        return score_gap(row)
    return _finite(row.get(lay.margin))


def score_drop(row: dict, lay: Layout) -> str:
    """Drop reason from the scores ("" = keep): a tie or a gap under data.min_score_gap,
    or the chosen side scored lower (the label contradicts the ratings)."""
    if not lay.scored:
        return ""
    gap = score_gap(row)
    if gap is None:
        return DROP_SCORE_MISSING if lay.min_score_gap > 0 else ""
    if gap < 0:
        return DROP_SCORE_REVERSED
    if gap < lay.min_score_gap:
        return DROP_SCORE_TIE if gap == 0 else DROP_SCORE_GAP
    return ""


def _normalised_table(ids: list[int], rows: list[dict], lay: Layout):
    import pyarrow as pa

    out = [normalise_row(r, lay) for r in rows]
    out = [o if o[4] else (*o[:4], score_drop(r, lay)) for o, r in zip(out, rows)]
    margins = [row_margin(r, lay) for r in rows]
    out = [o if m is not None or o[4] else (*o[:4], DROP_MARGIN)
           for o, m in zip(out, margins)]
    return pa.table({
        "margin": pa.array([m if m is not None else 0.0 for m in margins], pa.float64()),
        "id": pa.array(ids, pa.int64()),
        "prompt": pa.array([o[0] for o in out], pa.string()),
        "chosen": pa.array([o[1] for o in out], pa.string()),
        "rejected": pa.array([o[2] for o in out], pa.string()),
        "chat": pa.array([o[3] for o in out], pa.bool_()),
        "drop": pa.array([o[4] for o in out], pa.string()),
    })


def _file_key(path: str) -> str:
    # Ray hands object-store paths back without their scheme (bucket/key).
    return path.split("://", 1)[1] if "://" in path else os.path.abspath(path)


def _datasource_class():
    from ray.data.datasource import FileBasedDatasource

    class RowFiles(FileBasedDatasource):
        """Streams rows out of files, normalised, with row ids (file index, row)."""

        def __init__(self, files: list[str], layout, filesystem=None):
            super().__init__(files, filesystem=filesystem)
            self._file_index = {_file_key(p): i for i, p in enumerate(files)}
            self._layout = layout

        def _open_input_source(self, filesystem, path, **open_args):
            if path.endswith(".parquet"):  # needs random access, not a stream
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path):
            base = self._file_index[_file_key(path)] << FILE_SHIFT
            ids, rows = [], []
            for n, row in iter_file_rows(f, path):
                ids.append(base | n)
                rows.append(row)
                if len(rows) == ROWS_PER_BLOCK:
                    yield self._layout.table(ids, rows)
                    ids, rows = [], []
            if rows:
                yield self._layout.table(ids, rows)

    return RowFiles


def _demo_rows(batch: dict[str, np.ndarray], split: str, layout):
    ids = [int(i) for i in batch["id"]]
    return layout.table(ids, [demo_row(i, split) for i in ids])


def _rows_with_ids(batch, layout, id_column: str | None):
    """map_batches body for in-memory sources: normalise, keep or derive ids."""
    import pyarrow as pa

    table = batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(batch)
    rows = table.to_pylist()
    if id_column:
        ids = [int(r[id_column]) for r in rows]
    else:  # content hash: stable across runs whatever the block order
        ids = [formats.stable_id(json.dumps(r, sort_keys=True, default=str))
               for r in rows]
    return layout.table(ids, rows)


def read_normalised(source: Source, layout, demo_pairs: int = 0):
    """Source -> Ray Dataset of normalised rows (`layout.table`'s columns: for pairs
    NORMALISED_COLUMNS, for SFT examples rlhf.data.examples's), streamed."""
    ds = _read(source, layout, demo_pairs)
    # Formats spread over rows (OpenAssistant's message trees) are put together here.
    return layout.regroup(ds, _shuffle_partitions(source)) if hasattr(layout, "regroup") else ds


def _shuffle_partitions(source: Source) -> int:
    """Partitions of a group-by: one per ~16 MB of input, 2..64 (Ray's default of 200
    costs more than the grouping on small data)."""
    size = 0
    if source.kind == "files":
        import pyarrow.fs as pafs

        fs = source.filesystem or pafs.LocalFileSystem()
        size = sum(i.size or 0 for i in fs.get_file_info(list(source.files)))
    elif source.kind == "hf":
        size = source.obj.data.nbytes
    return int(min(64, max(2, size // (16 << 20))))


def _read(source: Source, layout, demo_pairs: int):
    import pyarrow as pa
    import ray.data

    if source.kind == "demo":
        ds = ray.data.range(demo_pairs, override_num_blocks=max(4, demo_pairs // 256))
        return ds.map_batches(_demo_rows, fn_kwargs={"split": source.demo_split,
                                                     "layout": layout},
                              batch_format="numpy", batch_size=ROWS_PER_BLOCK)
    if source.kind == "files":
        return ray.data.read_datasource(_datasource_class()(list(source.files), layout,
                                                            source.filesystem))
    if source.kind == "hf":
        # From the Arrow table, not ray.data.from_huggingface: that first asks the hub
        # for parquet copies of hub-loaded data (a minute of timeouts without network).
        table = source.obj.with_format("arrow")[:]
        table = table.append_column("__row_id", pa.array(np.arange(len(table), dtype=np.int64)))
        step = 8 * ROWS_PER_BLOCK
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(table), step)]
                                 or [table])
        return ds.map_batches(_rows_with_ids, fn_kwargs={"layout": layout,
                                                         "id_column": "__row_id"},
                              batch_format="pyarrow", batch_size=ROWS_PER_BLOCK)
    return source.obj.map_batches(_rows_with_ids, fn_kwargs={"layout": layout,
                                                             "id_column": None},
                                  batch_format="pyarrow", batch_size=ROWS_PER_BLOCK)


SPLIT_BUCKETS = 1_000_000  # the held-out split's resolution: a row's hash mod this


def _split_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    # Stable hash of the row id, independent of block boundaries and run.
    with np.errstate(over="ignore"):  # wrap-around multiplication is the point
        x = ids.astype(np.uint64) + np.uint64(seed) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(31))) * np.uint64(0x9E3779B97F4A7C15)
    return (x >> np.uint64(24)) % np.uint64(SPLIT_BUCKETS)


def _in_eval_split(ids: np.ndarray, fraction: float, seed: int, cut: int | None = None
                   ) -> np.ndarray:
    cut = round(fraction * SPLIT_BUCKETS) if cut is None else cut
    return _split_hash(ids, seed) < np.uint64(cut)


def _split_keys(batch: dict[str, np.ndarray]) -> np.ndarray:
    # Rows of one group (an OpenAssistant tree) fall on the same side: a prompt held
    # out is not also trained on through a sibling pair.
    return batch["group"] if "group" in batch else batch["id"]


def _split_filter(batch: dict[str, np.ndarray], fraction: float, seed: int, held: bool,
                  cut: int | None = None):
    keep = _in_eval_split(_split_keys(batch), fraction, seed, cut)
    keep = keep if held else ~keep
    return {k: v[keep] for k, v in batch.items()}


def split_held_out(ds, fraction: float, seed: int, cut: int | None = None):
    """(train, held-out) views of one normalised dataset, by a hash of the row id (of
    the group id where rows come in groups): `fraction` of the hash's range, or the
    hashes below `cut`."""
    kw = {"batch_format": "numpy", "batch_size": ROWS_PER_BLOCK}
    return tuple(ds.map_batches(_split_filter, fn_kwargs={"fraction": fraction, "seed": seed,
                                                          "held": held, "cut": cut}, **kw)
                 for held in (False, True))


def _usable_hashes(batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    keys = np.unique(_split_keys(batch)[batch["drop"].astype(str) == ""])
    return {"h": _split_hash(keys, seed), "key": keys}


def smallest_split_hashes(ds, seed: int) -> list[tuple[int, int]]:
    """The usable rows' split keys (groups, or rows) with the two smallest split hashes,
    as (hash, key): what a small data set whose held-out share came out empty holds out
    instead (the one with the smallest hash)."""
    cols = ["id", "drop"] + (["group"] if "group" in ds.columns() else [])
    best: list[tuple[int, int]] = []
    for b in ds.select_columns(cols).map_batches(
            _usable_hashes, fn_kwargs={"seed": seed}, batch_format="numpy",
            batch_size=4096).iter_batches(batch_format="numpy", batch_size=None):
        best = sorted(set(best) | {(int(h), int(k)) for h, k in zip(b["h"], b["key"])})[:2]
    return best


# ------------------------------------------------------------------------ tokenising

_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(path: str):
    # One load per Ray worker process, not per batch.
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = auto_tokenizer(path)
    return _TOKENIZERS[path]


def encode(tok, text: str, templated: bool) -> list[int]:
    """Token ids of `text`. Text rendered by a chat template already holds its special
    tokens (Llama 3's template starts with <|begin_of_text|>), so the tokenizer adds
    none then: a second BOS would put every chat sequence off its training layout."""
    return tok(text, add_special_tokens=not templated)["input_ids"]


def tokenize_pair(tok, prompt: str, chosen: str, rejected: str, chat: bool,
                  max_length: int, max_prompt_length: int, truncation: str):
    """`pair_tokens` without the lengths before truncation."""
    return pair_tokens(tok, prompt, chosen, rejected, chat, max_length, max_prompt_length,
                       truncation)[:6]


def pair_tokens(tok, prompt: str, chosen: str, rejected: str, chat: bool,
                max_length: int, max_prompt_length: int, truncation: str):
    """Strings (or JSON message lists) -> token ids, as TRL 1.16's DPOTrainer does it.

    The prompt is tokenised alone and again joined with each response (+ EOS for plain
    text; the chat template closes chat turns itself); the split point is the common
    prefix, so tokens that merge across the boundary are handled. Then truncation:
    the prompt keeps its last `max_prompt_length` tokens, and each response is cut so
    that prompt + response fits `max_length`.

    Returns (prompt_ids, chosen_ids, rejected_ids, prompt_truncated,
    response_truncated, drop reason or "", prompt tokens and prompt + longer response
    tokens before truncation).
    """
    if chat:
        p_msgs, c_msgs, r_msgs = json.loads(prompt), json.loads(chosen), json.loads(rejected)
        prompt = tok.apply_chat_template(p_msgs, tokenize=False, add_generation_prompt=True)
        full_c = tok.apply_chat_template(p_msgs + c_msgs, tokenize=False)
        full_r = tok.apply_chat_template(p_msgs + r_msgs, tokenize=False)
    else:
        eos = tok.eos_token or ""
        full_c = prompt + chosen + ("" if chosen.endswith(eos) else eos)
        full_r = prompt + rejected + ("" if rejected.endswith(eos) else eos)
    p_ids = encode(tok, prompt, chat)
    pc, pr = encode(tok, full_c, chat), encode(tok, full_r, chat)
    n = min(common_prefix_len(p_ids, pc), common_prefix_len(p_ids, pr))
    p_ids, c_ids, r_ids = p_ids[:n], pc[n:], pr[n:]
    full = (len(p_ids), len(p_ids) + max(len(c_ids), len(r_ids)))
    p_cut = len(p_ids) > max_prompt_length
    room = max_length - min(len(p_ids), max_prompt_length)
    r_cut = len(c_ids) > room or len(r_ids) > room
    if truncation == "drop" and (p_cut or full[1] > max_length):
        return [], [], [], False, False, DROP_TOO_LONG, full
    if p_cut:
        p_ids = p_ids[-max_prompt_length:]
    c_ids, r_ids = c_ids[:room], r_ids[:room]
    if not c_ids or not r_ids:
        return [], [], [], p_cut, r_cut, DROP_PROMPT_TOO_LONG, full
    return p_ids, c_ids, r_ids, p_cut, r_cut, "", full


TOKENISED_COLUMNS = ("id", "prompt_ids", "chosen_ids", "rejected_ids", "prompt_truncated",
                     "response_truncated", "drop", "full")  # full: the lengths' two columns


def tokenize_batch(batch: dict[str, np.ndarray], tokenizer_path: str, max_length: int,
                   max_prompt_length: int, truncation: str) -> Any:
    """map_batches body: normalised rows -> token ids (list<int32> columns)."""
    import pyarrow as pa

    tok = _tokenizer(tokenizer_path)
    out = {k: [] for k in TOKENISED_COLUMNS}
    for i in range(len(batch["id"])):
        drop = str(batch["drop"][i])
        if drop:
            res = ([], [], [], False, False, drop, (0, 0))
        else:
            res = pair_tokens(tok, str(batch["prompt"][i]), str(batch["chosen"][i]),
                              str(batch["rejected"][i]), bool(batch["chat"][i]),
                              max_length, max_prompt_length, truncation)
        out["id"].append(int(batch["id"][i]))
        for key, val in zip(TOKENISED_COLUMNS[1:], res):
            out[key].append(val)
    ids = pa.list_(pa.int32())
    return pa.table({
        "id": pa.array(out["id"], pa.int64()),
        "prompt_ids": pa.array(out["prompt_ids"], ids),
        "chosen_ids": pa.array(out["chosen_ids"], ids),
        "rejected_ids": pa.array(out["rejected_ids"], ids),
        "prompt_truncated": pa.array(out["prompt_truncated"], pa.bool_()),
        "response_truncated": pa.array(out["response_truncated"], pa.bool_()),
        "drop": pa.array(out["drop"], pa.string()),
        "margin": pa.array(np.asarray(batch["margin"], dtype=np.float64)),
        # before truncation: the prompt, and the prompt with the longer response
        "full_prompt_length": pa.array([f[0] for f in out["full"]], pa.int32()),
        "full_length": pa.array([f[1] for f in out["full"]], pa.int32()),
    })


def tokenize(ds, tokenizer_path: str, cfg: DataConfig):
    return ds.map_batches(
        tokenize_batch, batch_format="numpy", batch_size=ROWS_PER_BLOCK,
        fn_kwargs={"tokenizer_path": tokenizer_path, "max_length": cfg.max_length,
                   "max_prompt_length": cfg.max_prompt_length, "truncation": cfg.truncation})


@dataclass(frozen=True)
class RowKind:
    """What a pipeline carries: preference pairs (DPO, reward model) or SFT examples
    (rlhf.data.examples.EXAMPLES). The stages around them (sources, ids, held-out split,
    counting, streaming to workers) are the same.

    detect(first_row, data_cfg, source_name) -> a layout whose .table(ids, rows) gives
    the normalised Arrow table (with id and drop columns); tokenize(ds, tokenizer_path,
    data_cfg) -> the tokenised dataset the workers read.
    """

    name: str  # what a row is called in messages
    detect: Callable
    tokenize: Callable
    splits: Splits = PAIR_SPLITS  # which splits of a multi-split dataset it reads
    formats_as: str = ""  # the kind of rows public formats give it (default: name)
    rows_per: Callable[[Any], int] = lambda layout: 1  # rows trained per usable source
    # row, from the layout (KTO: 2 for a pair, split in two at tokenising)


PAIRS = RowKind("pairs", detect_layout, tokenize)


# ------------------------------------------------------------------- driver-side scan


GROUP_KEY = "group:"  # scan's per-group counts of usable rows: "group:<id>" -> n


LABEL_KEY = "label:"  # scan's counts of usable unpaired rows by label: "label:True" -> n


def _count_drops(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = batch["drop"].astype(str)
    usable = keys == ""
    if "group" in batch:  # count the usable rows of each group (tree) too
        keys = np.concatenate([keys, np.char.add(GROUP_KEY, batch["group"][usable].astype(str))])
    if "label" in batch:  # and the usable unpaired rows by label
        keys = np.concatenate([keys, np.char.add(LABEL_KEY,
                                                 batch["label"][usable].astype(bool).astype(str))])
    reasons, counts = np.unique(keys, return_counts=True)
    return {"drop": reasons, "n": counts}


def scan(ds, per_group: list[int] | None = None, labels: Counter | None = None) -> Counter:
    """One streamed pass (no tokenising) counting rows by drop reason ("" = usable); with
    per_group (rows in groups: OpenAssistant trees, a `group` column), the usable rows of
    each group with any are appended to it; with labels (unpaired rows), the usable rows
    are counted by label into it (True: desirable).

    Also surfaces malformed files before any worker starts.
    """
    columns = (["drop"] + (["group"] if per_group is not None else [])
               + (["label"] if labels is not None else []))
    totals: Counter = Counter()
    for batch in ds.select_columns(columns).map_batches(
            _count_drops, batch_format="numpy", batch_size=4096).iter_batches(
            batch_format="numpy", batch_size=None):
        for reason, n in zip(batch["drop"], batch["n"]):
            totals[str(reason)] += int(n)
    groups = {k: n for k, n in totals.items() if k.startswith(GROUP_KEY)}
    if per_group is not None:
        per_group.extend(groups.values())
    by_label = {k: n for k, n in totals.items() if k.startswith(LABEL_KEY)}
    if labels is not None:
        labels.update({k[len(LABEL_KEY):] == "True": n for k, n in by_label.items()})
    return Counter({k: n for k, n in totals.items() if k not in groups and k not in by_label})


@dataclass
class Plan:
    """Sources and their layouts, checked on the driver before Ray starts."""

    train: Source
    held: Source | None
    train_layout: Any
    held_layout: Any
    kind: RowKind = PAIRS


def inspect(cfg: Any, dataset: Any = None, eval_dataset: Any = None,
            kind: RowKind = PAIRS) -> Plan:
    """Resolve sources and detect their format from the first row, without Ray: missing
    files, empty data and missing columns fail here, in a second, with the fix named."""
    train_src, held_src = resolve_sources(cfg, dataset, eval_dataset, kind.splits)
    first = peek_rows(train_src, 1)
    if not first:
        raise DataError(f"{train_src.name}: the data set is empty (no rows).")
    layout = detect(kind, first[0], cfg, train_src.name)
    held_layout = None
    if held_src is not None:
        held_first = peek_rows(held_src, 1)
        if not held_first:
            raise DataError(f"{held_src.name}: the held-out data set is empty.")
        held_layout = detect(kind, held_first[0], cfg, held_src.name)
    elif cfg.eval_fraction <= 0:
        raise DataError("No held-out data: set data.eval_path or data.eval_fraction > 0.")
    return Plan(train_src, held_src, layout, held_layout, kind)


def detect(kind: RowKind, row: dict, cfg: Any, source_name: str) -> Any:
    """The layout of a source from its first row: a known public format
    (rlhf.data.formats: UltraFeedback, OpenAssistant) around the kind's own layout,
    or the kind's layout alone."""
    fmt = formats.recognise(row)
    if not fmt:
        return kind.detect(row, cfg, source_name)
    shape = kind.formats_as or kind.name
    inner = kind.detect(formats.sample_row(fmt, shape, row), cfg,
                        f"{source_name} ({formats.describe(fmt)})")
    langs = tuple(x.strip() for x in getattr(cfg, "lang", "").split(",") if x.strip())
    return formats.wrap(fmt, inner, shape, langs, row)


@dataclass
class Pipelines:
    """What an entry point needs: streamed, tokenised splits and their first counts."""

    train: Any
    eval: Any
    train_counts: Counter
    eval_counts: Counter
    notes: tuple[str, ...] = ()  # what the driver prints after the counts
    labels: Counter | None = None  # unpaired data: usable training rows by label
    train_rows: int = 0  # rows the workers train on per epoch (train_counts'
    # usable rows, times the kind's rows_per)
    eval_rows: int = 0  # the same for the held-out split


def build(plan: Plan, cfg: Any, tokenizer_path: str, seed: int) -> Pipelines:
    """Plan -> tokenised train/eval Ray Datasets, after one counting pass over both."""
    source = train = read_normalised(plan.train, plan.train_layout, cfg.demo_pairs)
    if plan.held is None:
        train, held = split_held_out(source, cfg.eval_fraction, seed)
    else:
        held = read_normalised(plan.held, plan.held_layout, cfg.demo_eval_pairs)
    what, notes = plan.kind.name, []

    def count():
        per_group: list[int] = []  # usable rows per tree, where rows come in trees
        labels = Counter() if hasattr(plan.train_layout, "label") else None  # unpaired
        grouped = hasattr(plan.train_layout, "regroup")
        train_counts = scan(train, per_group if grouped else None, labels)
        held_layout = plan.held_layout or plan.train_layout  # None: held out of train
        eval_counts = scan(held, per_group if hasattr(held_layout, "regroup") else None)
        return train_counts, eval_counts, per_group, labels

    train_counts, eval_counts, per_group, labels = count()
    if train_counts[""] + (0 if plan.held else eval_counts[""]) == 0:
        raise DataError(f"{plan.train.name}: no usable {what} "
                        f"({describe_counts(train_counts)}).")
    if eval_counts[""] == 0 and plan.held is None:
        # A small data set split by a hash (of its trees, for OpenAssistant) can hold
        # nothing out: hold out the group (or row) with the smallest hash instead.
        first = smallest_split_hashes(source, seed)
        unit = "trees" if hasattr(plan.train_layout, "regroup") else what
        if len(first) < 2:
            raise DataError(
                f"{plan.train.name}: its usable {what} make one {unit[:-1]}, which cannot be "
                "both trained on and held out. Give held-out data with data.eval_path "
                "(the run then trains on all of it), or more data.")
        train, held = split_held_out(source, 0.0, seed, cut=first[0][0] + 1)
        train_counts, eval_counts, per_group, labels = count()
        notes.append(f"held-out: data.eval_fraction={cfg.eval_fraction} of this data held "
                     f"none of its {unit} out, so the first by the split's hash is held out "
                     f"({eval_counts['']} {what}); set data.eval_path, or a larger "
                     "data.eval_fraction, to choose")
    cap = getattr(cfg, "eval_max_rows", 0)
    if plan.held is None and cap and eval_counts[""] > cap:
        # Large data: 5% of 500,000 pairs is 25,000 held-out pairs, evaluated for minutes
        # at every eval step for an interval no one needs. A smaller cut of the same
        # hash keeps the split stable; the rows it releases train.
        wanted = eval_counts[""]
        cut = max(1, round(cfg.eval_fraction * SPLIT_BUCKETS) * cap // wanted)
        train, held = split_held_out(source, 0.0, seed, cut=cut)
        train_counts, eval_counts, per_group, labels = count()
        notes.append(f"held-out: {eval_counts['']} {what} of the {wanted} "
                     f"data.eval_fraction={cfg.eval_fraction} would hold out "
                     f"(data.eval_max_rows={cap}); the rest train")
    if train_counts[""] == 0:
        raise DataError(f"{plan.train.name}: no usable {what} to train on "
                        f"({describe_counts(train_counts)}).")
    if eval_counts[""] == 0:
        raise DataError(f"held-out data: no usable {what} ({describe_counts(eval_counts)}).")
    tok = plan.kind.tokenize
    fmt = getattr(plan.train_layout, "source_format", "")
    if fmt:
        notes.append(f"format: {formats.describe(fmt)}")
    if per_group:
        notes.append(f"{what} per tree: {np.mean(per_group):.2f} mean, "
                     f"{int(np.median(per_group))} median, {max(per_group)} max, over "
                     f"{len(per_group)} trees with any")
    per = plan.kind.rows_per(plan.train_layout)
    if per > 1:
        notes.append(f"each usable source row gives {per} {what}: {train_counts[''] * per} "
                     f"{what} to train on")
    return Pipelines(tok(train, tokenizer_path, cfg), tok(held, tokenizer_path, cfg),
                     train_counts, eval_counts, tuple(notes), labels,
                     train_counts[""] * per,
                     eval_counts[""] * plan.kind.rows_per(plan.held_layout or plan.train_layout))


def describe_counts(counts: Counter) -> str:
    total = sum(counts.values())
    dropped = {k: v for k, v in counts.items() if k}
    text = f"{total} rows, {counts['']} usable"
    if dropped:
        text += "; dropped: " + ", ".join(f"{v} {k}" for k, v in sorted(dropped.items()))
    return text


# --------------------------------------------------------------- truncation, in advance

# A row flag of truncation -> (the row's length before it, the setting that cut it, what
# was cut).
TRUNCATION = {"prompt_truncated": ("full_prompt_length", "data.max_prompt_length", "prompts"),
              "response_truncated": ("full_length", "data.max_length", "responses"),
              "truncated": ("full_length", "data.max_length", "examples")}
PREVIEW_ROWS = 2000  # the rows tokenised before training to count what the limits cut


def truncation_preview(ds, flags: dict, limit: int = PREVIEW_ROWS) -> dict:
    """What the length limits will cut, from the first `limit` rows of a tokenised split
    (all of them when it has fewer): {"rows": usable rows read, "all": whether that was
    the whole split, flag: (rows cut, the longest of them before truncation)}."""
    keys = [f for f in flags if f in TRUNCATION]
    cols = sorted({"drop", *keys, *(TRUNCATION[f][0] for f in keys)})
    rows = [r for r in ds.select_columns(cols).limit(limit + 1).take_all() if not r["drop"]]
    out: dict = {"rows": min(len(rows), limit), "all": len(rows) <= limit}
    for f in keys:
        cut = [int(r[TRUNCATION[f][0]]) for r in rows[:limit] if r[f]]
        out[f] = (len(cut), max(cut, default=0))
    return out


def describe_truncation(preview: dict, what: str, trained: dict | None = None) -> str:
    """One line on what the length limits cut ("" when nothing): before training from
    the preview, or after it from the run's counts (`trained`: {flag label: rows}), with
    the setting that keeps the longest whole."""
    parts = []
    for f, (setting, noun) in ((f, TRUNCATION[f][1:]) for f in TRUNCATION if f in preview):
        cut, longest = preview[f]
        n = trained.get(f, 0) if trained is not None else cut
        if n:
            hint = (f"the longest seen {longest} tokens: {setting}={longest} keeps it whole"
                    if longest else f"raise {setting} to keep them whole")
            noun = what if noun == "examples" else noun
            parts.append(f"{n} {noun[:-1] if n == 1 else noun} ({hint})")
    if not parts:
        return ""
    if trained is not None:
        return "length limits: training cut " + "; ".join(parts)
    scope = (f"all {preview['rows']}" if preview["all"]
             else f"a sample, the first {preview['rows']}")
    return (f"length limits: of {scope} {what}, these will be cut: " + "; ".join(parts)
            + ". Their cut tokens are not trained on")
