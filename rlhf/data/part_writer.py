"""Numbered parts written whole, then committed: what makes a killed batch job (rlhf.sample)
resumable without writing a row twice.

    w = PartWriter("s3://bucket/samples", ["sft", "pairs"], fingerprint={...})
    done_ids, next_part, totals = w.committed()
    w.write(next_part, {"sft": rows, "pairs": rows}, prompt_ids, counts)

Part k of each output is `<root>/<output>/part-<k>.jsonl`, written under a hidden name
(".part-....tmp", which no reader picks up) and moved into place; once every output's part
k is in place, `<root>/_progress/part-<k>.json` records the prompts it holds and its
counts: the commit. A job killed before the commit leaves part k uncommitted; the job run
again writes it anew (the same rows: sampling is seeded per prompt) over whatever was
there. Local folders and object stores (s3://, gs://: pyarrow's filesystems, credentials
from the environment) alike.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from rlhf.data.readers import DataError, object_store

PROGRESS = "_progress"


class PartWriter:
    def __init__(self, root: str, outputs: list[str], fingerprint: dict[str, Any]):
        """fingerprint: what decides the rows (model, data, sampling, rewards); a job
        resumed with another one is refused rather than mixed into the same data."""
        self.root_uri = root if "://" in root else os.path.abspath(root)
        self.fs, self.root = object_store(self.root_uri)
        self.outputs, self.fingerprint = list(outputs), fingerprint

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def committed(self) -> tuple[set[int], int, Counter]:
        """(prompt ids in committed parts, the next part's number, the committed parts'
        counts summed)."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(pafs.FileSelector(self._path(PROGRESS), allow_not_found=True))
        done: set[int] = set()
        totals: Counter = Counter()
        last = -1
        for f in sorted(i.path for i in info if i.path.endswith(".json")):
            with self.fs.open_input_stream(f) as s:
                marker = json.loads(s.read().decode())
            if marker["fingerprint"] != self.fingerprint:
                changed = sorted(k for k in set(marker["fingerprint"]) | set(self.fingerprint)
                                 if marker["fingerprint"].get(k) != self.fingerprint.get(k))
                raise DataError(
                    f"{self.root_uri} holds samples made with other settings (they differ in "
                    f"{', '.join(changed)}): resuming would mix the two. Give another "
                    "sample.output (or output.name), or delete that folder to start again.")
            done.update(marker["prompt_ids"])
            totals.update(marker["counts"])
            last = max(last, int(os.path.basename(f)[len("part-"):-len(".json")]))
        return done, last + 1, totals

    def _put(self, path: str, text: str) -> None:
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.{name}.tmp"
        self.fs.create_dir(folder, recursive=True)
        with self.fs.open_output_stream(tmp) as s:
            s.write(text.encode())
        self.fs.move(tmp, path)

    def write(self, part: int, rows: dict[str, list[dict]], prompt_ids: list[int],
              counts: dict[str, float]) -> None:
        """Part `part` of every output that has rows for it (no empty files: a reader
        would find nothing in them), then its commit marker."""
        name = f"part-{part:05d}"
        for out in self.outputs:
            if rows.get(out):
                self._put(self._path(out, f"{name}.jsonl"),
                          "".join(json.dumps(r) + "\n" for r in rows[out]))
        self._put(self._path(PROGRESS, f"{name}.json"),
                  json.dumps({"prompt_ids": sorted(prompt_ids), "counts": counts,
                              "fingerprint": self.fingerprint}))
