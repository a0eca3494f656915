"""The exported model's card (model/README.md) and its upload to the hub.

The card is what a reader of the hub page needs to trust and reproduce the model: the
base, the method, the data with what was read, used and dropped, the settings that
matter, the held-out figures, the evaluation verdict when rlhf.evaluate ran, the
command that made it and the whole resolved config. It holds no credential: tokens live
in the environment (HF_TOKEN), never in the config.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import yaml

from rlhf.data.readers import _hub_host, _hub_reachable
from rlhf.runlog.redact import REDACTED, redact_text, secret_name

METHODS = {"dpo": "DPO (direct preference optimisation)",
           "kto": "KTO (Kahneman-Tversky optimisation, unpaired feedback)", "rm": "reward model",
           "sft": "supervised fine-tuning", "ppo": "online RL"}


def command(prefix: str) -> str:
    """How this run was started, when it was `python -m rlhf.<prefix>`; else the form
    that reproduces it from the run's config.yaml."""
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    if argv0 == f"{prefix}.py" or argv0 == "-m":
        return " ".join(["python", "-m", f"rlhf.{prefix}", *map(_shown, sys.argv[1:])])
    return f"python -m rlhf.{prefix} --config config.yaml"


def _shown(arg: str) -> str:
    """A command-line argument without credentials (rlhf.runlog.redact.redact_text; the
    value of a secret-named key=value goes whole)."""
    key, eq, _ = arg.partition("=")
    if eq and not key.startswith("-") and secret_name(key):
        return shlex.quote(f"{key}={REDACTED}")
    return shlex.quote(redact_text(arg))


def card(run_dir: Path, prefix: str, config: dict, summary: dict,
         evaluation: dict | None = None) -> str:
    """The card's Markdown (with the hub's YAML metadata header)."""
    m, d = config.get("model", {}), config.get("data", {})
    method = METHODS.get(prefix, prefix)
    if prefix == "ppo":
        method = f"online RL ({(config.get('algo') or {}).get('algorithm', '')})"
    meta = {"base_model": m.get("name_or_path"), "library_name": "transformers",
            "tags": ["rlhf-ray", prefix] + (["lora"] if (m.get("lora") or {}).get("enabled")
                                              else [])}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {run_dir.name}", "",
             f"{method[:1].upper()}{method[1:]} of `{m.get('name_or_path')}` with rlhf-ray.", ""]
    lora = m.get("lora") or {}
    lines += ["## Model", "",
              f"- base: `{m.get('name_or_path')}`"
              + (f", reference `{m['ref_name_or_path']}`" if m.get("ref_name_or_path") else ""),
              f"- dtype: {m.get('dtype')}"
              + (f"; LoRA r={lora.get('r')}, alpha={lora.get('alpha')} on "
                 f"{', '.join(lora.get('target_modules') or [])}"
                 + (" (4-bit base, merged into the original base weights)"
                    if lora.get("load_in_4bit") else "")
                 + ("" if lora.get("merge_on_export", True) else "; the adapter alone")
                 if lora.get("enabled") else ""), ""]
    lines += ["## Data", "", f"- source: `{d.get('path')}`"
              + (f", held out: `{d['eval_path']}`" if d.get("eval_path") else "")]
    for split, c in (summary.get("data") or {}).items():
        dropped = "; ".join(f"{n} {r}" for r, n in c.get("dropped", {}).items()) or "none"
        lines.append(f"- {split}: {c.get('rows')} rows read, {c.get('usable')} used; "
                     f"dropped: {dropped}")
    t = config.get("train") or {}
    lines += ["", "## Training", "",
              f"- {summary.get('steps')} steps, {summary.get('samples')} samples, "
              f"{t.get('epochs')} epoch(s), learning rate {t.get('learning_rate')}, global "
              f"batch {t.get('global_batch_size')}, {summary.get('wall_time_s')} s"]
    loss = config.get("loss") or {}
    if prefix == "dpo":
        types = loss.get("type")
        types = ", ".join(map(str, types)) if isinstance(types, list) else types
        weights = f" weighted {loss['weights']}" if loss.get("weights") else ""
        lines.append(f"- loss {types}{weights}, beta {loss.get('beta')}")
    elif prefix == "kto":
        lines.append(f"- loss {loss.get('type')}, beta {loss.get('beta')}, desirable weight "
                     f"{loss.get('desirable_weight')}, undesirable weight "
                     f"{loss.get('undesirable_weight')}")
    held = {k: v for k, v in summary.items() if k.startswith("eval/")
            and isinstance(v, (int, float))}
    if held:
        lines += ["", "## Held-out figures (at the end of training)", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(held.items())]
    if evaluation:
        w = evaluation["win_rate"]
        lines += ["", "## Evaluation against the base (rlhf.evaluate)", "",
                  f"- win rate {w['rate']:.1%} (95% CI {w['ci95'][0]:.1%}-{w['ci95'][1]:.1%}; "
                  f"{w['wins']} wins, {w['ties']} ties, {w['losses']} losses), judge "
                  f"{evaluation['judge']['kind']}: **{w['verdict']}**. {w['says']}"]
        lines += [f"- warning [{f['flag']}]: {f['message']}" for f in evaluation.get("flags", [])]
    lines += ["", "## How it was made", "", "```bash", command(prefix), "```", "",
              "The resolved config (config.yaml of the run):", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def write(run_dir: Path, prefix: str) -> Path:
    """model/README.md from the run directory's config.yaml, summary.json and, when
    rlhf.evaluate ran at the end, eval/results.json."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    summary = json.loads((run_dir / "summary.json").read_text())
    results = run_dir / "eval" / "results.json"
    evaluation = json.loads(results.read_text()) if results.is_file() else None
    path = run_dir / "model" / "README.md"
    path.write_text(card(run_dir, prefix, config, summary, evaluation))
    return path


def push(model_dir: Path, repo_id: str, private: bool) -> str:
    """Upload the model folder (weights, tokenizer, card) to the hub; returns its URL.
    Credentials: HF_TOKEN or `hf auth login`'s cache, never the config."""
    from huggingface_hub import HfApi

    if not _hub_reachable():
        raise ConnectionError(f"{_hub_host()} cannot be reached")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, repo_type="model",
                             commit_message="Upload from rlhf-ray")
    return str(getattr(info, "commit_url", f"https://huggingface.co/{repo_id}"))
