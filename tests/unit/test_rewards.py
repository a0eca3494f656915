"""Reward sources for online RL: loading module:function, the checks on what a reward
function returns (each failure names the function), the weighted sum, clipping and
normalisation."""

import math
import sys
import types

import pytest
import torch

from rlhf.config.ppo import AGGREGATIONS as CONFIG_AGGREGATIONS
from rlhf.config.ppo import ENSEMBLES as CONFIG_ENSEMBLES
from rlhf.core.reward_ensemble import (AGGREGATIONS, ENSEMBLES, ModelEnsemble, aggregate, combine_models,
                                        disagreement, normalise, within_thresholds)
from rlhf.core.rewards import (RewardError, Rewards, RewardSource, call_function,
                               function_source, load_function, shape_scores)


@pytest.fixture
def reward_module(monkeypatch):
    m = types.ModuleType("my_rewards")
    m.length = lambda p, r, meta: [len(x) for x in r]
    m.answer = lambda p, r, meta: [float(x.strip() == d["answer"]) for x, d in zip(r, meta)]
    m.boom = lambda p, r, meta: 1 / 0
    m.short = lambda p, r, meta: [1.0]
    m.nan = lambda p, r, meta: [1.0, math.nan]
    m.text = lambda p, r, meta: "good"
    m.value = 3
    monkeypatch.setitem(sys.modules, "my_rewards", m)
    return m


def test_load_function_errors(reward_module):
    assert load_function("my_rewards:length")(["p"], ["abc"], [{}]) == [3]
    with pytest.raises(RewardError, match="module:function"):
        load_function("my_rewards.length")
    with pytest.raises(RewardError, match="cannot import 'no_such_module'.*working-dir"):
        load_function("no_such_module:f")
    with pytest.raises(RewardError, match="has no function 'value'"):
        load_function("my_rewards:value")


@pytest.mark.parametrize("name, match", [
    ("boom", "my_rewards:boom raised ZeroDivisionError"),
    ("short", "returned 1 rewards for 2 responses"),
    ("nan", r"returned nan for response 1 \(1 non-finite"),
    ("text", "returned str 'good'; it must return one number per response"),
])
def test_bad_reward_results_name_the_function(reward_module, name, match):
    fn = load_function(f"my_rewards:{name}")
    with pytest.raises(RewardError, match=match):
        call_function(fn, f"my_rewards:{name}", ["p", "q"], ["a", "b"], [{}, {}])


def test_weighted_sum_with_metadata(reward_module):
    rewards = Rewards([function_source("my_rewards:length", 0.5),
                       function_source("my_rewards:answer", 2.0)])
    total, parts = rewards(["1+1=", "2+2="], [" 2", "5"], [{"answer": "2"}, {"answer": "4"}])
    # .5 * len + 2 * correct: .5 * 2 + 2 * 1 = 3; .5 * 1 + 0 = .5
    assert total == [3.0, 0.5]
    assert parts == {"my_rewards:length": [2, 1], "my_rewards:answer": [1.0, 0.0]}


def test_clip_and_normalise():
    s = torch.tensor([-5.0, 0.0, 1.0, 2.0])
    assert shape_scores(s, clip=1.5).tolist() == [-1.5, 0.0, 1.0, 1.5]
    z = shape_scores(s, normalise=True)
    assert abs(z.mean().item()) < 1e-6 and abs(z.std().item() - 1) < 1e-6
    assert shape_scores(torch.tensor([3.0]), normalise=True).tolist() == [3.0]


def test_reward_model_scores_whatever_the_batch_and_what_counts_as_one(
        tiny_model_path, reward_model_dir, tmp_path):
    """A reward-model folder as rlhf.rm exports it scores the same in batches of 2 or in
    one forward; a causal LM is no reward model, another project's
    sequence-classification model with one output is (it has no rlhf_reward.json)."""
    import json
    import shutil

    from cluster.models import is_reward_model
    from cluster.scoring import RewardScorer

    prompts = ["\n\nHuman: hi\n\nAssistant:"] * 3
    responses = [" Hello!", " Go away.", " What can I do for you today?"]
    scores = RewardScorer(reward_model_dir, batch_size=2).score(prompts, responses)
    assert len(scores) == 3 and scores[0] != scores[1]
    whole = RewardScorer(reward_model_dir, batch_size=None).score(prompts, responses)
    assert whole == pytest.approx(scores, abs=1e-5)
    assert is_reward_model(reward_model_dir) and not is_reward_model(tiny_model_path)
    foreign = tmp_path / "foreign"
    shutil.copytree(reward_model_dir, foreign)
    (foreign / "rlhf_reward.json").unlink()
    assert is_reward_model(str(foreign))
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "id2label": {0: "a", 1: "b"}}))
    assert not is_reward_model(str(foreign))  # two outputs: a classifier, not a reward


# ------------------------------------------------- ensembles, aggregation, thresholds

def test_ensemble_rules_by_hand():
    """3 models x 2 samples. Sample 0: 0.2, 0.4, 0.3 (mean 0.3, population variance
    0.02 / 3); sample 1: 1, -1, 0 (mean 0, variance 2 / 3)."""
    s = torch.tensor([[0.2, 1.0], [0.4, -1.0], [0.3, 0.0]], dtype=torch.float64)
    assert combine_models(s, "mean").tolist() == pytest.approx([0.3, 0.0])
    assert combine_models(s, "min").tolist() == pytest.approx([0.2, -1.0])
    # UWO (Coste et al. eq. 3): mean - 0.5 x variance
    assert combine_models(s, "uwo", 0.5).tolist() == pytest.approx(
        [0.3 - 0.5 * 0.02 / 3, -0.5 * 2 / 3])
    assert combine_models(s, "mean_minus_std", 1.0).tolist() == pytest.approx(
        [0.3 - (0.02 / 3) ** 0.5, -(2 / 3) ** 0.5])
    assert disagreement(s).tolist() == pytest.approx([(0.02 / 3) ** 0.5, (2 / 3) ** 0.5])
    one = s[:1]  # one model: every rule gives its own scores
    for how in ("mean", "min", "uwo", "mean_minus_std"):
        assert combine_models(one, how, 2.0).tolist() == pytest.approx([0.2, 1.0])
    with pytest.raises(ValueError, match="use one of mean, min, uwo, mean_minus_std"):
        combine_models(s, "median")
    assert CONFIG_ENSEMBLES == ENSEMBLES  # the config's own copies (it loads without torch)
    assert CONFIG_AGGREGATIONS == AGGREGATIONS


def test_sources_summed_or_normalised_first_by_hand():
    """A 0/1 rule and a reward model on a 10x larger scale, weights 1 and 0.1."""
    assert normalise(torch.tensor([1.0, 2.0, 3.0])).tolist() == pytest.approx(
        [-1.5 ** 0.5, 0.0, 1.5 ** 0.5])
    assert normalise(torch.tensor([5.0, 5.0])).tolist() == [0.0, 0.0]
    s = torch.tensor([[0.0, 1.0, 1.0], [10.0, 20.0, 30.0]], dtype=torch.float64)
    assert aggregate(s, [1, 0.1]).tolist() == pytest.approx([1.0, 3.0, 4.0])
    # each source first: the rule [0, 1, 1] -> [-sqrt 2, 1/sqrt 2, 1/sqrt 2], the model
    # [10, 20, 30] -> [-sqrt 1.5, 0, sqrt 1.5], then 1 x rule + 0.1 x model
    r, m = 2 ** 0.5, 1.5 ** 0.5
    assert aggregate(s, [1, 0.1], "normalise_then_sum").tolist() == pytest.approx(
        [-r - 0.1 * m, 1 / r, 1 / r + 0.1 * m])
    # per group (two prompts' samples): group 0 = samples 0, 2; group 1 = samples 1, 3.
    # Group 0: rule [0, 1] -> [-1, 1], model [10, 30] -> [-1, 1]; group 1: rule [1, 1]
    # is constant -> [0, 0] (nothing told apart), model [20, 40] -> [-1, 1]
    s4 = torch.tensor([[0.0, 1.0, 1.0, 1.0], [10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)
    got = aggregate(s4, [1, 0.1], "normalise_then_sum", groups=[0, 1, 0, 1]).tolist()
    assert got == pytest.approx([-1.1, -0.1, 1.1, 0.1])
    with pytest.raises(ValueError, match="2 weights for 3 sources"):
        aggregate(torch.zeros(3, 2), [1, 1])


def test_reward_thresholds_keep_the_closed_interval():
    r = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0])
    assert within_thresholds(r, 0.0, 1.0).tolist() == [False, True, True, True, False]
    assert within_thresholds(r, min_score=0.5).tolist() == [False, False, True, True, True]
    assert within_thresholds(r).all()


def test_reward_models_join_the_sum_as_one_source():
    """A function (weight 1) and two models combined by their minimum, weight 2: sample
    0 scores 1 and 3 (min 1, std 1), sample 1 scores 2 and 0 (min 0, std 1)."""
    models = ModelEnsemble(["rm0", "rm1"], [lambda p, r: [1.0, 2.0], lambda p, r: [3.0, 0.0]],
                           "min", 0.0, 2.0)
    rewards = Rewards([RewardSource("f", 1.0, lambda p, r, m: [10.0, 20.0])], models)
    total, parts = rewards(["a", "b"], ["x", "y"])
    assert total == [12.0, 20.0]
    assert parts == {"f": [10.0, 20.0], "rm0": [1.0, 2.0], "rm1": [3.0, 0.0],
                     "ensemble": [1.0, 0.0], "ensemble_std": [1.0, 1.0]}


# ------------------------------------------------- the reward-hacking monitor

def test_length_correlation_by_hand():
    """Rewards [1, 2, 3] for lengths [10, 20, 30]: correlation 1; reversed: -1; a
    constant reward: 0. The sums add over micro-batches and ranks."""
    from rlhf.core.reward_monitor import length_correlation, length_sums

    def corr(rewards, lengths):
        r = torch.tensor(rewards)
        return length_correlation({**length_sums(r, lengths), "reward": float(r.sum()),
                                   "reward_sq": float((r ** 2).sum()), "responses": len(r)})

    assert corr([1.0, 2.0, 3.0], [10, 20, 30]) == pytest.approx(1.0)
    assert corr([3.0, 2.0, 1.0], [10, 20, 30]) == pytest.approx(-1.0)
    assert corr([2.0, 2.0, 2.0], [10, 20, 30]) == 0.0
    # [1, 0, 1, 0] against [1, 1, 3, 3]: covariance 0 -> 0; [0, 0, 1, 1]: cov 0.5,
    # stds 0.5 and 1 -> 1
    assert corr([1.0, 0.0, 1.0, 0.0], [1, 1, 3, 3]) == pytest.approx(0.0, abs=1e-9)
    assert corr([0.0, 0.0, 1.0, 1.0], [1, 1, 3, 3]) == pytest.approx(1.0)


def test_the_monitor_warns_when_the_proxy_rises_and_gold_falls():
    """A constructed run: the training reward rises at every evaluation; gold rises, then
    falls over the last three (steps 20-40); the ensemble's std grows from step 10 on."""
    from rlhf.core.reward_monitor import hacking_warnings

    reward = [0.1, 0.2, 0.3, 0.4, 0.5]
    gold = [0.1, 0.2, 0.3, 0.25, 0.2]
    std = [0.1, 0.1, 0.2, 0.3, 0.4]
    rows = [{"step": 10 * i, "eval/reward": r, "eval/reward[gold]": g,
             "eval/reward[ensemble_std]": s} for i, (r, g, s) in enumerate(zip(reward, gold, std))]
    assert hacking_warnings(rows[:3]) == []  # gold still rising, std flat then up
    got = hacking_warnings(rows)
    assert len(got) == 2
    assert "steps 20-40 the training reward rose (0.300 -> 0.500) while the gold reward " \
           "(reward.gold) fell (0.300 -> 0.200)" in got[0]
    assert "ensemble std 0.200 -> 0.400" in got[1]
    # over the whole run each kind once, at its first window, in the order found (std:
    # steps 10-30, then gold: 20-40)
    whole = hacking_warnings(rows, whole_run=True)
    assert len(whole) == 2 and "steps 10-30" in whole[0] and "ensemble std" in whole[0]
    assert whole[1] == got[0]
    # no warning while the reward falls, or with gold only flat
    assert hacking_warnings([{**r, "eval/reward": -r["eval/reward"]} for r in rows]) == []
    flat = [{"step": r["step"], "eval/reward": r["eval/reward"], "eval/reward[gold]": 0.2}
            for r in rows]
    assert hacking_warnings(flat, whole_run=True) == []


def test_two_order_preference_cancels_position_bias_by_hand():
    """P(a > b) from the judge's letter log-probs in both orders. A judge that answers A
    whatever it is shown gives 0.5; one that means it gives the mean of the two
    orders' renormalised probabilities."""
    from rlhf.core.pairwise import two_order_preference

    always_a = torch.log(torch.tensor([[0.9, 0.1]]))
    assert two_order_preference(always_a, always_a).tolist() == pytest.approx([0.5])
    # a first: p(A) 0.6, p(B) 0.2 (renormalised 0.75); b first: p(A) 0.3, p(B) 0.6 (a is
    # B: 0.6 / 0.9 = 2/3) -> (0.75 + 2/3) / 2
    got = two_order_preference(torch.log(torch.tensor([[0.6, 0.2]])),
                               torch.log(torch.tensor([[0.3, 0.6]])))
    assert got.tolist() == pytest.approx([(0.75 + 2 / 3) / 2])
    with pytest.raises(ValueError, match="two \\(N, 2\\) tables"):
        two_order_preference(torch.zeros(2, 2), torch.zeros(3, 2))


def test_pairs_from_a_prompts_scores_by_hand():
    """Online DPO's (and rlhf.sample's) pairs: best against worst (first of the best,
    last of the worst), a random other, or every pair; ties and gaps below min_gap never
    paired. The config's copy of the pairings is the module's."""
    import random

    from rlhf.config.ppo import PAIRINGS as CONFIG_PAIRINGS
    from rlhf.core.pairwise import PAIRINGS, select_pairs

    assert CONFIG_PAIRINGS == PAIRINGS
    s = [0.2, 0.9, 0.5, 0.1]
    assert select_pairs(s, "best_worst") == [(1, 3)]
    assert select_pairs([1, 0, 1, 0], "best_worst") == [(0, 3)]
    assert select_pairs([0.3, 0.3], "best_worst") == []  # a tie says nothing
    assert select_pairs(s, "best_worst", min_gap=0.81) == []  # 0.9 - 0.1 = 0.8
    assert select_pairs([0.7], "all") == []
    assert select_pairs(s, "all") == [(1, 0), (2, 0), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert select_pairs(s, "all", min_gap=0.35) == [(1, 0), (1, 2), (1, 3), (2, 3)]
    # best_random: the best against one of those at least min_gap below it
    draws = {select_pairs(s, "best_random", 0.35, random.Random(k))[0] for k in range(50)}
    assert draws == {(1, 0), (1, 2), (1, 3)}
    assert select_pairs(s, "best_random", 0.81) == []
    with pytest.raises(ValueError, match="best_worst, best_random, all"):
        select_pairs(s, "worst")


def test_the_runs_reward_hacking_warnings_become_evaluation_flags(tmp_path):
    """rlhf.evaluate's report flags what the training run's monitor warned of."""
    import json

    from rlhf.evaluation.comparison import training_flags

    assert training_flags(None) == [] and training_flags(tmp_path) == []
    (tmp_path / "summary.json").write_text(json.dumps({"warnings": [
        "possible reward hacking: over steps 8-24 ...", "12 responses were cut"]}))
    assert training_flags(tmp_path) == [
        {"flag": "reward_hacking", "message": "possible reward hacking: over steps 8-24 ..."}]
