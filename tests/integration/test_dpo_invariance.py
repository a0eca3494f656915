"""The same global batch gives the same losses however it is computed: micro-batch x
accumulation splits, packing on/off, ZeRO 0/2/3, reference on the fly or precomputed.

One worker with data.preserve_order, so every run sees the same pairs in the same steps.
Across worker counts Ray's streaming split hands rows to workers dynamically, so which
pairs make up step k differs from run to run; there the data set is exactly one global
batch and every epoch one step, so each step sees all of it whatever the split.
"""

import pytest

from tests.integration.conftest import dpo, metrics

COMMON = ["cluster.num_workers=1", "data.preserve_order=true", "train.max_steps=3",
          "train.eval_every=0", "train.global_batch_size=8", "train.warmup_ratio=0",
          "train.lr_scheduler=constant"]


def losses(tmp_path, name, *overrides):
    run_dir = dpo(tmp_path / name, *COMMON, *overrides)
    return [r["train/loss"] for r in metrics(run_dir) if "train/loss" in r]


def test_same_losses_whatever_the_split(ray_cluster, tmp_path):
    base = losses(tmp_path, "base", "train.micro_batch_size=8", "cluster.zero_stage=2")
    assert len(base) == 3 and base[1] != base[0]
    variants = {
        "micro 4 x accum 2, padded": ["train.micro_batch_size=4", "data.packing=false"],
        "micro 2 x accum 4, ZeRO-3": ["train.micro_batch_size=2", "cluster.zero_stage=3"],
        "precomputed reference, ZeRO-0": ["train.micro_batch_size=8", "cluster.zero_stage=0",
                                          "loss.precompute_reference=true"],
    }
    for name, overrides in variants.items():
        got = losses(tmp_path, name.replace(" ", "_").replace(",", ""), *overrides)
        assert got == pytest.approx(base, rel=1e-4, abs=1e-6), name


def test_same_losses_on_one_or_two_workers(ray_cluster, tmp_path):
    """8 pairs, global batch 8, 3 epochs: 3 steps over the same 8 pairs, the later ones
    after updates, so the gradient all-reduce and the ZeRO sharding are checked too."""
    one_batch = ["data.demo_pairs=8", "train.epochs=3", "train.max_steps=-1"]
    base = losses(tmp_path, "one", *one_batch, "train.micro_batch_size=8")
    assert len(base) == 3 and base[2] != base[0]
    for stage in (2, 3):
        got = losses(tmp_path, f"two_zero{stage}", *one_batch, "cluster.num_workers=2",
                     "train.micro_batch_size=4", f"cluster.zero_stage={stage}")
        assert got == pytest.approx(base, rel=1e-4, abs=1e-6), stage
