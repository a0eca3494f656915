"""The same global batch gives the same losses however it is computed: micro-batch x
accumulation splits, packing on/off, one or two workers, ZeRO 0/2/3, ZeRO-3 with the
optimizer and parameters offloaded to CPU (DeepSpeed's CPU Adam), reference on the fly
or precomputed (stopped and resumed with train.resume); and with a weighted loss mix,
LD-DPO and a moving (TR-DPO) reference, through a lost worker and a restart.

Across worker counts Ray's streaming split hands rows to workers dynamically, so which
pairs make up step k could differ from run to run; here the data set is exactly one
global batch of 8 pairs and every epoch one step, so each step sees all of it whatever
the split, and 3 epochs give 3 steps whose later ones run after updates (the gradient
all-reduce, the ZeRO sharding and the optimizer are checked too). (Merged: the split
test and the one-or-two-workers test of earlier suites, and ZeRO-3 with offload against
ZeRO-2, which compared different batches within 10%; then the two-worker ZeRO-2 run
with a micro x accumulation split, padded, whose split and padding the ZeRO-3 run
now carries.)
"""

import math

import pytest

from tests.integration.conftest import dpo, metrics

ONE_BATCH = ["data.demo_pairs=8", "train.epochs=3", "train.max_steps=-1",
             "train.eval_every=0", "train.global_batch_size=8", "train.warmup_ratio=0",
             "train.lr_scheduler=constant", "data.preserve_order=true"]


def losses(tmp_path, name, *overrides, **kwargs):
    run_dir = dpo(tmp_path / name, *ONE_BATCH, *overrides, **kwargs)
    return run_dir, [r["train/loss"] for r in metrics(run_dir) if "train/loss" in r]


def test_same_losses_however_the_batch_is_computed(ray_cluster, tmp_path):
    _, base = losses(tmp_path, "base", "cluster.num_workers=1", "train.micro_batch_size=8",
                     "cluster.zero_stage=2")
    assert len(base) == 3 and base[1] != base[0] and base[2] != base[0]
    # step 1: policy == reference, so the loss is exactly log 2 (a reference that is
    # mis-gathered under ZeRO-3, or misaligned when precomputed, would not give it)
    assert base[0] == pytest.approx(math.log(2), abs=1e-6)
    # two workers (the base is one worker, micro 8, packed), ZeRO-0, the reference's
    # log-probs precomputed in a pass before training and streamed in with the pairs;
    # stopped after step 2 and resumed (train.resume) for step 3: the restored run's
    # rows must carry their own reference values again
    pre = ["train.micro_batch_size=4", "cluster.zero_stage=0",
           "loss.precompute_reference=true", "output.name=pre"]
    first, got = losses(tmp_path, "two_workers_precomputed_zero0", *pre,
                        "train.max_steps=2", "train.checkpoint_every=2")
    assert got[0] == pytest.approx(math.log(2), abs=1e-6)
    assert got == pytest.approx(base[:2], rel=1e-4, abs=1e-6)
    resumed, got = losses(tmp_path, "two_workers_precomputed_zero0", *pre,
                          "train.resume=true")
    assert resumed == first
    assert got == pytest.approx(base, rel=1e-4, abs=1e-6)

    # A weighted mix of two DPO losses (MPO), LD-DPO's length weighting and TR-DPO's
    # reference, moved half-way to the policy after every step: steps 2 and 3 run
    # against a moved reference. One worker, ZeRO-2, the reference ZeRO-3-partitioned in
    # CPU memory (offload_frozen: a whole policy blended into a partitioned reference),
    # against two workers, micro 2 x accum 2, padded, ZeRO-3, optimizer and parameters
    # offloaded (partitions blended into partitions), whose last worker dies after step
    # 2: the group restarts from step 1's checkpoint, which holds the moved reference.
    tr = ["loss.type=sigmoid,bco_pair", "loss.weights=1,0.5", "loss.ld_alpha=0.5",
          "loss.reference_sync_every=1", "loss.reference_mixup=0.5"]
    _, tr_base = losses(tmp_path, "tr_base", *tr, "cluster.num_workers=1",
                        "train.micro_batch_size=8", "cluster.offload_frozen=true")
    # step 1: policy == reference, so sigmoid's log 2 plus half of bco_pair's 2 log 2
    assert tr_base[0] == pytest.approx(2 * math.log(2), abs=1e-6)
    assert len(tr_base) == 3 and tr_base[2] != tr_base[1]
    run_dir, got = losses(tmp_path, "tr_zero3_offload", *tr, "train.micro_batch_size=2",
                          "data.packing=false", "cluster.zero_stage=3",
                          "cluster.offload_optimizer=true", "cluster.offload_params=true",
                          "train.checkpoint_every=1",
                          "cluster.max_failures=1", crash_once_at_step=2)
    assert (run_dir / ".crash-injected").read_text() == "2"
    # Within 1e-3: this mix under ZeRO-3 with DeepSpeed's CPU Adam differs from one
    # worker's torch AdamW by up to 1.7e-4 at step 2, and two runs of the same ZeRO-3
    # config (with and without the restart) by 4e-4 at step 3 (measured); a reference
    # that did not move (0.757 at step 2 against 1.202) or was not restored misses it by
    # far more.
    assert got[:1] + got[-2:] == pytest.approx(tr_base, rel=1e-3)
    # the offloaded ZeRO-3 run's export is whole and loads
    from transformers import AutoModelForCausalLM

    assert (run_dir / "model" / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(run_dir / "model")
