"""The general-task comparison's maths (rlhf/evaluation/general_tasks.py), by hand."""

import math

import pytest

from rlhf.evaluation.general_tasks import compare, paired


def test_paired_difference_and_its_standard_error():
    base = {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}
    aligned = {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0, 9: 1.0}  # doc 9: only one model has it
    diff, se, n = paired(base, aligned)
    # differences 0, +1, -1, -1: mean -0.25, sample sd sqrt(2.75/3), se sd/2
    assert n == 4 and diff == pytest.approx(-0.25)
    assert se == pytest.approx(math.sqrt((0.0625 + 1.5625 + 0.5625 + 0.5625) / 3) / 2)


def _res(acc: dict, higher=True):
    vals = list(acc.values())
    return {"results": {"t": {"acc": sum(vals) / len(vals), "acc_stderr": 0.1}},
            "samples": {"t": {i: {"acc": v} for i, v in acc.items()}},
            "higher_is_better": {"t": {"acc": higher}}}


def test_worse_beyond_noise_is_flagged_and_noise_is_not():
    base = _res({i: 1.0 for i in range(20)})
    much_worse = _res({i: float(i % 4 == 0) for i in range(20)})  # 15 of 20 lost
    noisy = _res({i: float(i != 3) for i in range(20)})  # one lost
    (row,) = compare(base, much_worse)
    assert row["difference"] == pytest.approx(-0.75) and row["worse_beyond_noise"]
    assert row["documents"] == 20 and row["base"] == 1.0
    (row,) = compare(base, noisy)
    assert row["difference"] == pytest.approx(-0.05) and not row["worse_beyond_noise"]
    # a metric where lower is better (e.g. perplexity) flips the test
    (row,) = compare(_res({0: 1.0, 1: 1.0, 2: 1.0}, higher=False),
                     _res({0: 3.0, 1: 3.0, 2: 3.0}, higher=False))
    assert row["worse_beyond_noise"] and row["difference_stderr"] == 0
