"""The demo's built-in models that our own entry points train: rlhf.ppo's SFT policy
(the tiny model after rlhf.sft) and rlhf.evaluate's judge (rlhf.rm on the demo pairs).
Each is trained once from an embedded default config and cached beside the tiny model
(rlhf.data.demo builds that one), under a key made from the config itself.

It sits with the entry points: it runs rlhf.sft and rlhf.rm, and rlhf.ppo and
rlhf.evaluate use it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf.config import BUILTIN_TOOLS, RMConfig, SFTConfig, parse_args, to_dict
from rlhf.data.demo import build_once, spec_key, tiny_model_path
from rlhf.rm import run as rm_run
from rlhf.sft import run as sft_run


def default_model_key(cfg: Any) -> str:
    """rlhf.data.demo.spec_key of a resolved config, its output section left out: the name
    under which a built-in model trained from that config is cached. Built from the
    config itself, so a changed default or override (a new release's SFT length, another
    demo set) trains a model of its own instead of reusing one trained from other
    settings."""
    return spec_key({k: v for k, v in to_dict(cfg).items() if k != "output"})


def cached_default_model(stem: Path, cfg_cls: type, prog: str, run: Callable,
                         what: str, overrides: tuple[str, ...] = ()) -> str:
    """The exported model/ of an entry point's embedded default run (with `overrides`),
    trained once and kept at `<stem>-<default_model_key(config)>` (a built-in model of
    the demo: rlhf.ppo's SFT policy, rlhf.evaluate's reward model); built once
    (rlhf.data.demo.build_once)."""
    import shutil
    import tempfile

    # data.shuffle_buffer=0: the demo's rows in the order these models were always
    # trained on, so the built-in models (and the runs recorded from them, such as
    # rlhf.ppo's golden run) stay what they were before training data was shuffled
    cfg = parse_args(cfg_cls, ["train.eval_every=0", "train.checkpoint_every=0",
                               "data.shuffle_buffer=0", *overrides], prog)
    path = stem.with_name(f"{stem.name}-{default_model_key(cfg)}")
    if (path / "config.json").is_file():
        return str(path)
    print(f"building {what} (once, a minute or two) ...", flush=True)

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            cfg.output.dir = tmp  # not part of the key
            shutil.copytree(run(cfg) / "model", folder, dirs_exist_ok=True)

    return str(build_once(path, build))


def builtin_sft_model(data_path: str) -> str:
    """The tiny model after the embedded default SFT (rlhf.sft) on the demo's answers, or
    on the tool demo's conversations (data.path=builtin:tools), built once and cached
    beside the tiny model: a policy that writes what the task needs, for RL to refine."""
    stem = tiny_model_path().with_name(tiny_model_path().name + "-sft")
    if data_path == BUILTIN_TOOLS:
        return cached_default_model(
            stem.with_name(stem.name + "-tools"), SFTConfig, "rlhf.sft", sft_run,
            "the policy: the tiny model after SFT on the tool demo's conversations",
            overrides=(f"data.path={BUILTIN_TOOLS}", "train.epochs=3"))
    return cached_default_model(stem, SFTConfig, "rlhf.sft", sft_run,
                                "the policy: the tiny model after the embedded SFT")


BUILTIN_RM_PAIRS = 800


def builtin_reward_model() -> str:
    """rlhf.rm's embedded default run on 800 demo pairs (the tiny model), trained once
    and cached beside the tiny model: the judge of the demo data. 800 pairs: its
    held-out accuracy is 1.0 as on the default 2,400, in half the time (27 s against
    52 s on 2 CPU cores), which every fresh machine and CI run pays."""
    tiny = tiny_model_path()
    return cached_default_model(tiny.with_name(f"{tiny.name}-rm"),
                                RMConfig, "rlhf.rm", rm_run,
                                "the judge: the built-in reward model on the demo pairs",
                                overrides=(f"data.demo_pairs={BUILTIN_RM_PAIRS}",))
