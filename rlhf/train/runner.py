"""The driver every training entry point shares (rlhf.dpo, rlhf.rm, rlhf.sft).

config -> Ray -> pipelines (counts printed) -> TorchTrainer -> fit -> model copied to
the run directory -> summary.json, curves.png. The entry point supplies its worker
loop, what its rows are (rlhf.data.pipeline.PAIRS or rlhf.data.examples.EXAMPLES), what it adds to
the pipelines (DPO's reference pass) and its final message.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError, parse_args, resolved_learning_rate, to_dict


def run_training(cfg: Any, *, prefix: str, loop: Callable, dataset: Any = None,
                 eval_dataset: Any = None, loop_config: dict | None = None,
                 add_to_pipelines: Callable | None = None, notes: list[str] | None = None,
                 plot_keys: tuple[str, ...] = ("loss",), kind: Any = None,
                 setup: Callable | None = None, extra_cpus: float = 0.0,
                 train_split_to_workers: bool = True, worker_labels: dict | None = None,
                 crash_once_at_step: int | None = None,
                 evaluate: Callable[[Path], Path] | None = None) -> Path:
    """Train; returns the run directory.

    dataset / eval_dataset: in-memory datasets.Dataset or ray.data.Dataset (then
    data.path is ignored). loop_config: extra keys for the worker (model_path,
    total_steps, learning_rate, run_log and config are always there).
    add_to_pipelines(pipes, model_path): a last stage on the pipelines, before training.
    kind: the rows' rlhf.data.pipeline.RowKind (default: preference pairs).
    setup(model_path, plan=, pipes=, total_steps=, run_dir=) -> dict: after Ray is up
    and the pipelines are built, before training; its result joins the loop config
    (online RL: the engines and the rollout coordinator). extra_cpus: CPUs those need,
    added to a local Ray cluster this process starts. train_split_to_workers: False when
    something else reads the train split (online RL's coordinator): Ray Train then gets
    the held-out split only. worker_labels: a Ray label selector for the training
    workers (online RL with rollout.placement=separate keeps them off rollout nodes).
    crash_once_at_step: fault injection for tests; the last worker exits hard once
    after that step, to exercise Ray Train's restart from the last checkpoint.
    evaluate(run_dir) -> the report's folder: the entry point's evaluation of the export
    (rlhf.dpo and rlhf.ppo with eval.after_training: rlhf.evaluate.after_training). It
    runs here, on the Ray cluster this run started and before the model card is written,
    so the card carries its verdict; the entry point hands it in because this module sits
    below the evaluation (see the layers in README).
    """
    import ray
    import ray.data
    import yaml

    from cluster import trackers
    from cluster.models import load_tokenizer, resolve_model_path
    from cluster.train import (check_resources, close_run_log, connect, fit, make_run_dir,
                               make_trainer, plot_curves, quiet_ray_data, start_run_log)
    from rlhf.data import pipeline as data

    kind = kind or data.PAIRS
    trackers.check(cfg.output.report_to)
    t_start = time.time()
    model_path = resolve_model_path(cfg.model.name_or_path)
    tok = load_tokenizer(model_path)  # a bad path or tokenizer fails here, not in a worker
    plan = data.inspect(cfg.data, dataset, eval_dataset, kind)
    if (any(lay is not None and lay.chat for lay in (plan.train_layout, plan.held_layout))
            and not (tok.chat_template or getattr(cfg.data, "chat_template", ""))):
        raise data.DataError(
            f"The data holds conversations but the tokenizer of {model_path} has no chat "
            "template. Start from a model whose tokenizer has one (an instruct model, or "
            "the export of an rlhf.sft run, which saves its template), or give rlhf.sft "
            "data.chat_template=<file or Jinja string>.")
    run_dir = make_run_dir(cfg.output, cfg.train.resume, prefix)

    started_ray = not ray.is_initialized()
    run_log = None
    connect(cfg.cluster, extra_cpus)
    quiet_ray_data()
    # Ray Train carries the driver's ordering choice into each worker's shard.
    ray.data.DataContext.get_current().execution_options.preserve_order = \
        cfg.data.preserve_order
    try:
        check_resources(cfg.cluster)
        print(f"reading {kind.name} from "
              f"{trackers.redact_text(cfg.data.path) if dataset is None else 'memory'} ...",
              flush=True)
        pipes = data.build(plan, cfg.data, model_path, cfg.train.seed)
        if add_to_pipelines:
            add_to_pipelines(pipes, model_path)
        print(f"train: {data.describe_counts(pipes.train_counts)}\n"
              f"held-out: {data.describe_counts(pipes.eval_counts)}", flush=True)
        for note in pipes.notes:
            print(trackers.redact_text(note), flush=True)
        t, c = cfg.train, cfg.cluster
        total = math.ceil(pipes.train_counts[""] / t.global_batch_size) * t.epochs
        if t.max_steps > 0:
            total = min(total, t.max_steps)
        extra = (setup(model_path, plan=plan, pipes=pipes, total_steps=total, run_dir=run_dir)
                 if setup else {})
        resolved = to_dict(cfg)
        lr = resolved["train"]["learning_rate"] = resolved_learning_rate(cfg)
        resolved = trackers.redact(resolved)  # no credential is written or reported
        if not cfg.train.resume:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        run_log = start_run_log(run_dir, total, kind.name, cfg.output.report_to, resolved)
        trainer = make_trainer(
            loop,
            {"config": to_dict(cfg), "model_path": model_path, "total_steps": total,
             "run_log": run_log, "learning_rate": lr, **(loop_config or {}), **extra,
             "crash_once_at_step": crash_once_at_step and {
                 "step": crash_once_at_step, "marker": str(run_dir / ".crash-injected")}},
            c, ({"train": pipes.train, "eval": pipes.eval} if train_split_to_workers
                else {"eval": pipes.eval}),
            name="checkpoints" if not c.storage_path else run_dir.name,
            storage_path=c.storage_path or str(run_dir), keep_checkpoints=t.keep_checkpoints,
            label_selector=worker_labels)
        lo, hi = c.worker_range
        workers = f"{lo}-{hi} (elastic)" if c.elastic else str(lo)
        print(f"training: {workers} workers, ZeRO-{c.zero_stage}, {total} steps of "
              f"{t.global_batch_size} {kind.name}, lr {lr:g}, run directory {run_dir}", flush=True)
        result, summary = fit(trainer, run_log, run_dir)
        summary.update({
            "wall_time_s": round(time.time() - t_start, 1),
            "tokens_per_s_overall": summary["tokens"] / max(time.time() - t_start, 1e-9),
            "data": {split: {"rows": sum(cnt.values()), "usable": cnt[""],
                             "dropped": {k: v for k, v in cnt.items() if k}}
                     for split, cnt in (("train", pipes.train_counts),
                                        ("eval", pipes.eval_counts))},
            "warnings": notes or [], "model": str(run_dir / "model"),
            "checkpoint": result.checkpoint.path})
        summary = trackers.redact(summary)
        if t.max_steps <= 0 or summary["steps"] < t.max_steps:
            # Whole epochs ran: every usable row was trained on, dropped by a worker
            # (counted), or left out by the equal split across workers (< num_workers).
            worker_drops = sum(v for k, v in summary["counts"].items() if k.startswith("dropped"))
            summary[f"{kind.name}_left_out_by_split"] = (
                pipes.train_counts[""] * t.epochs - summary["samples"] - worker_drops)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(run_dir, plot_keys)
        if evaluate is not None:
            print("evaluating the exported model against its base ...", flush=True)
            report = evaluate(run_dir)
            summary["eval_report"] = str(report / "report.html")
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        finish_export(run_dir, prefix, cfg.output, summary)
        summary["trackers"] = close_run_log(run_log, summary)
        run_log = None
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return run_dir
    finally:
        if run_log is not None:  # failed or interrupted: the trackers' runs end FAILED
            close_run_log(run_log, None)
        if started_ray:
            ray.shutdown()


def finish_export(run_dir: Path, prefix: str, output: Any, summary: dict) -> None:
    """The model card (model/README.md, with the evaluation when one ran) and, with
    output.push_to_hub, the upload; a failed upload is reported (summary.json:
    hub_upload) with the command that retries it, and the run stays as it is."""
    from rlhf.train import model_card

    model_card.write(run_dir, prefix)
    if not output.push_to_hub:
        return
    model_dir = run_dir / "model"
    try:
        url = model_card.push(model_dir, output.hub_model_id, output.hub_private)
        summary["hub_upload"] = {"repo": output.hub_model_id, "url": url}
        print(f"uploaded to the hub: {url}", flush=True)
    except Exception as e:  # noqa: BLE001 -- the run is done; say what failed and how to retry
        retry = f"hf upload {output.hub_model_id} {model_dir} ."
        summary["hub_upload"] = {"repo": output.hub_model_id, "error": f"{type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}", "retry": retry}
        print(f"warning: the upload to {output.hub_model_id} failed ({type(e).__name__}: {e}); "
              f"the model is in {model_dir}. Retry with: {retry}", file=sys.stderr, flush=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def main(cfg_cls: type, prog: str, run: Callable, done: Callable[[dict], str],
         argv: list[str] | None = None) -> int:
    """parse -> run -> print where the results are; clean messages and exit codes
    (2: bad config or data, 1: training failed)."""
    from cluster import console
    from cluster.train import TrainingError
    from rlhf.data.pipeline import DataError

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(cfg_cls, argv, prog=prog)
        run_dir = run(cfg)
    except (ConfigError, DataError) as e:
        console.fail(e)  # the traceback to the run's errors.log, the message last
        return 2
    except TrainingError as e:
        console.fail(e, "error: training failed: ")
        return 1
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"\ndone in {summary['wall_time_s']:.0f} s: {done(summary)}")
    print(f"run directory: {run_dir}\n  model: {run_dir / 'model'}\n  metrics: "
          f"{run_dir / 'metrics.jsonl'}\n  summary: {run_dir / 'summary.json'}")
    return 0
