"""Where preference rows come from: files, folders, saved datasets, in-memory datasets
and the demo, read as plain row dicts with their position (file, line) so errors can
name it. Ray is touched only to recognise (and peek at) a ray.data.Dataset; rlhf.data
streams these readers through Ray Data.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import BUILTIN_DATA, BUILTIN_TOOLS, DataConfig

READABLE = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv", ".arrow")
ROWS_PER_BLOCK = 512


class DataError(ValueError):
    """Bad input data; the message names the source, row or column, and the fix."""


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    """Where one split's rows come from."""

    kind: str  # "demo", "files", "hf" or "ray"
    name: str  # shown in messages
    files: tuple[str, ...] = ()
    obj: Any = None
    demo_split: str = "train"


def _data_files(folder: Path) -> list[str]:
    files = sorted(str(p) for p in folder.rglob("*")
                   if p.is_file() and p.name.endswith(READABLE) and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: no data files in this folder (looked for "
                        f"{', '.join(READABLE)}).")
    return files


def _saved_dataset_files(folder: Path) -> list[str]:
    state = json.loads((folder / "state.json").read_text())
    return [str(folder / f["filename"]) for f in state["_data_files"]]


def resolve_sources(cfg: DataConfig, dataset: Any = None, eval_dataset: Any = None
                    ) -> tuple[Source, Source | None]:
    """Config (or in-memory datasets) -> (train source, held-out source or None).

    None for held-out means: hold out cfg.eval_fraction of the training source.
    """
    if dataset is not None:
        train = _object_source(dataset, "the training dataset")
        held = _object_source(eval_dataset, "the eval dataset") if eval_dataset is not None else None
        return train, held
    if cfg.path == BUILTIN_DATA:
        return (Source("demo", BUILTIN_DATA, demo_split="train"),
                Source("demo", BUILTIN_DATA + " (held-out topics)", demo_split="eval"))
    if cfg.path == BUILTIN_TOOLS:
        return (Source("demo", BUILTIN_TOOLS, demo_split="tools-train"),
                Source("demo", BUILTIN_TOOLS + " (held-out)", demo_split="tools-eval"))
    train, held = _path_source(cfg.path, "data.path")
    if cfg.eval_path:
        held, _ = _path_source(cfg.eval_path, "data.eval_path")
    return train, held


def _object_source(obj: Any, what: str) -> Source:
    import datasets
    import ray.data

    if isinstance(obj, datasets.Dataset):
        return Source("hf", what, obj=obj)
    if isinstance(obj, ray.data.Dataset):
        return Source("ray", what, obj=obj)
    raise DataError(f"{what} is a {type(obj).__name__}; pass a datasets.Dataset, a "
                    "ray.data.Dataset, or a path in data.path.")


def _path_source(path_str: str, key: str) -> tuple[Source, Source | None]:
    path = Path(path_str).expanduser()
    if not path.exists():
        raise DataError(f"{key}={path_str}: no such file or folder. Give a .jsonl/.json/"
                        ".parquet/.csv file, a folder of them, a datasets.save_to_disk "
                        f"folder, {BUILTIN_DATA} or {BUILTIN_TOOLS}.")
    path = path.resolve()
    if path.is_file():
        if not path.name.endswith(READABLE):
            raise DataError(f"{key}={path_str}: cannot read this file type; use one of "
                            f"{', '.join(READABLE)}.")
        return Source("files", str(path), files=(str(path),)), None
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if "train" not in splits:
            raise DataError(f"{key}={path_str}: saved DatasetDict has splits {splits}, "
                            "none named 'train'; point data.path at one split's folder.")
        train = Source("files", f"{path}/train",
                       files=tuple(_saved_dataset_files(path / "train")))
        held = next((s for s in ("test", "validation", "eval") if s in splits), None)
        held_src = (Source("files", f"{path}/{held}",
                           files=tuple(_saved_dataset_files(path / held))) if held else None)
        return train, held_src
    if (path / "state.json").is_file():  # Dataset.save_to_disk
        return Source("files", str(path), files=tuple(_saved_dataset_files(path))), None
    return Source("files", str(path), files=tuple(_data_files(path))), None


# ------------------------------------------------------------------ raw rows from files


def iter_file_rows(f: Any, path: str):
    """Yield (row number, row dict) from one open file; errors name file and line."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".jsonl", ".json")):
        text = io.TextIOWrapper(f, encoding="utf-8")
        first = ""
        lines = iter(text)
        for first in lines:
            if first.strip():
                break
        if name.endswith(".json") and first.lstrip().startswith("["):
            whole = first + "".join(lines)
            try:
                rows = json.loads(whole)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}). "
                                "Fix the file or convert it to JSON lines.") from None
            for i, row in enumerate(rows):
                yield i, row
            return
        lineno = 0
        for line in _chain_first(first, lines):
            lineno += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}). "
                    "Fix or delete that line.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object with the "
                                f"pair's columns, got {type(row).__name__}.")
            yield lineno, row
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    elif name.endswith(".csv"):
        import pyarrow.csv as pcsv

        n = 0
        reader = pcsv.open_csv(f, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
        for batch in reader:
            for row in batch.to_pylist():
                n += 1
                yield n, row
    elif name.endswith(".arrow"):
        import pyarrow as pa

        n = 0
        for batch in pa.ipc.open_stream(f):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    else:
        raise DataError(f"{path}: cannot read this file type.")


def _chain_first(first: str, rest):
    if first:
        yield first
    yield from rest


def peek_rows(source: Source, n: int = 1) -> list[dict]:
    """The first n raw rows of a source, read directly (no Ray), for format detection."""
    if source.kind == "demo":
        from rlhf.demo import demo_row

        return [demo_row(i, source.demo_split) for i in range(n)]
    if source.kind == "hf":
        return [source.obj[i] for i in range(min(n, len(source.obj)))]
    if source.kind == "ray":
        return source.obj.take(n)
    import pyarrow.fs as pafs

    rows: list[dict] = []
    for path in source.files:
        fs = pafs.LocalFileSystem()
        compression = "gzip" if path.endswith(".gz") else None
        opener = fs.open_input_file if path.endswith(".parquet") else (
            lambda p: fs.open_input_stream(p, compression=compression))
        with opener(path) as f:
            for _, row in iter_file_rows(f, path):
                rows.append(row)
                if len(rows) >= n:
                    return rows
    return rows
