"""python -m rlhf.rm on a real local Ray cluster: the reward model learns the demo
preferences, its export loads with transformers and scores through the scoring API
(in process, as a Ray actor, and served by a pool of replicas as rlhf.ppo uses it, with
another project's sequence-classification model beside it), under ZeRO-2 and
ZeRO-3 + LoRA."""

import pytest

from tests.integration.conftest import metrics, rm, summary


def _held_out(n=24):
    from rlhf.data.demo import demo_pair

    return [demo_pair(i, "eval") for i in range(n)]


def test_zero2_learns_and_exports_a_scorable_model(ray_cluster, tmp_path):
    import ray
    import torch
    from transformers import AutoModelForSequenceClassification

    from cluster.scoring import reward_actor
    from cluster.scoring import RewardScorer

    run_dir = rm(tmp_path, "data.demo_pairs=320", "train.eval_every=20",
                 "cluster.zero_stage=2")
    s = summary(run_dir)
    assert s["steps"] == 40 and s["eval/pairs"] == 32
    assert s["eval/accuracy"] >= 0.9, s
    evals = [r for r in metrics(run_dir) if "eval/accuracy" in r]
    assert len(evals) == 2 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert (run_dir / "curves.png").is_file()

    model_dir = run_dir / "model"
    m = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert m.config.num_labels == 1 and (model_dir / "rlhf_reward.json").is_file()
    pairs = _held_out()
    scorer = RewardScorer(str(model_dir))
    chosen = scorer.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = scorer.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(pairs) >= 0.9
    # one by one through plain transformers: the same numbers (batching and the length
    # sort change nothing)
    ids = torch.tensor([scorer.tokenize(pairs[3]["prompt"], pairs[3]["chosen"])])
    with torch.no_grad():
        assert m(input_ids=ids).logits[0, 0].item() == pytest.approx(chosen[3], abs=1e-4)
    actor = reward_actor(str(model_dir), num_cpus=0)
    remote = ray.get(actor.score.remote([p["prompt"] for p in pairs[:4]],
                                        [p["chosen"] for p in pairs[:4]]))
    assert remote == pytest.approx(chosen[:4], abs=1e-5)
    ray.kill(actor)


def test_zero3_lora_with_a_margin_column_exports_merged(ray_cluster, tmp_path):
    """ZeRO-3 + LoRA on an in-memory data set whose margin column reaches the loss; a
    row without a usable margin is dropped and counted. (Merged: the ZeRO-3 LoRA test
    and the margin test.)"""
    from datasets import Dataset

    from rlhf.data.demo import demo_pair
    from cluster.scoring import RewardScorer

    rows = [{**demo_pair(i), "gap": 100.0} for i in range(63)]
    rows.append({**demo_pair(63), "gap": None})  # a missing value
    run_dir = rm(tmp_path, "cluster.zero_stage=3", "model.lora.enabled=true",
                 "train.max_steps=4", "train.learning_rate=1e-3", "data.columns.margin=gap",
                 "data.eval_fraction=0.25", "train.eval_every=0",
                 dataset=Dataset.from_list(rows))
    s = summary(run_dir)
    assert s["steps"] == 4
    dropped = {**s["data"]["train"]["dropped"], **s["data"]["eval"]["dropped"]}
    assert dropped == {"margin missing or not a number": 1}
    # a margin of 100 on fresh scores: the loss is about 100 (-log sigma(-100)), not 0.69
    first = next(r for r in metrics(run_dir) if "train/loss" in r)
    assert first["train/loss"] > 50
    assert not (run_dir / "model" / "adapter_config.json").exists()  # merged
    scores = RewardScorer(str(run_dir / "model")).score(["\n\nHuman: hi\n\nAssistant:"],
                                                         [" Hello!"])
    assert len(scores) == 1 and abs(scores[0]) < 1e6


def test_served_reward_model_scores_as_the_plain_model(ray_cluster, tmp_path,
                                                       reward_model_dir):
    """A reward model served by a pool of replicas (cluster.reward_service: what rlhf.ppo's
    reward.model and reward.models are) scores as the model in this process does; the
    rollout side combines, thresholds and survives its replicas' deaths."""
    from cluster.reward_service import start_reward_pool
    from cluster.scoring import RewardScorer

    pairs = [(p["prompt"], p[k]) for p in _held_out(4) for k in ("chosen", "rejected")]
    want = RewardScorer(reward_model_dir).score([p for p, _ in pairs],
                                                [r for _, r in pairs])
    assert len(set(want)) == len(want)  # the inputs score apart, so order is checked

    pool = start_reward_pool(reward_model_dir, replicas=2, num_cpus=0.5, batch_size=3,
                             timeout_s=3)
    try:
        check_the_served_pool(pool, pairs, want)
        check_served_models_score_and_filter_samples(pool, reward_model_dir, pairs, tmp_path)
    finally:
        pool.close()


def check_the_served_pool(pool, pairs: list, want: list[float]) -> None:
    """The same model served by 2 replicas (cluster.reward_service): the same scores in
    the same order, in batches of 3 over both; a replica SIGKILLed from outside (as when
    its node is lost) is restarted by Ray and its batches sent again; one that hangs
    (SIGSTOP) is restarted after the 3 s timeout, its batches answered by the other:
    nothing lost or doubled."""
    import os
    import signal

    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    assert pool.score(prompts, responses) == pytest.approx(want, abs=1e-5)
    assert pool.stats["batches"] == 3 and not pool.stats["retried"]
    first = pool.pids()
    os.kill(first[0], signal.SIGKILL)
    assert pool.score(prompts, responses) == pytest.approx(want, abs=1e-5)
    second = pool.pids()
    assert second[0] != first[0] and second[1] == first[1]  # restarted, reloaded
    os.kill(second[1], signal.SIGSTOP)
    assert pool.score(prompts, responses) == pytest.approx(want, abs=1e-5)
    assert pool.stats["timeouts"] >= 1 and pool.pids()[1] != second[1]


def check_served_models_score_and_filter_samples(pool, path: str, pairs: list, tmp_path
                                                 ) -> None:
    """rlhf.ppo's reward.models as the rollout side scores samples: two served models
    (`pool`, and this model with its head negated, so they disagree by exactly twice the
    score), combined by their minimum (WCO) with weight 2, each model's score, the
    combined one and the disagreement kept in the record; then reward.min_score leaves
    the samples under it out of the loss, and drops (counted) a prompt with none left.
    A one-replica model whose replica is killed scores again once Ray has restarted it;
    one that hangs with no retry left ends with the error naming the fix."""
    import json
    import os
    import shutil
    import signal
    from collections import Counter

    import torch
    from transformers import AutoModelForSequenceClassification

    from cluster.models import load_tokenizer
    from cluster.reward_service import start_reward_pool
    from cluster.scoring import RewardScorer
    from rlhf.config import ConfigError, PPOConfig, parse_args
    from rlhf.core.rewards import RewardError
    from rlhf.online.episodes import DROP_OUTSIDE, DROP_UNIFORM, Episode, EpisodeRunner
    from rlhf.online.setup import start_reward_models

    negated = tmp_path / "negated"
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.score.weight.neg_()
    model.save_pretrained(negated)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{path}/{f}", negated / f)
    # a causal LM is no reward model; the negated one, with no rlhf_reward.json, is
    # another project's sequence-classification model: served all the same, it scores
    # the decoded text with its own tokenizer and limits
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"reward.models\[0\]=.*lm: not a reward model: "
                                          r"neither exported by rlhf.rm"):
        start_reward_models(parse_args(PPOConfig, [f"reward.models=[{lm}]"], "rlhf.ppo"))
    cfg = parse_args(PPOConfig, [f"reward.models=[{path},{negated}]", "reward.ensemble=min",
                                 "reward.models_weight=2", "reward.functions=[]",
                                 "reward.cpus_per_replica=0.5"], "rlhf.ppo")
    neg_pool = start_reward_pool(str(negated), num_cpus=0.5, timeout_s=3, retries=0)
    pools = [pool, neg_pool]
    try:
        tok = load_tokenizer(path)
        eps = [Episode(0, i // 2, i % 2, tok(p, add_special_tokens=False)["input_ids"], "{}",
                       response_ids=ids, logprobs=[0.0] * len(ids), versions=[0] * len(ids),
                       loss_mask=[1] * len(ids))
               for i, (p, r) in enumerate(pairs)
               for ids in [tok(r, add_special_tokens=False)["input_ids"]]]
        runner = EpisodeRunner(cfg, None, tok, pools)
        scored, failed = runner.score(eps, train=True)
        recs = [rec for _, rec in scored]
        s0 = RewardScorer(path).score([tok.decode(e.prompt_ids) for e in eps],
                                      [tok.decode(e.response_ids, skip_special_tokens=True)
                                       for e in eps])
        assert not failed and len(set(s0)) == len(s0)
        assert [r.parts["rm0"] for r in recs] == pytest.approx(s0, abs=1e-5)
        assert [r.parts["rm1"] for r in recs] == pytest.approx([-x for x in s0], abs=1e-5)
        assert [r.parts["ensemble"] for r in recs] == pytest.approx(
            [-abs(x) for x in s0], abs=1e-5)
        assert [r.parts["ensemble_std"] for r in recs] == pytest.approx(
            [abs(x) for x in s0], abs=1e-5)
        assert [r.score for r in recs] == pytest.approx([-2 * abs(x) for x in s0], abs=1e-5)
        # the threshold between the scores: about half the samples fall under it
        cut = sorted(r.score for r in recs)[len(recs) // 2] - 1e-9
        cfg.reward.min_score = cut
        counts, stats = Counter(), Counter()
        kept = runner.filter(scored, [], counts, stats)
        under = [r.score < cut for r in recs]
        empty = {r.group for r in recs} - {r.group for r, u in zip(recs, under) if not u}
        assert stats["outside_thresholds"] == sum(under) > 0
        assert counts[DROP_OUTSIDE] == len(empty)
        assert sorted(g[0].group for _, g in kept) == sorted({r.group for r in recs} - empty)
        for _, group in kept:
            for r in group:
                assert (sum(r.loss_mask) == 0) == (r.score < cut)
        json.dumps(recs[0].parts)  # the record's parts go to the ledger as they are
        # dynamic sampling on the models' scores (a reward model could not feed it when
        # it scored on the trainers): prompt 0's second sample made the same as its
        # first scores the same, so the group carries no signal and is dropped
        cfg.reward.min_score, cfg.algo.dynamic_sampling = None, True
        twin = list(eps)
        twin[1] = Episode(**{**eps[0].__dict__, "sample": 1})
        counts = Counter()
        kept = runner.filter(*runner.score(twin, train=True), counts, Counter())
        assert counts == {DROP_UNIFORM: 1} and len(kept) == len({e.group for e in eps}) - 1
        cfg.algo.dynamic_sampling = False
        # its only replica killed: the batch waits for Ray to bring it back (a replica
        # found restarting spends no retry), then scores as before
        neg_pool.timeout_s, neg_pool.retries = 120, 2
        os.kill(neg_pool.pids()[0], signal.SIGKILL)
        again = [rec for _, rec in runner.score(eps, train=True)[0]]
        assert [r.parts["rm1"] for r in again] == pytest.approx([-x for x in s0], abs=1e-5)
        neg_pool.timeout_s, neg_pool.retries = 3, 0
        os.kill(neg_pool.pids()[0], signal.SIGSTOP)
        with pytest.raises(RewardError, match=r"negated: a batch of 8 samples failed 1 times "
                                              r"\(no answer in 3 s\).*raise reward.timeout_s"):
            runner.score(eps, train=True)
    finally:
        neg_pool.close()
