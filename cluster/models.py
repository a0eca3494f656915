"""Load the policy, reference and reward models (HF, peft LoRA, one dtype, gradient
checkpointing) and export a trained model in Hugging Face format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rlhf.config import BUILTIN_MODEL, ConfigError
from rlhf.core import attention
from rlhf.data.demo import ensure_tiny_model
from rlhf.data.tokenizer import auto_tokenizer

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _transformers_without_sklearn_or_scipy() -> None:
    """Where scikit-learn is installed (lm-eval brings it), transformers imports it, and
    scipy with it, when its model classes are first imported: for assisted generation's
    confidence threshold (generation/candidate_generator.py), which nothing here uses.
    Without it, scipy.optimize still comes, for the object-detection losses' Hungarian
    matcher (transformers/loss/loss_for_object_detection.py), which no language model
    uses. That is ~2.5 s and ~0.6 s of one core in every process that loads a model
    (each training worker of each run, each reward scorer): transformers is told both
    are absent. Imports of them by anyone else (lm-eval's metrics, a user's reward
    function) still work; only transformers' vision and detection models lose them."""
    import transformers.utils

    transformers.utils.is_sklearn_available = lambda: False
    transformers.utils.is_scipy_available = lambda: False


_transformers_without_sklearn_or_scipy()


def resolve_model_path(name_or_path: str, key: str = "model.name_or_path") -> str:
    """builtin:tiny-llama -> its cached folder (built on first use); a folder must exist."""
    if name_or_path == BUILTIN_MODEL:
        return str(ensure_tiny_model())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}={name_or_path}: folder has no config.json, so it is not "
                              "a Hugging Face model folder.")
        return str(path.resolve())
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") != 1:
        raise ConfigError(f"{key}={name_or_path}: no such model folder. Give a local "
                          f"Hugging Face model folder, a hub id like org/name, or "
                          f"{BUILTIN_MODEL}.")
    return name_or_path  # a hub id: transformers resolves (or fails to download) it


def load_tokenizer(path: str):
    tok = auto_tokenizer(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = 10**9  # truncation is ours, counted; silence transformers
    return tok


def reference_path(model_cfg: Any) -> tuple[str, list[str]]:
    """The reference model's folder (model.ref_name_or_path, else the policy's own) and
    what `check_reference` warns of when it is another model."""
    policy = resolve_model_path(model_cfg.name_or_path)
    if not model_cfg.ref_name_or_path:
        return policy, []
    ref = resolve_model_path(model_cfg.ref_name_or_path, "model.ref_name_or_path")
    return ref, check_reference(policy, ref)


def check_reference(policy_path: str, ref_path: str) -> list[str]:
    """Warnings for a separately given reference; raises if it cannot be compared."""
    pol, ref = load_tokenizer(policy_path), load_tokenizer(ref_path)
    if pol.get_vocab() != ref.get_vocab():
        raise ConfigError(
            f"model.ref_name_or_path={ref_path} has another vocabulary than the policy "
            f"{policy_path} ({len(ref)} vs {len(pol)} tokens): log-prob ratios between them "
            "are meaningless. Leave ref_name_or_path empty to use the policy's own base.")
    notes = []
    probe = "\n\nHuman: Hello there!\n\nAssistant: Hi."
    if pol(probe)["input_ids"] != ref(probe)["input_ids"]:
        raise ConfigError(f"model.ref_name_or_path={ref_path} tokenises text differently "
                          "from the policy; use the policy's base as the reference.")
    if (getattr(pol, "chat_template", None) or "") != (getattr(ref, "chat_template", None) or ""):
        notes.append("reference and policy have different chat templates")
    notes.append(f"the reference {ref_path} is not the policy's base: DPO assumes the "
                 "reference is the model the policy starts from (usually its SFT model)")
    return notes


def attention_implementation(model_cfg: Any, packing: bool) -> str:
    """The attn_implementation to load a model with.

    Packed batches (rlhf.core.logprobs.pack_pairs) need a varlen kernel: flash attention 2
    where configured, else the project's (rlhf/core/attention.py), registered here with
    transformers under its own name so that it is used for exactly these models.
    """
    if not packing or model_cfg.attn_implementation == "flash_attention_2":
        return model_cfg.attn_implementation
    from transformers import AttentionInterface

    # No mask function is registered with it, so transformers builds no (N, N) mask
    # for a packed row: the kernel reads the sequence boundaries from the batch.
    AttentionInterface.register(attention.NAME, attention.attention_forward)
    return attention.NAME


def load_causal_lm(path: str, model_cfg: Any, *, trainable: bool, use_gpu: bool,
                   packing: bool = False, reward_head: bool = False):
    """A causal LM in the configured dtype; with LoRA (trainable) wrapped by peft.

    packing: the model will read packed batches (see `attention_implementation`).
    reward_head: the backbone with a scalar head instead of the LM head
    (AutoModelForSequenceClassification, num_labels=1); a causal LM checkpoint gets a
    freshly initialised head, a reward-model export its trained one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = getattr(torch, TORCH_DTYPES[model_cfg.dtype])
    kwargs: dict[str, Any] = {"dtype": dtype,
                              "attn_implementation": attention_implementation(model_cfg, packing)}
    lora = model_cfg.lora
    if trainable and lora.load_in_4bit:
        if not use_gpu or not torch.cuda.is_available():
            raise ConfigError("model.lora.load_in_4bit needs a CUDA GPU (bitsandbytes).")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if reward_head:
        kwargs["num_labels"] = 1
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        if model.config.pad_token_id is None:  # its pooling looks for the padding
            model.config.pad_token_id = load_tokenizer(path).pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    if not trainable:
        model.eval()
        return model
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.enabled:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if lora.load_in_4bit:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=model_cfg.gradient_checkpointing)
        elif model_cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            # SEQ_CLS also trains the (new) scalar head in full ("modules_to_save").
            task_type="SEQ_CLS" if reward_head else "CAUSAL_LM"))
        # peft creates adapters in fp32; cast them so every weight shares one dtype.
        for name, p in model.named_parameters():
            if "lora_" in name and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def merge_lora_state_dict(state_dict: dict, scaling: float) -> dict:
    """peft LoRA state dict -> plain base-model state dict with W + scaling * B @ A.

    Keys come in peft's form ("base_model.model.<name>.base_layer.weight",
    "...lora_A.default.weight", "...lora_B.default.weight") and leave as "<name>.weight".
    Pure tensor work: no model object is needed, so this runs on any size of model.
    """
    prefix = "base_model.model."
    out, lora_a, lora_b = {}, {}, {}
    for key, value in state_dict.items():
        key = key[len(prefix):] if key.startswith(prefix) else key
        if ".original_module." in key:  # peft's frozen copy of a fully trained module
            continue
        key = key.replace(".modules_to_save.default.", ".")
        if ".lora_A." in key:
            lora_a[key.split(".lora_A.")[0]] = value
        elif ".lora_B." in key:
            lora_b[key.split(".lora_B.")[0]] = value
        else:
            out[key.replace(".base_layer.", ".")] = value
    for module, a in lora_a.items():
        w = out[module + ".weight"]
        delta = (lora_b[module].float() @ a.float()) * scaling
        out[module + ".weight"] = (w.float() + delta).to(w.dtype)
    return out


def dequantize_4bit(state_dict: dict) -> dict:
    """A QLoRA state dict with its bitsandbytes 4-bit weights unpacked to full tensors.

    A 4-bit layer's weight arrives packed (uint8, half as many elements) next to its
    quantisation state ("<key>.absmax", "<key>.quant_map", ...,
    "<key>.quant_state.bitsandbytes__nf4"); merging LoRA into it and exporting need the
    weight itself, in the dtype it was quantised from. Other state dicts pass unchanged.
    """
    marker = ".quant_state.bitsandbytes__"
    keys = [k.split(marker)[0] for k in state_dict if marker in k]
    if not keys:
        return state_dict
    import torch
    from bitsandbytes.functional import QuantState
    from bitsandbytes.functional import dequantize_4bit as dequantize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = dict(state_dict)
    for key in keys:
        prefix = key + "."
        qs = {k[len(prefix):]: out.pop(k) for k in list(out) if k.startswith(prefix)}
        out[key] = dequantize(out[key].to(device), QuantState.from_dict(qs, device)).cpu()
    return out


def with_original_base(state_dict: dict, path: str, dtype: Any) -> dict:
    """A QLoRA state dict whose 4-bit packed base weights are replaced by the base
    model's own weights from its folder, in `dtype`: the export then merges the adapters
    into what the base really is, not into its 4-bit approximation (the frozen base never
    changed in training). Without the base's safetensors at `path` (a hub id not in a
    local folder), the packed weights are dequantised instead (dequantize_4bit).
    State dicts without 4-bit weights pass unchanged."""
    marker = ".quant_state.bitsandbytes__"
    keys = [k.split(marker)[0] for k in state_dict if marker in k]
    if not keys:
        return state_dict
    import torch
    from safetensors import safe_open

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    where = {}
    for f in sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []:
        with safe_open(str(f), framework="pt") as sf:
            where.update({k: f for k in sf.keys()})

    def base_name(key: str) -> str:
        key = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        return key.replace(".base_layer.", ".")

    if not all(base_name(k) in where for k in keys):
        return dequantize_4bit(state_dict)
    out = dict(state_dict)
    for key in keys:
        for k in [k for k in out if k.startswith(key + ".")]:  # its quantisation state
            del out[k]
        with safe_open(str(where[base_name(key)]), framework="pt") as sf:
            out[key] = sf.get_tensor(base_name(key)).to(dtype)
    return out


def score_head(model):
    """The scalar head of a reward model, through DeepSpeed's and peft's wrappers."""
    m = getattr(model, "module", model)  # DeepSpeed engine
    if hasattr(m, "get_base_model"):  # peft: the head is its trained "modules_to_save" copy
        m = m.get_base_model()
    for name in ("score", "classifier"):
        if hasattr(m, name):
            return getattr(m, name)
    raise ValueError(f"{type(m).__name__} has no score/classifier head")


def adapter_state_dict(state_dict: dict) -> dict:
    """The LoRA weights of a peft state dict, keyed as peft's save_pretrained does."""
    return {k.replace(".default.", "."): v for k, v in state_dict.items() if ".lora_" in k}


def export_hf(state_dict: dict, path: str, out_dir: Path, model_cfg: Any, tokenizer,
              reward_head: bool = False) -> None:
    """Write a trained model as a Hugging Face folder (safetensors + tokenizer).

    state_dict: full (gathered) weights of the trained module, on CPU; under LoRA the
    keys are peft's. LoRA is merged into the base weights unless merge_on_export is off,
    in which case only the adapter is saved, in peft's format. reward_head: the model is
    an AutoModelForSequenceClassification with one label (always merged).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import (AutoConfig, AutoModelForCausalLM,
                              AutoModelForSequenceClassification)

    lora = model_cfg.lora
    out_dir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(path)
    config.use_cache = True
    if reward_head:
        config.num_labels = 1
        config.pad_token_id = tokenizer.pad_token_id
    if lora.enabled and not lora.merge_on_export and not reward_head:
        from peft import LoraConfig

        LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                   target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
                   base_model_name_or_path=path).save_pretrained(out_dir)
        tensors = {k: v.contiguous() for k, v in adapter_state_dict(state_dict).items()}
        save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    else:
        if lora.enabled:
            state_dict = merge_lora_state_dict(
                with_original_base(state_dict, path, TORCH_DTYPES[model_cfg.dtype]),
                lora.alpha / lora.r)
        config.dtype = TORCH_DTYPES[model_cfg.dtype]
        with torch.device("meta"):  # a skeleton for names and config; weights come from sd
            cls = AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM
            skeleton = cls.from_config(config)
        expected = set(skeleton.state_dict().keys())
        missing = sorted(expected - set(state_dict))
        if missing:
            raise RuntimeError(f"export: weights missing from the trained model: {missing[:5]}")
        skeleton.save_pretrained(out_dir, state_dict={k: state_dict[k].contiguous()
                                                      for k in expected},
                                 safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if (Path(path) / "generation_config.json").is_file():  # the base's sampling defaults
        shutil.copyfile(Path(path) / "generation_config.json", out_dir / "generation_config.json")
    (out_dir / "rlhf_export.json").write_text(json.dumps({
        "base": path, "dtype": model_cfg.dtype, "lora": lora.enabled,
        "merged": (not lora.enabled) or lora.merge_on_export}, indent=2))


FOREIGN_MAX_LENGTH = 2048  # tokens scored of a reward model not exported by rlhf.rm


def is_reward_model(path: str) -> bool:
    """Whether the folder at `path` is a reward model: exported by rlhf.rm
    (rlhf_reward.json), or a Hugging Face sequence-classification model with a single
    output (e.g. a reward model from the hub), which scores text with its own
    tokenizer."""
    folder = Path(path)
    if (folder / "rlhf_reward.json").is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    one_output = config.get("num_labels", len(config.get("id2label") or {"0": 0})) == 1
    return one_output and any(a.endswith("ForSequenceClassification")
                              for a in config.get("architectures") or [])
