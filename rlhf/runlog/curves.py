"""curves.png: a run's train and eval curves, from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows merged into one per step, in step order (the last step's
    training and final held-out records together; a step trained again after a restart:
    its later values)."""
    merged: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line:
            row = json.loads(line)
            merged.setdefault(row["step"], {}).update(row)
    return [merged[s] for s in sorted(merged)]


def plot_curves(run_dir: Path, keys: tuple[str, ...]) -> None:
    """curves.png: train and eval curves of `keys` from metrics.jsonl (skipped without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = read_metrics(run_dir)
    keys = tuple(k for k in keys if any(f"{split}/{k}" in r for r in rows
                                        for split in ("train", "eval"))) or keys[:1]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for split, style in (("train", "-"), ("eval", "o-")):
            pts = [(r["step"], r[f"{split}/{key}"]) for r in rows if f"{split}/{key}" in r]
            if pts:
                ax.plot(*zip(*pts), style, label=split)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)
