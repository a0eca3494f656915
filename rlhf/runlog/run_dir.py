"""The run directory: where everything a run writes goes (config.yaml, metrics.jsonl,
summary.json, tensorboard/, curves.png, the model, checkpoints, run.log).

    run = make_run_dir(cfg.output, resume=cfg.train.resume, prefix="dpo")
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError
from rlhf.runlog.console import LOG_NAME, divert_to


def make_run_dir(output_cfg: Any, resume: bool, prefix: str) -> Path:
    """The run directory: output.dir/output.name, or a new `{prefix}-<time>`; with resume,
    the named run or the newest `{prefix}-*` run holding a config.yaml. Ray's logs go to
    its run.log from here on (rlhf.runlog.console)."""
    run = _run_dir(output_cfg, resume, prefix)
    divert_to(run / LOG_NAME)
    return run


def _run_dir(output_cfg: Any, resume: bool, prefix: str) -> Path:
    root = Path(output_cfg.dir).expanduser().resolve()
    if resume:
        if output_cfg.name:
            run = root / output_cfg.name
        else:
            runs = sorted((p for p in root.glob(f"{prefix}-*") if (p / "config.yaml").is_file()),
                          key=lambda p: p.stat().st_mtime)
            if not runs:
                raise ConfigError(f"train.resume=true but {root} holds no earlier {prefix} "
                                  "run; set output.name to the run to continue.")
            run = runs[-1]
        if not run.is_dir():
            raise ConfigError(f"train.resume=true but {run} does not exist.")
        return run
    run = root / (output_cfg.name or datetime.now().strftime(f"{prefix}-%Y%m%d-%H%M%S"))
    if run.exists() and any(run.iterdir()):
        raise ConfigError(f"{run} already holds a run: pick another output.name, or set "
                          "train.resume=true to continue it.")
    run.mkdir(parents=True, exist_ok=True)
    return run

