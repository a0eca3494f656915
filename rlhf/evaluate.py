"""Compare an aligned model with its base on held-out prompts: win rate by a judge, DPO's
implicit-reward accuracy on held-out pairs, drift and degeneration, and a report.

    python -m rlhf.evaluate                       # the newest runs/dpo-* against its base
    python -m rlhf.evaluate run=runs/dpo-20261201-120000
    python -m rlhf.evaluate model=runs/dpo-.../model base=/models/Llama-3.1-8B \\
        data.path=pairs.jsonl judge.reward_model=runs/rm-.../model
    python -m rlhf.evaluate ... judge.model=/models/judge judge.both_orders=true
    python -m rlhf.evaluate --help                # every field, its default and meaning

What it does, in order:
    prompts    the held-out split of the run's data (or data.path / data.eval_path), the
               lowest data.max_prompts row ids; rows left out are counted by reason
    aligned    a vLLM engine actor (cluster/vllm_engines.py) samples generation.samples_per_
               prompt responses per prompt, seeded per prompt, and gives the log-probs of
               its own responses and of the held-out pairs' chosen and rejected responses
    base       the same with the same seeds, plus its log-probs of the aligned responses
               (the KL estimate); one engine at a time, so one GPU is enough: the base
               (and a pairwise judge) reuse it, weights reloaded in place, where the
               architecture and tokenizer are the same (results.json: engines)
    judge      a reward model exported by rlhf.rm scores both responses (the higher wins),
               or a pairwise judge model picks one (order randomised per comparison, or
               both orders); win rate with a 95% interval (bootstrap over prompts) and
               the verdict (> 55% working, < 50% worse)
    report     results.json, samples.jsonl (per prompt, side by side), report.html (self-
               contained: plots, flags in words with advice, examples) and the plots as PNG

The library behind it is rlhf/evaluation/ (setup, engines, judges, comparison,
benchmark_pass, general_tasks, report); this module runs its steps in that order.

KL: mean over the aligned responses of sum_t log pi(y_t) - log pi_base(y_t) (k1), exact in
expectation when generation.temperature=1 and top_p=1 (otherwise an estimate along the
tempered samples).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cluster.models import load_tokenizer
from cluster.ray_cluster import connect
from rlhf.builtin_models import builtin_reward_model
from rlhf.config import (ClusterConfig, ConfigError, EvalConfig, EvalDataConfig, JudgeConfig,
                         OutputConfig, parse_args)
from rlhf.data.readers import DataError
from rlhf.evaluation import benchmark_pass, general_tasks
from rlhf.evaluation.comparison import summarise
from rlhf.evaluation.engines import EngineSlot, model_pass
from rlhf.evaluation.judges import judge
from rlhf.evaluation.report import describe, write_report
from rlhf.evaluation.setup import (BUILTIN_RM, Setup, held_out_rows, merged_adapter, resolve,
                                   tokenize_rows)
from rlhf.runlog import console
from rlhf.runlog.run_dir import make_run_dir


def run(cfg: EvalConfig) -> Path:
    """Evaluate; returns the report's directory."""
    t_start = time.time()
    setup = resolve(cfg)
    if setup.judge_path == BUILTIN_RM:
        setup = replace(setup, judge_path=builtin_reward_model())
    tok = load_tokenizer(setup.aligned)
    out_dir = make_run_dir(cfg.output, False, "eval")  # its run.log from here on
    print(f"evaluating {setup.aligned}\n  against its base {setup.base}\n  judge: "
          f"{setup.judge} {setup.judge_path}", flush=True)
    shown, scratch = setup.aligned, Path(tempfile.mkdtemp(prefix="rlhf-eval-"))
    try:
        setup = replace(setup, aligned=merged_adapter(setup.aligned, cfg.dtype,
                                                      scratch / "merged"))
        if setup.aligned != shown:
            print(f"  (a LoRA adapter: merged into its base for the engines, "
                  f"{setup.aligned})", flush=True)
        results, samples, benchmarks = _compare(cfg, setup, tok)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if setup.aligned != shown:
        results["aligned"], results["adapter_merged"] = shown, True
    results["wall_time_s"] = round(time.time() - t_start, 1)
    if benchmarks is not None:
        results["benchmarks"] = benchmarks["results"]
        results["benchmarks"]["official_commands"] = benchmark_pass.write(out_dir, benchmarks)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    with open(out_dir / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    write_report(out_dir, results, samples)
    return out_dir


def _compare(cfg: EvalConfig, setup: Setup, tok) -> tuple[dict, list[dict], dict | None]:
    """prompts -> aligned -> base -> judge (-> benchmarks -> general tasks), on Ray:
    (results, per-prompt samples, the benchmarks' answers and grades or None)."""
    import ray  # deferred: --help and config errors stay fast

    started = not ray.is_initialized()
    connect(replace(cfg.cluster, num_workers=0, data_cpus=max(cfg.cluster.data_cpus, 1)),
            cfg.generation.cpus_per_engine)
    quiet_workers = console.route_worker_output()  # the engines' chatter to run.log
    try:
        rows, counts = held_out_rows(setup.data_plan, setup.seed)
        items, left_out = tokenize_rows(rows, tok, setup.data, setup.data_plan.pairs)
        if not items:
            raise DataError(f"No held-out prompt left to evaluate: {dict(left_out)}.")
        print(f"held-out: {sum(counts.values())} rows read, {counts['']} usable; evaluating "
              f"{len(items)} prompts x {cfg.generation.samples_per_prompt} samples"
              + (f"; left out: {dict(left_out)}" if left_out else ""), flush=True)
        engines = EngineSlot(cfg)
        try:
            aligned = model_pass(cfg, setup, engines, setup.aligned, items)
            print(f"aligned model: {sum(map(len, aligned['samples']))} responses in "
                  f"{aligned['generate_s']:.1f} s", flush=True)
            base = model_pass(cfg, setup, engines, setup.base, items,
                              score=aligned["samples"])
            texts_a = [[tok.decode(s["token_ids"], skip_special_tokens=True) for s in o]
                       for o in aligned["samples"]]
            texts_b = [[tok.decode(s["token_ids"], skip_special_tokens=True) for s in o]
                       for o in base["samples"]]
            judged = judge(cfg, setup, engines, items, texts_a, texts_b)
            benchmarks = None
            if cfg.benchmarks.mt_bench or cfg.benchmarks.alpaca_eval:
                print("benchmarks: both models answer "
                      + " and ".join(k for k in ("mt_bench", "alpaca_eval")
                                     if getattr(cfg.benchmarks, k)), flush=True)
                benchmarks = benchmark_pass.run(cfg, setup, engines)
        finally:
            engines.close()
        general = None
        if cfg.general.tasks:  # after the engines: the harness may want the GPU
            print(f"general tasks (lm-evaluation-harness): {', '.join(cfg.general.tasks)}",
                  flush=True)
            general = general_tasks.run_both(cfg, setup.aligned, setup.base)
    finally:
        quiet_workers()
        if started:
            ray.shutdown()
    results, samples = summarise(cfg, setup, items, aligned, base, texts_a, texts_b, judged,
                                 counts, left_out)
    results["engines"] = {"started": engines.started, "reloaded": engines.reloaded}
    if general is not None:
        results["general_tasks"] = general
        results["flags"] += general_tasks.worse_flags(general)
    return results, samples, benchmarks


def after_training(run_dir: Path, ev: Any, cluster: Any) -> Path:
    """A training run's eval.after_training: its export against its base, the report in
    the run directory's eval/ (ev: rlhf.config.AfterTrainingConfig)."""
    cfg = EvalConfig(run=str(run_dir), judge=JudgeConfig(reward_model=ev.reward_model),
                     data=EvalDataConfig(max_prompts=ev.max_prompts),
                     cluster=ClusterConfig(address=cluster.address, use_gpu=cluster.use_gpu),
                     output=OutputConfig(dir=str(run_dir), name="eval"))
    out = run(cfg)
    print(describe(out), flush=True)
    return out


def after_training_of(cfg: Any) -> Callable[[Path], Path] | None:
    """What a training entry point hands rlhf.train.driver.run_training as `evaluate`:
    after_training with its eval and cluster sections, or None without
    eval.after_training."""
    ev = getattr(cfg, "eval", None)
    if ev is None or not ev.after_training:
        return None
    return lambda run_dir: after_training(run_dir, ev, cfg.cluster)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        out = run(parse_args(EvalConfig, argv, "rlhf.evaluate"))
    except (ConfigError, DataError) as e:
        console.fail(e)  # the traceback to the run's run.log, the message last
        return 2
    print("\n" + describe(out))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
