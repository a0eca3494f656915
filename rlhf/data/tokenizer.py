"""Load a tokenizer as AutoTokenizer does, without AutoTokenizer's imports where the
result is known.

`AutoTokenizer` imports transformers' model-class machinery (and with it torch, torch's
compiler and scikit-learn): 9-11 s of one core on these machines, paid by every process
that tokenises (each Ray Data worker of a pipeline, each driver). For a Llama-type folder
whose tokenizer_config.json names the generic tokenizers-backed class (the built-in tiny
model and what the project exports from it, Llama 3's own folders) AutoTokenizer returns
exactly `TokenizersBackend.from_pretrained(folder)` (transformers 5's tokenization_auto:
the generic hub class is kept for a model type whose hub class is not known to be
wrong, and Llama's is not); that is loaded directly here, in ~2 s.
tests/unit/test_tokenizer.py checks the two give the same class, vocabulary, special
tokens, chat template and encodings. Anything else goes through AutoTokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENERIC = ("TokenizersBackend", "PreTrainedTokenizerFast")
DIRECT_MODEL_TYPES = ("llama",)


def loads_directly(path: str) -> bool:
    """Whether `path` is a local folder whose tokenizer AutoTokenizer would load as the
    generic tokenizers-backed class (see the module's docstring)."""
    folder = Path(path)
    try:
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    return ((folder / "tokenizer.json").is_file() and "auto_map" not in tok_cfg
            and tok_cfg.get("tokenizer_class") in GENERIC
            and model_type in DIRECT_MODEL_TYPES)


def auto_tokenizer(path: str) -> Any:
    """The tokenizer of a model folder (or hub id), as AutoTokenizer.from_pretrained."""
    if loads_directly(path):
        from transformers import PreTrainedTokenizerFast  # TokenizersBackend in v5

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
