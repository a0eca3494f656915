""""No degradation on general tasks": the base and the aligned model through
lm-evaluation-harness on the tasks the user names, side by side.

    python -m rlhf.evaluate run=runs/dpo-... general.tasks=[arc_easy,hellaswag]
    python -m rlhf.evaluate ... general.tasks=[my_task] general.include_path=tasks/

Each model is evaluated by lm_eval.simple_evaluate in a Ray task (on a GPU node when
cluster.use_gpu; backend `hf`, or `vllm` on GPUs), with per-document results kept. For
every task and metric the aligned model's score minus the base's is taken document by
document (the same documents, so the paired standard error is the right one, smaller
than the two stderrs combined), and a difference below zero by more than 1.96 standard
errors is flagged: worse beyond noise.
"""

from __future__ import annotations

import math
from typing import Any

Z = 1.96  # two-sided 95%


def harness(model_path: str, tasks: list[str], include_path: str, backend: str, limit: int,
            num_fewshot: int | None, batch_size: int, dtype: str, device: str) -> dict:
    """One model through lm_eval.simple_evaluate -> {"results": {task: {metric: value,
    metric_stderr: se}}, "samples": {task: {doc_id: {metric: value}}}, "n": {task: docs}}.
    Runs where it is called (rlhf.evaluate sends it to a Ray worker)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # Only the user's folder is indexed when it holds every task (the ~15k built-in
    # tasks cost seconds to index).
    tm = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if tm is None or not set(tasks) <= set(tm.all_tasks):
        tm = TaskManager(include_path=include_path or None)
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    args = f"pretrained={model_path},dtype={torch_dtype}"
    res = lm_eval.simple_evaluate(
        model=backend, model_args=args, tasks=list(tasks), task_manager=tm,
        num_fewshot=num_fewshot, limit=limit or None, batch_size=batch_size,
        device=device if backend == "hf" else None, log_samples=True)
    results, samples, n = {}, {}, {}
    for task, vals in res["results"].items():
        if task not in res.get("samples", {}):
            continue  # a group's aggregate: its subtasks are listed themselves
        results[task] = {k.split(",")[0]: v for k, v in vals.items()
                         if "," in k and isinstance(v, (int, float))}
        metrics = [m for m in results[task] if not m.endswith("_stderr")]
        samples[task] = {int(s["doc_id"]): {m: float(s[m]) for m in metrics
                                            if isinstance(s.get(m), (int, float, bool))}
                         for s in res["samples"][task]}
        n[task] = len(samples[task])
    higher = res.get("higher_is_better", {})
    return {"results": results, "samples": samples, "n": n,
            "higher_is_better": {t: dict(higher.get(t, {})) for t in results}}


def paired(base: dict[int, float], aligned: dict[int, float]) -> tuple[float, float, int]:
    """(mean of aligned - base over the documents both have, its standard error, n)."""
    docs = sorted(set(base) & set(aligned))
    d = [aligned[i] - base[i] for i in docs]
    n = len(d)
    if n == 0:
        return 0.0, 0.0, 0
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n), n


def compare(base: dict, aligned: dict) -> list[dict]:
    """Per task and metric: both scores with lm-eval's stderr, the paired difference with
    its standard error, and worse_beyond_noise (the aligned model lower by > 1.96 SE;
    for metrics where lower is better, higher by as much)."""
    rows = []
    for task in sorted(set(base["results"]) & set(aligned["results"])):
        rb, ra = base["results"][task], aligned["results"][task]
        for metric in sorted(m for m in rb if not m.endswith("_stderr") and m in ra):
            per_b = {i: v[metric] for i, v in base["samples"][task].items() if metric in v}
            per_a = {i: v[metric] for i, v in aligned["samples"][task].items() if metric in v}
            diff, se, n = paired(per_b, per_a)
            up = base.get("higher_is_better", {}).get(task, {}).get(metric, True)
            worse = (diff < -Z * se) if up else (diff > Z * se)
            rows.append({"task": task, "metric": metric, "documents": n,
                         "base": rb[metric], "base_stderr": rb.get(f"{metric}_stderr"),
                         "aligned": ra[metric], "aligned_stderr": ra.get(f"{metric}_stderr"),
                         "difference": diff, "difference_stderr": se,
                         "higher_is_better": up, "worse_beyond_noise": bool(worse)})
    return rows


def describe(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        flag = "  WORSE beyond noise" if r["worse_beyond_noise"] else ""
        lines.append(f"  {r['task']} {r['metric']}: base {r['base']:.3f}, aligned "
                     f"{r['aligned']:.3f}, difference {r['difference']:+.3f} +- "
                     f"{r['difference_stderr']:.3f} (paired SE, {r['documents']} docs){flag}")
    return lines


def run_both(cfg: Any, aligned: str, base: str) -> list[dict]:
    """Both models through the harness, each in a Ray task (GPU when cluster.use_gpu)."""
    import ray

    g, use_gpu = cfg.general, cfg.cluster.use_gpu
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(harness)
    kw = dict(tasks=list(g.tasks), include_path=g.include_path, backend=g.backend,
              limit=g.limit, num_fewshot=g.num_fewshot, batch_size=g.batch_size,
              dtype=cfg.dtype, device="cuda" if use_gpu else "cpu")
    # one after the other: one GPU is enough
    res_base = ray.get(task.remote(base, **kw))
    res_aligned = ray.get(task.remote(aligned, **kw))
    return compare(res_base, res_aligned)


def worse_flags(general: list[dict]) -> list[dict]:
    """results.json flags for the tasks where the aligned model is worse beyond noise."""
    return [{"flag": "general_task_worse",
             "message": f"{r['task']} ({r['metric']}): the aligned model scores "
                        f"{r['aligned']:.3f} against its base's {r['base']:.3f}, "
                        f"{r['difference']:+.3f} +- {r['difference_stderr']:.3f}: worse beyond "
                        "noise on a general task. Try: a lower learning rate, a higher beta, "
                        "fewer epochs, or LoRA."}
            for r in general if r["worse_beyond_noise"]]
