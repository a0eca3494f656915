import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every 2 s by default: a finished run, a
# registered checkpoint or a dead worker is seen up to 2 s late, once per run. Every
# Ray these tests start (in process, `ray start`, cluster_utils nodes) inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train starts an actor per run that polls for node drains (spot preemption
# notices); no test here drains a node (lost nodes are killed), and its process start
# is ~2 s of CPU at every run's start on these 2 cores. Runs outside the tests keep it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

PREBUILD_CPU_ADAM = (
    "import os; os.nice(19)\n"
    "from deepspeed.ops.op_builder import CPUAdamBuilder\n"
    "CPUAdamBuilder().load(verbose=False)\n")


def pytest_collection_modifyitems(config, items):
    """Tests that start a Ray cluster of their own (marked own_cluster) run first, before
    the integration tests' shared local Ray is up (tests/integration/conftest.py), so
    it starts once per session."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)
    if any("test_dpo_invariance" in item.nodeid for item in items):
        _prebuild_cpu_adam()


def _prebuild_cpu_adam() -> None:
    """DeepSpeed's CPU Adam (ZeRO-3 with the optimizer offloaded, in
    test_dpo_invariance.py) is compiled on first use: ~77 s of g++ on a fresh 2-core
    machine. Started here at the lowest priority, the compile runs on what the tests
    before it leave idle (clusters and nodes starting, waits); if it is not done when
    the test needs it, the test waits on torch's build lock until it is, then loads
    the built kernel. Once built, this only finds it in torch's extension cache. Its own
    session, so it is never killed half-way (a killed build leaves a lock the next one
    waits on)."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, "-c", PREBUILD_CPU_ADAM], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_path():
    from rlhf.data.demo import ensure_tiny_model

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


@pytest.fixture
def other_tokenizer_dir(tmp_path):
    """A folder holding a tokenizer with another vocabulary than the tiny model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path / "other-tokenizer"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["other text entirely"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def reward_model_dir(tiny_model_path, tmp_path_factory):
    """A folder as rlhf.rm exports a reward model (scalar head, tokenizer files,
    rlhf_reward.json), from the tiny model with an untrained head: for the plumbing of
    scoring, not for what its scores mean."""
    import json
    import shutil

    from transformers import AutoModelForSequenceClassification

    rm = tmp_path_factory.mktemp("rm") / "model"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1
                                                       ).save_pretrained(rm)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{tiny_model_path}/{f}", rm / f)
    (rm / "rlhf_reward.json").write_text(json.dumps(
        {"max_length": 256, "max_prompt_length": 128, "truncation": "truncate"}))
    return str(rm)
