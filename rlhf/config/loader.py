"""The one loader every entry point uses: dataclass defaults <- YAML recipe (--config)
<- `key.sub=value` overrides, types checked, unknown keys answered with what they may
mean (another section's field, a TRL/OpenRLHF flag, a near spelling); help from the
attribute docstrings."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

from rlhf.config.base import ConfigError


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: the string literal under it},
    inherited fields included."""
    docs: dict[str, str] = {}
    for base in cls.__mro__[:0:-1]:
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    source = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(source).body[0].body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    # each class's annotations resolve in its own module (a section may inherit fields
    # from one defined in another module: EvalDataConfig from DataConfig)
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert) one value against its annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "null", "none")):
            return None
        lists = [a for a in args if typing.get_origin(a) is list]
        if isinstance(value, list) and lists:  # e.g. int | list[int]: a range
            return _coerce(key, value, lists[0])
        return _coerce(key, value, args[0])
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (e.g. {key}='{{a: 1}}'), got "
                              f"{value!r}.")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float, bool)):  # one item: key=1
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}.")
        return [_coerce(key, v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key} must be an integer, got {value!r}.")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}.") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}.") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}.")
        return str(value)
    return value


PEER_FLAGS = {
    "beta": "loss.beta", "loss_type": "loss.type", "label_smoothing": "loss.label_smoothing",
    "rpo_alpha": "loss.rpo_alpha", "cpo_alpha": "loss.rpo_alpha",
    "gamma_beta_ratio": "loss.simpo_gamma", "simpo_gamma": "loss.simpo_gamma",
    "loss_weights": "loss.weights", "f_divergence_type": "loss.f_divergence",
    "f_alpha_divergence_coef": "loss.f_alpha", "ld_alpha": "loss.ld_alpha",
    "discopop_tau": "loss.discopop_tau", "alpha": "loss.alphapo",
    "sync_ref_model": "loss.reference_sync_every", "ref_model_sync_steps":
    "loss.reference_sync_every", "ref_model_mixup_alpha": "loss.reference_mixup",
    "desirable_weight": "loss.desirable_weight", "undesirable_weight":
    "loss.undesirable_weight",
    "learning_rate": "train.learning_rate", "lr": "train.learning_rate",
    "actor_learning_rate": "train.learning_rate",
    "critic_learning_rate": "algo.critic_learning_rate",
    "num_train_epochs": "train.epochs", "max_epochs": "train.epochs",
    "max_steps": "train.max_steps", "per_device_train_batch_size": "train.micro_batch_size",
    "micro_train_batch_size": "train.micro_batch_size", "train_batch_size":
    "train.global_batch_size", "gradient_accumulation_steps": "train.global_batch_size",
    "warmup_ratio": "train.warmup_ratio", "lr_warmup_ratio": "train.warmup_ratio",
    "lr_scheduler_type": "train.lr_scheduler",
    "lr_scheduler": "train.lr_scheduler", "weight_decay": "train.weight_decay",
    "l2": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "max_norm": "train.max_grad_norm", "seed": "train.seed", "data_seed": "train.seed", "logging_steps":
    "train.log_every", "eval_steps": "train.eval_every", "save_steps":
    "train.checkpoint_every", "save_total_limit": "train.keep_checkpoints",
    "resume_from_checkpoint": "train.resume", "load_checkpoint": "train.resume",
    "max_length": "data.max_length", "max_len": "data.max_length",
    "max_prompt_length": "data.max_prompt_length", "prompt_max_len":
    "data.max_prompt_length", "max_completion_length": "rollout.max_new_tokens",
    "generate_max_len": "rollout.max_new_tokens", "dataset": "data.path",
    "dataset_name": "data.path", "prompt_data": "data.path", "eval_dataset":
    "data.eval_path", "dataset_text_field": "data.columns.text", "chosen_key":
    "data.columns.chosen", "rejected_key": "data.columns.rejected", "prompt_key":
    "data.columns.prompt", "input_key": "data.prompt_column", "padding_free": "data.packing",
    "packing": "data.packing", "packing_samples": "data.packing", "model_name_or_path": "model.name_or_path", "pretrain":
    "model.name_or_path", "ref_model": "model.ref_name_or_path", "ref_pretrain":
    "model.ref_name_or_path", "reward_pretrain": "reward.model", "reward_model":
    "reward.model", "remote_rm_url": "reward.remote_url", "reward_funcs": "reward.functions",
    "multi_objective_aggregation": "reward.aggregation", "critic_pretrain": "algo.critic_model", "lora_r": "model.lora.r",
    "lora_rank": "model.lora.r", "lora_alpha": "model.lora.alpha", "lora_dropout":
    "model.lora.dropout", "lora_target_modules": "model.lora.target_modules",
    "target_modules": "model.lora.target_modules", "use_peft": "model.lora.enabled",
    "load_in_4bit": "model.lora.load_in_4bit", "gradient_checkpointing":
    "model.gradient_checkpointing", "bf16": "model.dtype=bf16", "fp16": "model.dtype=fp16",
    "torch_dtype": "model.dtype", "attn_implementation": "model.attn_implementation",
    "flash_attn": "model.attn_implementation=flash_attention_2", "zero_stage":
    "cluster.zero_stage", "adam_offload": "cluster.offload_optimizer", "output_dir":
    "output.dir", "save_path": "output.dir", "run_name": "output.name", "num_generations":
    "rollout.samples_per_prompt", "n_samples_per_prompt": "rollout.samples_per_prompt",
    "temperature": "rollout.temperature", "top_p": "rollout.top_p", "init_kl_coef":
    "algo.kl_coef", "kl_coef": "algo.kl_coef", "advantage_estimator": "algo.algorithm",
    "eps_clip": "algo.clip_low", "epsilon": "algo.clip_low", "epsilon_high":
    "algo.clip_high", "ppo_epochs": "algo.ppo_epochs", "num_iterations": "algo.ppo_epochs",
    "gamma": "algo.gamma", "lambd": "algo.lam", "vllm_num_engines": "rollout.engines",
    "vllm_tensor_parallel_size": "rollout.tensor_parallel_size",
    "vllm_gpu_memory_utilization": "rollout.kv_cache_fraction",
}


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every setting of a config tree, dotted (e.g. loss.beta)."""
    hints, out = _hints(cls), []
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            out += _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def suggest(key: str, root: type) -> list[str]:
    """Known keys of `root` an unknown dotted key may mean: the same last name in another
    section (beta -> loss.beta), the key's TRL/OpenRLHF name (per_device_train_batch_size
    -> train.micro_batch_size), then near spellings of the whole key or its last name."""
    import difflib

    known = _leaf_keys(root)
    last = key.rsplit(".", 1)[-1]
    out = [k for k in known if k.rsplit(".", 1)[-1] == last and k != key]
    peer = PEER_FLAGS.get(last.replace("-", "_"))
    if peer and peer.split("=")[0] in known:
        out.append(peer)
    out += difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    lasts: dict[str, list[str]] = {}
    for k in known:
        lasts.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    for name in difflib.get_close_matches(last, list(lasts), n=3, cutoff=0.75):
        out += lasts[name]
    return list(dict.fromkeys(k for k in out if k != key))[:5]


def build(cls: type, values: dict[str, Any], prefix: str = "",
           root: type | None = None) -> Any:
    """Instantiate a nested dataclass from a nested dict; unknown keys fail, with the
    known keys they may mean (`suggest`)."""
    root = root or cls
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = suggest(full, root)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"Unknown config key '{full}'.{hint} Known keys here: "
                              f"{', '.join(prefix + n for n in names)}.")
        tp = hints[key]
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' is a section; give its keys, e.g. "
                                  f"{full}.{dataclasses.fields(tp)[0].name}=...")
            # Overrides go on top of this section's own default (an entry point may give
            # a section other defaults than the section class has, e.g. rlhf.ppo's train).
            f = next(f for f in dataclasses.fields(cls) if f.name == key)
            if f.default_factory is not dataclasses.MISSING:
                value = _merge(dataclasses.asdict(f.default_factory()), value)
            kwargs[key] = build(tp, value, full + ".", root)
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{dotted}': '{p}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def help_text(cls: type, prog: str) -> str:
    lines = [f"usage: python -m {prog} [--config RECIPE.yaml] [key.sub=value ...]", "",
             (cls.__doc__ or "").strip(), "",
             "Every field, with its default:"]

    def walk(c: type, prefix: str, default: Any) -> None:
        docs, hints = field_docs(c), _hints(c)
        for f in dataclasses.fields(c):
            val = getattr(default, f.name)
            if _is_section(hints[f.name]):
                lines.append(f"\n  [{prefix}{f.name}] {docs.get(f.name, '')}")
                walk(hints[f.name], f"{prefix}{f.name}.", val)
            else:
                lines.append(f"  {prefix}{f.name} = {val!r}")
                lines.append(textwrap.fill(docs.get(f.name, ""), 88, initial_indent=" " * 6,
                                           subsequent_indent=" " * 6))

    walk(cls, "", cls())
    return "\n".join(lines)


def parse_args(cls: type, argv: list[str], prog: str) -> Any:
    """`--config FILE` and `a.b=value` arguments -> a checked config instance.

    Raises ConfigError with a message meant for the user; prints help and exits on -h.
    """
    import yaml

    if any(a in ("-h", "--help") for a in argv):
        print(help_text(cls, prog))
        raise SystemExit(0)
    tree: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    it = iter(argv)
    for arg in it:
        if arg == "--config" or arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1] if "=" in arg else next(it, ""))
            if not path.is_file():
                raise ConfigError(f"--config {path}: no such file.")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: a recipe must be a mapping of sections.")
            tree = _merge(tree, loaded)
        elif "=" in arg and not arg.startswith("-"):
            key, raw = arg.split("=", 1)
            _set_dotted(overrides, key.lstrip("-"), yaml.safe_load(raw) if raw else None)
        else:
            raise ConfigError(f"Cannot read argument '{arg}': use --config FILE or "
                              "key.sub=value (see --help).")
    try:
        return build(cls, _merge(tree, overrides))
    except TypeError as e:  # a dataclass rejected something build let through
        raise ConfigError(str(e)) from None


def load(cls: type, recipe: str | Path | None = None, overrides: list[str] | tuple = (),
         ) -> Any:
    """The Python way to what the command line does: `cls`'s defaults <- the YAML recipe
    (optional) <- `key.sub=value` overrides, checked as there.

        cfg = load(DPOConfig, "launch/recipes/dpo-llama3-8b.yaml", ["loss.beta=0.2"])
    """
    argv = (["--config", str(recipe)] if recipe else []) + list(overrides)
    return parse_args(cls, argv, prog=cls.__name__)
