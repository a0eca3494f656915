"""The driver every training entry point shares (rlhf.dpo, rlhf.rm, rlhf.sft, rlhf.ppo):
the half of a run that happens where it is launched. `run_training` reads in order:

    inputs      the model and tokenizer, the data's format and columns (no Ray yet: bad
                input fails in a second), the run directory
    Ray         joined or started, sized for the job
    pipelines   Ray Data reads, normalises, tokenises and counts the rows (what the
                entry point adds: DPO's reference pass); the number of steps
    trainer     the resolved config written, the run log started, Ray Train's
                TorchTrainer over rlhf.train.loop.train_loop with the task
    fit         the workers train; the exported model copied into the run directory
    summary     summary.json, curves.png, the evaluation after training, the model
                card, the hub upload, the trackers closed

The worker half is rlhf/train/loop.py; what is trained is the entry point's Task.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cluster.models import load_tokenizer, resolve_model_path
from cluster.ray_cluster import check_resources, connect, quiet_ray_data
from cluster.trainer import TrainingError, fit, make_trainer
from rlhf.config import ConfigError, parse_args, resolved_learning_rate, to_dict
from rlhf.data import pipeline as data
from rlhf.data.pipeline import DataError
from rlhf.runlog import console, trackers
from rlhf.runlog.curves import plot_curves, read_metrics
from rlhf.runlog.metrics_log import close_run_log, start_run_log
from rlhf.runlog.redact import redact, redact_text
from rlhf.runlog.run_dir import make_run_dir
from rlhf.train import model_card
from rlhf.train.loop import train_loop
from rlhf.train.tasks.base import Task


def run_training(cfg: Any, task: type[Task], *, dataset: Any = None,
                 eval_dataset: Any = None, loop_config: dict | None = None,
                 add_to_pipelines: Callable | None = None, notes: list[str] | None = None,
                 setup: Callable | None = None, extra_cpus: float = 0.0,
                 worker_labels: dict | None = None, crash_once_at_step: int | None = None,
                 evaluate: Callable[[Path], Path] | None = None) -> Path:
    """Train `task` (a Task class: what its rows are, its run directory's prefix, its
    plots) on cfg; returns the run directory.

    dataset / eval_dataset: in-memory datasets.Dataset or ray.data.Dataset (then
    data.path is ignored). loop_config: extra keys for the worker (task, config,
    model_path, total_steps, learning_rate and run_log are always there).
    add_to_pipelines(pipes, model_path): a last stage on the pipelines, before training.
    setup(model_path, plan=, pipes=, total_steps=, run_dir=) -> dict: after Ray is up
    and the pipelines are built, before training; its result joins the loop config
    (online RL: the engines and the rollout coordinator). extra_cpus: CPUs those need,
    added to a local Ray cluster this process starts. A task whose steps do not come
    from the train split (task.train_from_shard False: online RL's coordinator reads it)
    gives Ray Train the held-out split only. worker_labels: a Ray label selector for the
    training workers (online RL with rollout.placement=separate keeps them off rollout
    nodes). crash_once_at_step: fault injection for tests; the last worker exits hard
    once after that step, to exercise Ray Train's restart from the last checkpoint.
    evaluate(run_dir) -> the report's folder: the entry point's evaluation of the export
    (rlhf.dpo and rlhf.ppo with eval.after_training: rlhf.evaluate.after_training). It
    runs here, on the Ray cluster this run started and before the model card is written,
    so the card carries its verdict; the entry point hands it in because this module sits
    below the evaluation (docs/architecture.md: the layers).
    """
    import ray  # deferred with ray.data: an entry point's --help stays fast
    import ray.data

    t_start = time.time()
    trackers.check(cfg.output.report_to)
    model_path, plan = check_inputs(cfg, task, dataset, eval_dataset)
    run_dir = make_run_dir(cfg.output, cfg.train.resume, task.prefix)

    started_ray = not ray.is_initialized()
    run_log = None
    connect(cfg.cluster, extra_cpus)
    quiet_ray_data()
    quiet_workers = console.route_worker_output()  # their chatter to run.log
    # Ray Train carries the driver's ordering choice into each worker's shard.
    ray.data.DataContext.get_current().execution_options.preserve_order = \
        cfg.data.preserve_order
    try:
        check_resources(cfg.cluster, extra_cpus)
        print(f"reading {task.rows.name} from "
              f"{redact_text(cfg.data.path) if dataset is None else 'memory'} ...", flush=True)
        pipes = data.build(plan, cfg.data, model_path, cfg.train.seed)
        # what the length limits cut, from the tokenised rows (before a reference pass)
        preview = (data.truncation_preview(pipes.train, task.flags)
                   if task.train_from_shard else {})
        if add_to_pipelines:
            add_to_pipelines(pipes, model_path)
        print(f"train: {data.describe_counts(pipes.train_counts)}\n"
              f"held-out: {data.describe_counts(pipes.eval_counts)}", flush=True)
        for note in pipes.notes:
            print(redact_text(note), flush=True)
        cut = data.describe_truncation(preview, task.rows.name)
        if cut:
            print(cut, flush=True)
        t, c = cfg.train, cfg.cluster
        total = math.ceil(rows_per_epoch(pipes, c, task) / t.global_batch_size) * t.epochs
        if t.max_steps > 0:
            total = min(total, t.max_steps)
        extra = (setup(model_path, plan=plan, pipes=pipes, total_steps=total, run_dir=run_dir)
                 if setup else {})

        resolved = to_dict(cfg)
        lr = resolved["train"]["learning_rate"] = resolved_learning_rate(cfg)
        resolved = redact(resolved)  # no credential is written or reported
        if not cfg.train.resume:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        run_log = start_run_log(run_dir, total, task.rows.name, cfg.output.report_to, resolved)
        trainer = make_trainer(
            train_loop,
            {"task": task, "config": to_dict(cfg), "model_path": model_path,
             "total_steps": total, "run_log": run_log, "learning_rate": lr,
             "eval_rows": pipes.eval_rows, **(loop_config or {}), **extra,
             "crash_once_at_step": crash_once_at_step and {
                 "step": crash_once_at_step, "marker": str(run_dir / ".crash-injected")}},
            c, ({"train": pipes.train, "eval": pipes.eval} if task.train_from_shard
                else {"eval": pipes.eval}),
            name="checkpoints" if not c.storage_path else run_dir.name,
            storage_path=c.storage_path or str(run_dir), keep_checkpoints=t.keep_checkpoints,
            label_selector=worker_labels)
        lo, hi = c.worker_range
        workers = f"{lo}-{hi} (elastic)" if c.elastic else str(lo)
        print(f"training: {workers} workers, ZeRO-{c.zero_stage}, {total} steps of "
              f"{t.global_batch_size} {task.rows.name}, lr {lr:g}, run directory {run_dir}",
              flush=True)

        result = fit(trainer)
        with result.checkpoint.as_directory() as d:  # the export of the last checkpoint
            shutil.rmtree(run_dir / "model", ignore_errors=True)
            shutil.copytree(Path(d) / "model", run_dir / "model")

        summary = summarise(ray.get(run_log.summary.remote()), cfg, task, pipes, t_start,
                            notes, run_dir, result.checkpoint.path)
        cut = data.describe_truncation(
            preview, task.rows.name, {f: summary["counts"].get(label, 0)
                                      for f, label in task.flags.items()})
        if cut:  # before the end line, where the user looks
            print(cut, flush=True)
            summary["warnings"] = [*summary["warnings"], cut]
        summary["warnings"] += task.watch(read_metrics(run_dir), whole_run=True)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(run_dir, task.plot_keys)
        if evaluate is not None:
            print("evaluating the exported model against its base ...", flush=True)
            report = evaluate(run_dir)
            summary["eval_report"] = str(report / "report.html")
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        finish_export(run_dir, task.prefix, cfg.output, summary)
        summary["trackers"] = close_run_log(run_log, summary)
        run_log = None
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return run_dir
    finally:
        if run_log is not None:  # failed or interrupted: the trackers' runs end FAILED
            close_run_log(run_log, None)
        quiet_workers()
        if started_ray:
            ray.shutdown()


def rows_per_epoch(pipes: Any, cluster: Any, task: type[Task]) -> int:
    """The rows the workers train on in an epoch: the usable ones, less what Ray's equal
    split leaves out (all rows, dropped ones included, are split: at most workers - 1 go,
    counted here as dropped ones first, so the estimate is never short). An elastic run's
    size can change: its rows are all counted."""
    rows = pipes.train_rows
    if not task.train_from_shard or cluster.elastic:
        return rows
    dropped = sum(n for reason, n in pipes.train_counts.items() if reason)
    return rows - max(0, (rows + dropped) % cluster.worker_range[0] - dropped)


def check_inputs(cfg: Any, task: type[Task], dataset: Any, eval_dataset: Any
                 ) -> tuple[str, Any]:
    """(the model's folder, the data plan: rlhf.data.pipeline.inspect), checked on this
    machine before Ray starts: a bad model path, tokenizer, file, format or column
    fails here, not in a worker."""
    model_path = resolve_model_path(cfg.model.name_or_path)
    tok = load_tokenizer(model_path)
    plan = data.inspect(cfg.data, dataset, eval_dataset, task.rows)
    if (any(lay is not None and lay.chat for lay in (plan.train_layout, plan.held_layout))
            and not (tok.chat_template or getattr(cfg.data, "chat_template", ""))):
        raise DataError(
            f"The data holds conversations but the tokenizer of {model_path} has no chat "
            "template. Start from a model whose tokenizer has one (an instruct model, or "
            "the export of an rlhf.sft run, which saves its template), or give rlhf.sft "
            "data.chat_template=<file or Jinja string>.")
    return model_path, plan


def summarise(summary: dict, cfg: Any, task: type[Task], pipes: Any, t_start: float,
              notes: list[str] | None, run_dir: Path, checkpoint: str) -> dict:
    """summary.json: the workers' summary (steps, samples, held-out figures, counts) with
    the wall time, the data's counts, warnings and where the model and checkpoint are."""
    t = cfg.train
    summary.update({
        "wall_time_s": round(time.time() - t_start, 1),
        "tokens_per_s_overall": summary["tokens"] / max(time.time() - t_start, 1e-9),
        "data": {split: {"rows": sum(cnt.values()), "usable": cnt[""],
                         "dropped": {k: v for k, v in cnt.items() if k}}
                 for split, cnt in (("train", pipes.train_counts), ("eval", pipes.eval_counts))},
        "warnings": notes or [], "model": str(run_dir / "model"), "checkpoint": checkpoint})
    summary = redact(summary)
    if t.max_steps <= 0 or summary["steps"] < t.max_steps:
        # Whole epochs ran: every usable row was trained on, dropped by a worker
        # (counted), or left out by the equal split across workers (< num_workers).
        worker_drops = sum(v for k, v in summary["counts"].items() if k.startswith("dropped"))
        summary[f"{task.rows.name}_left_out_by_split"] = (
            pipes.train_rows * t.epochs - summary["samples"] - worker_drops)
    return summary


def finish_export(run_dir: Path, prefix: str, output: Any, summary: dict) -> None:
    """The model card (model/README.md, with the evaluation when one ran) and, with
    output.push_to_hub, the upload; a failed upload is reported (summary.json:
    hub_upload) with the command that retries it, and the run stays as it is."""
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


def main(task: type[Task], prog: str, run: Callable, argv: list[str] | None = None) -> int:
    """parse -> run -> print where the results are (task.summary_line); clean messages
    and exit codes (2: bad config or data, 1: training failed)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(task.config_cls, argv, prog=prog)
        run_dir = run(cfg)
    except (ConfigError, DataError) as e:
        console.fail(e)  # the traceback to the run's run.log, the message last
        return 2
    except TrainingError as e:
        console.fail(e, "error: training failed: ")
        return 1
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"\ndone in {summary['wall_time_s']:.0f} s: {task.summary_line(summary)}")
    print(f"run directory: {run_dir}\n  model: {run_dir / 'model'}\n  metrics: "
          f"{run_dir / 'metrics.jsonl'}\n  summary: {run_dir / 'summary.json'}")
    return 0
