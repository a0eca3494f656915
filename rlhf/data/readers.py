"""Where rows come from: files, folders, saved datasets, hub datasets, object storage
(s3://, gs://), in-memory datasets and the demo, read as plain row dicts with their
position (file, line) so errors can name it. Ray is touched only to recognise (and peek
at) a ray.data.Dataset; rlhf.data.pipeline streams these readers through Ray Data.

Split names: a saved DatasetDict or a hub dataset holds several splits; the entry point
says which it wants (`Splits`: DPO and the reward model take train_prefs/test_prefs
before train/test, SFT train_sft/test_sft, PPO train_gen/test_gen, as
HuggingFaceH4/ultrafeedback_binarized names them), data.split / data.eval_split name
them outright.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import BUILTIN_DATA, BUILTIN_TOOLS, DataConfig
from rlhf.data.demo import demo_row

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
    filesystem: Any = None  # pyarrow filesystem of `files` (object storage); None: local


@dataclass(frozen=True)
class Splits:
    """Which splits of a multi-split dataset an entry point reads, best first."""

    train: tuple[str, ...] = ("train",)
    held: tuple[str, ...] = ("test", "validation", "eval")


PAIR_SPLITS = Splits(("train_prefs", "train"), ("test_prefs", "test", "validation", "eval"))
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def resolve_sources(cfg: DataConfig, dataset: Any = None, eval_dataset: Any = None,
                    splits: Splits = PAIR_SPLITS) -> tuple[Source, Source | None]:
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
    train, held = _path_source(cfg.path, "data.path", cfg, splits)
    if cfg.eval_path:
        held, _ = _path_source(cfg.eval_path, "data.eval_path", cfg, splits)
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


def _path_source(path_str: str, key: str, cfg: Any, splits: Splits
                 ) -> tuple[Source, Source | None]:
    if "://" in path_str:
        return _object_store_source(path_str, key), None
    path = Path(path_str).expanduser()
    if not path.exists():
        if HUB_ID.match(path_str):
            return _hub_source(path_str, key, cfg, splits)
        raise DataError(f"{key}={path_str}: no such file or folder. Give a .jsonl/.json/"
                        ".parquet/.csv file, a folder of them, a datasets.save_to_disk "
                        "folder, a hub dataset id (owner/name), an s3:// or gs:// path, "
                        f"{BUILTIN_DATA} or {BUILTIN_TOOLS}.")
    path = path.resolve()
    if path.is_dir() and _is_dataset_repo(path):
        return _hub_source(str(path), key, cfg, splits)
    if path.is_file():
        if not path.name.endswith(READABLE):
            raise DataError(f"{key}={path_str}: cannot read this file type; use one of "
                            f"{', '.join(READABLE)}.")
        return Source("files", str(path), files=(str(path),)), None
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
        names = json.loads((path / "dataset_dict.json").read_text())["splits"]
        train, held = pick_splits(names, cfg, splits, f"{key}={path_str}")
        train_src = Source("files", f"{path}/{train}",
                           files=tuple(_saved_dataset_files(path / train)))
        held_src = (Source("files", f"{path}/{held}",
                           files=tuple(_saved_dataset_files(path / held))) if held else None)
        return train_src, held_src
    if (path / "state.json").is_file():  # Dataset.save_to_disk
        return Source("files", str(path), files=tuple(_saved_dataset_files(path))), None
    return Source("files", str(path), files=tuple(_data_files(path))), None


def pick_splits(names: list[str], cfg: Any, splits: Splits, where: str
                ) -> tuple[str, str | None]:
    """(training split, held-out split or None) among a dataset's split names."""
    want = getattr(cfg, "split", "")
    if want:
        if want not in names:
            raise DataError(f"{where}: no split named data.split={want!r}; its splits are "
                            f"{', '.join(names)}.")
        train = want
    else:
        train = next((s for s in splits.train if s in names), None)
        if train is None and len(names) == 1:
            train = names[0]
        if train is None:
            raise DataError(f"{where}: splits {', '.join(names)}, none named "
                            f"{' or '.join(splits.train)}; say which with data.split=<name>.")
    want_held = getattr(cfg, "eval_split", "")
    if want_held:
        if want_held not in names:
            raise DataError(f"{where}: no split named data.eval_split={want_held!r}; its "
                            f"splits are {', '.join(names)}.")
        return train, want_held
    # train_prefs pairs with test_prefs, train with test.
    paired = train.replace("train", "test", 1) if train.startswith("train") else ""
    held = next((s for s in (paired,) + splits.held if s and s in names and s != train), None)
    return train, held


def _is_dataset_repo(folder: Path) -> bool:
    """A folder laid out as a hub dataset repository: a README.md whose YAML header
    declares the data files (configs:) or the dataset's features (dataset_info:)."""
    card = folder / "README.md"
    if not card.is_file():
        return False
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return False
    header = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    return bool(re.search(r"^(configs|dataset_info):", header, re.M))


def _hub_source(name: str, key: str, cfg: Any, splits: Splits
                ) -> tuple[Source, Source | None]:
    """A hub id (or a folder laid out as a hub repository) through datasets.load_dataset
    and the hub cache (HF_HUB_OFFLINE=1: the cache only)."""
    import datasets

    subset = getattr(cfg, "subset", "") or None
    revision = getattr(cfg, "revision", "") or None
    where = f"{key}={name}" + (f" (data.subset={subset})" if subset else "")
    if not Path(name).is_dir() and not _offline() and not _hub_reachable():
        # datasets retries an unreachable hub for ~25 s with backoff; say it at once.
        raise DataError(_hub_advice(name, where, ConnectionError(
            f"{_hub_host()} cannot be reached")))
    try:
        loaded = datasets.load_dataset(name, subset, revision=revision)
    except Exception as e:  # noqa: BLE001 -- every failure gets the same advice
        raise DataError(_hub_advice(name, where, e)) from None
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    train, held = pick_splits(list(loaded), cfg, splits, where)
    held_src = Source("hf", f"{name} [{held}]", obj=loaded[held]) if held else None
    return Source("hf", f"{name} [{train}]", obj=loaded[train]), held_src


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() not in ("", "0", "false", "no")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connection to the hub (name lookup included), a few seconds at most."""
    import socket

    try:
        socket.create_connection((_hub_host(), 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _hub_advice(name: str, where: str, e: Exception) -> str:
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if Path(name).is_dir():
        return f"{where}: the folder could not be loaded as a hub dataset ({text})."
    if _offline():
        return (f"{where}: not in the local hub cache and HF_HUB_OFFLINE is set ({text}). "
                "Download it once on a machine with network access (python -c \"import "
                f"datasets; datasets.load_dataset('{name}')\") and share HF_HOME, or point "
                "data.path at local files.")
    return (f"{where}: no local file or folder of that name, and could not load it from "
            f"the hub ({text}). Check the path, or the id (and "
            "data.subset / data.revision), your network and HF_TOKEN for gated data sets; "
            "without network, set HF_HUB_OFFLINE=1 to use the local cache, or point "
            "data.path at local files.")


def object_store(uri: str):
    """(pyarrow filesystem, path without the scheme) for s3://, gs://, ... URIs.

    S3 credentials, endpoint and region found in this process's environment (AWS_*) are
    written into the filesystem object, which travels with the work to Ray's workers:
    they may run under another environment (a Ray cluster started before the variables
    were set, other nodes). Without them, each node's own chain applies (instance roles).
    """
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    env = os.environ
    if uri.startswith("s3://") and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        kw = {"access_key": env["AWS_ACCESS_KEY_ID"], "secret_key": env["AWS_SECRET_ACCESS_KEY"],
              "session_token": env.get("AWS_SESSION_TOKEN"), "region": fs.region}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        fs = pafs.S3FileSystem(**kw)
    return fs, path


def _object_store_source(uri: str, key: str) -> Source:
    """s3://bucket/prefix, gs://..., or any URI pyarrow has a filesystem for: one file,
    or every readable file under the prefix. Credentials and endpoints come from the
    usual environment (AWS_*, GOOGLE_*; see object_store for where they are read)."""
    import pyarrow.fs as pafs

    try:
        fs, root = object_store(uri)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            if not root.endswith(READABLE):
                raise DataError(f"{key}={uri}: cannot read this file type; use one of "
                                f"{', '.join(READABLE)}.")
            files = [root]
        elif info.type == pafs.FileType.Directory:
            files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                           if i.type == pafs.FileType.File and i.path.endswith(READABLE)
                           and not os.path.basename(i.path).startswith("."))
        else:
            files = []
    except (OSError, ValueError) as e:
        raise DataError(f"{key}={uri}: cannot read it ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0]}). Check the path and the "
                        "credentials in the environment (AWS_ACCESS_KEY_ID, "
                        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, or "
                        "GOOGLE_APPLICATION_CREDENTIALS).") from None
    if not files:
        raise DataError(f"{key}={uri}: no data files there (looked for "
                        f"{', '.join(READABLE)}).")
    return Source("files", uri, files=tuple(files), filesystem=fs)


# ------------------------------------------------------------------ raw rows from files


def iter_file_rows(f: Any, path: str):
    """Yield (row number, row dict) from one open file; errors name file and line. A file
    that is not what its name says (text saved as .parquet, a truncated download, binary
    data in a .jsonl) is one DataError naming it, not the reader's traceback."""
    import pyarrow as pa

    kind = (path[:-3] if path.endswith(".gz") else path).rsplit(".", 1)[-1]
    try:
        yield from _file_rows(f, path)
    except (pa.ArrowException, UnicodeDecodeError, EOFError, OSError) as e:
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable .{kind} file ({what}). Check that the file "
                        f"is what its name says (e.g. not text saved as .{kind}), or "
                        "convert it to JSON lines (.jsonl).") from None


def _file_rows(f: Any, path: str):
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
                    f"{path}, line {lineno}: not valid JSON ({e.msg}, column {e.colno}). "
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
        return [demo_row(i, source.demo_split) for i in range(n)]
    if source.kind == "hf":
        return [source.obj[i] for i in range(min(n, len(source.obj)))]
    if source.kind == "ray":
        return source.obj.take(n)
    import pyarrow.fs as pafs

    rows: list[dict] = []
    for path in source.files:
        fs = source.filesystem or pafs.LocalFileSystem()
        compression = "gzip" if path.endswith(".gz") else None
        opener = fs.open_input_file if path.endswith(".parquet") else (
            lambda p: fs.open_input_stream(p, compression=compression))
        with opener(path) as f:
            for _, row in iter_file_rows(f, path):
                rows.append(row)
                if len(rows) >= n:
                    return rows
    return rows
