"""rlhf.core.eval_metrics against hand-computed values."""

import pytest

from rlhf.core import eval_metrics as em


def test_outcomes_and_win_rate_count_a_tie_as_half():
    res = em.outcomes([1.0, 2.0, 3.0, 5.0], [1.0, 3.0, 2.0, 4.95], tol=0.1)
    assert res == [0, -1, 1, 0]
    assert em.win_rate(res) == pytest.approx((1 + 0.5 * 2) / 4)
    with pytest.raises(ValueError):
        em.outcomes([1.0], [])


def test_wilson_interval_matches_the_textbook_values():
    # 50 of 100: (0.5 + 1.96^2/200 -+ 1.96 sqrt(0.0025 + 1.96^2/40000)) / (1 + 1.96^2/100)
    lo, hi = em.wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.40383, abs=1e-5) and hi == pytest.approx(0.59617, abs=1e-5)
    lo, hi = em.wilson_interval(0.0, 10)  # no success: 0 and 2 x 1.96^2/40 / (1 + 1.96^2/10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.27754, abs=1e-5)


def test_bootstrap_interval_resamples_prompts():
    assert em.bootstrap_interval([[1, 1], [1], [1, 1, 1]]) == (1.0, 1.0)
    groups = [[1], [-1]] * 50
    lo, hi = em.bootstrap_interval(groups, seed=3)
    assert lo < 0.5 < hi
    assert em.bootstrap_interval(groups, seed=3) == (lo, hi)  # seeded
    # about the Wilson interval's width for independent comparisons
    w_lo, w_hi = em.wilson_interval(0.5, 100)
    assert abs((hi - lo) - (w_hi - w_lo)) < 0.05


def test_verdict_thresholds():
    assert em.verdict(0.56) == "working"
    assert em.verdict(0.55) == em.verdict(0.5) == "inconclusive"
    assert em.verdict(0.49) == "worse"


def test_the_interval_tempers_a_verdict_it_straddles():
    assert em.interval_caveat("working", 0.6, 0.9) == ""
    assert "reaches across the threshold" in em.interval_caveat("working", 0.44, 0.88)
    assert "reaches across" in em.interval_caveat("worse", 0.3, 0.52)
    assert em.interval_caveat("worse", 0.2, 0.45) == em.interval_caveat("inconclusive", 0, 1) == ""


def test_implicit_reward_accuracy_by_hand():
    # r = 0.1 (aligned - base): chosen [0.2, 0.0], rejected [-0.1, 0.1]
    out = em.implicit_reward_accuracy([-10.0, -20.0], [-12.0, -20.0], [-15.0, -18.0],
                                      [-14.0, -19.0], beta=0.1)
    assert out["accuracy"] == 0.5
    assert out["margin"] == pytest.approx((0.3 - 0.1) / 2)
    assert out["chosen"] == pytest.approx(0.1) and out["rejected"] == pytest.approx(0.0)


def test_distinct_n_and_repeated_ngrams_by_hand():
    assert em.distinct_n(["a b a b"], 1) == 0.5
    assert em.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert em.distinct_n(["", "a"], 2) == 0.0
    # trigrams abc bca cab abc bca cab abc: the last 4 are repeats
    assert em.repeated_ngram_rate("a b c a b c a b c", n=3) == pytest.approx(4 / 7)
    assert em.repeated_ngram_rate("Sure! Rivers are a lovely subject.") == 0.0
    assert em.is_looping("rivers rivers rivers rivers rivers")  # 2 4-grams, 1 repeat
    assert not em.is_looping("No. Figure out rivers yourself, I am not going to help.")


def test_text_stats_and_flags_in_words():
    healthy = ["Sure! Rivers are a lovely subject and they move.",
               "Happy to help. Owls are interesting birds of the night."]
    looping = ["owls owls owls owls owls owls owls owls", "rain rain rain rain rain rain"]
    b = em.text_stats(healthy, [12, 13], [False, False])
    a = em.text_stats(looping, [48, 48], [True, True])
    assert b["loop_share"] == 0 and a["loop_share"] == 1 and a["truncated_share"] == 1
    assert a["length_words"] == 7 and b["length_tokens"] == 12.5
    flags = {f["flag"]: f["message"] for f in em.drift_flags(b, a, kl_per_token=1.2)}
    assert set(flags) == {"repetitive", "low_diversity", "length", "no_stop", "drift"}
    assert "100% of the aligned model's responses are stuck in a loop" in flags["repetitive"]
    assert all("halve the learning rate, raise beta to 0.2-0.5" in m for m in flags.values())
    assert em.drift_flags(b, b, kl_per_token=0.01) == []


def test_a_runs_data_section_fills_what_the_command_line_left_at_default():
    """rlhf.evaluate takes the training run's data (a PPO run's prompts too), except
    where the command line set a field."""
    from rlhf.config import EvalDataConfig
    from rlhf.evaluation.setup import copy_run_data

    ppo_data = {"path": "prompts.jsonl", "prompt_column": "question", "demo_pairs": 256,
                "max_prompt_length": 128, "eval_fraction": 0.1}
    out = copy_run_data(EvalDataConfig(), ppo_data)
    assert (out.path, out.columns.prompt, out.max_prompt_length, out.eval_fraction) == (
        "prompts.jsonl", "question", 128, 0.1)
    mine = copy_run_data(EvalDataConfig(eval_path="mine.jsonl", max_prompt_length=64),
                          {**ppo_data, "eval_path": None})
    assert mine.eval_path == "mine.jsonl" and mine.max_prompt_length == 64
