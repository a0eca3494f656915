import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def tiny_model_path():
    from rlhf.demo import ensure_tiny_model

    return str(ensure_tiny_model())


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from cluster.models import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="session")
def hh_rlhf():
    if not HH_RLHF.is_file():
        pytest.skip(f"{HH_RLHF} not found (../shared/data/hh-rlhf beside the checkout)")
    return HH_RLHF
