"""Rollout seeds (cluster.vllm_engines.sample_seed): a prompt's samples are fixed by the run's seed,
the weights version and the row, so a resumed run or a retried engine call draws the
same ones; different prompts' seed blocks (vLLM uses seed + 0..n-1) never overlap."""

from cluster.vllm_engines import sample_seed


def test_seeds_are_fixed_by_seed_stage_and_row_and_blocks_do_not_overlap():
    n = 4
    # Pinned values: the same in every process, on every machine and Python version (a
    # resumed run on another node must draw the same samples; Python's own hash() of a
    # string changes with each process). A change here changes every seeded sample.
    assert sample_seed(42, 3, 17, n) == 1427356504
    assert sample_seed(42, "evaluate", 17, n) == 1258120360
    assert sample_seed(0, 1, 0, 1) == 306705043
    seeds = {sample_seed(42, v, row, n) for v in (0, 1, 2, "eval") for row in range(500)}
    assert len(seeds) == 4 * 500  # another version, row or eval: another draw
    assert all(s % n == 0 and 0 <= s < 2**32 for s in seeds)  # blocks [s, s + n) disjoint
    assert sample_seed(43, 3, 17, n) != sample_seed(42, 3, 17, n)
