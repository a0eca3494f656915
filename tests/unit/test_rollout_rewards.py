"""The rollout side's rewards without engines (EpisodeRunner.score and .filter on made-up
episodes): reward.remote_url against a real HTTP server on 127.0.0.1 (started here, in
a thread): batches, the token from the environment, retries after a 5xx and a hang,
malformed answers skipped (counted) or stopping the run, a refused token stopping it at
once, secrets never shown; the endpoint as one source beside a rule, normalised per
prompt before the sum, a gold reward kept out of it, the groups the endpoint left
unscored dropped and counted; online rejection sampling's choice of the best sample."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf.core.rewards import RewardError
from rlhf.online.remote_reward import RemoteReward

TOKEN = "s3cret-token-for-tests"


class Handler(BaseHTTPRequestHandler):
    """/ok: score = len(response); /flaky: HTTP 503 on every other request; /hang: no
    answer for 2 s; /malformed: not JSON; /short: one score too few; /nan: a NaN score;
    anything asked without the token: 401."""

    calls: Counter = Counter()
    seen: list = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.calls[self.path] += 1
        Handler.seen.append((self.path, self.headers.get("Authorization"), body))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(401, b"{}")
        if self.path == "/flaky" and Handler.calls[self.path] % 2:
            return self._send(503, b"busy")
        if self.path == "/hang":
            time.sleep(2)
        scores = [float(len(r)) for r in body["responses"]]
        answer = {"/malformed": b"<html>oops</html>",
                  "/short": json.dumps({"scores": scores[:-1]}).encode(),
                  "/nan": json.dumps({"scores": scores[:-1] + ["NaN"]}).encode()}
        self._send(200, answer.get(self.path, json.dumps({"scores": scores}).encode()))

    def _send(self, code: int, data: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except BrokenPipeError:  # the client gave up on a hang, as it should
            pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("TEST_REWARD_TOKEN", TOKEN)


def remote(url: str, **kw) -> RemoteReward:
    return RemoteReward(url, auth_env="TEST_REWARD_TOKEN", **{"batch_size": 2, "timeout_s": 1,
                                                               "retries": 1, **kw})


RESPONSES = ["a", "bb", "ccc", "dddd", "eeeee"]
PROMPTS = ["p"] * 5


def test_batches_token_and_retries(server, token):
    Handler.seen.clear()
    r = remote(f"{server}/ok")
    assert r(PROMPTS, RESPONSES, [{"i": i} for i in range(5)]) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert r.stats["requests"] == 3 and not r.stats["retried"]  # batches of 2, 2, 1
    bodies = sorted((b for _, _, b in Handler.seen), key=lambda b: b["responses"][0])
    assert bodies[0] == {"prompts": ["p", "p"], "responses": ["a", "bb"],
                         "metadata": [{"i": 0}, {"i": 1}]}
    assert {auth for _, auth, _ in Handler.seen} == {f"Bearer {TOKEN}"}
    # a 503 on every other request: each batch answered on its second try
    flaky = remote(f"{server}/flaky", concurrency=1)
    assert flaky(PROMPTS, RESPONSES) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert flaky.stats["retried"] >= 1


def test_hangs_and_malformed_answers_are_skipped_or_stop_the_run(server, token):
    hang = remote(f"{server}/hang", batch_size=5, timeout_s=0.3)
    got = hang(PROMPTS, RESPONSES)
    assert all(math.isnan(x) for x in got)  # both tries timed out: skipped, counted
    assert hang.stats["timeouts"] == 2 and hang.stats["skipped_samples"] == 5
    for path, why in (("/malformed", r"answered '<html>oops</html>', not \{\"scores\""),
                      ("/short", "answered 1 scores for 2 responses"),
                      ("/nan", "with a non-finite one")):
        skip = remote(f"{server}{path}")
        assert all(math.isnan(x) for x in skip(PROMPTS[:2], RESPONSES[:2]))
        assert skip.stats["malformed"] == 1 and not skip.stats["retried"]  # not asked again
        with pytest.raises(RewardError, match=why + r".*reward.remote_errors=skip"):
            remote(f"{server}{path}", errors="stop")(PROMPTS[:2], RESPONSES[:2])
    with pytest.raises(RewardError, match=r"no answer in 0.3 s.*raise reward.timeout_s"):
        remote(f"{server}/hang", timeout_s=0.3, retries=0, errors="stop")(["p"], ["a"])


def test_a_refused_token_stops_at_once_and_credentials_stay_hidden(server, monkeypatch):
    monkeypatch.setenv("TEST_REWARD_TOKEN", "wrong-token-value")
    url = f"{server}/ok?api_key=pa55word"  # a key in the URL is redacted like the token
    r = remote(url)
    with pytest.raises(RewardError) as e:
        r(["p"], ["a"])
    msg = str(e.value)
    assert "HTTP 401" in msg and "$TEST_REWARD_TOKEN" in msg
    assert "pa55word" not in msg and "wrong-token-value" not in msg
    assert r.stats["requests"] == 1  # a client error is not retried


def test_the_rollout_side_sums_normalised_sources_and_drops_unscored_groups(
        server, token, tiny_model_path, monkeypatch):
    """Two prompts x 2 samples scored by a 0/1 rule and the endpoint (len(response)),
    each normalised within its prompt's samples (reward.aggregation=normalise_then_sum),
    weights 1 and 0.5; a gold function scored beside them, not in the sum. Then the
    endpoint fails: every group is dropped and counted."""
    import sys
    import types

    from rlhf.config import PPOConfig, parse_args
    from rlhf.online.episodes import DROP_UNSCORED, EpisodeRunner

    m = types.ModuleType("remote_test_rewards")
    m.has_x = lambda p, r, meta: [float("x" in x) for x in r]
    m.gold = lambda p, r, meta: [-1.0 * len(x) for x in r]
    monkeypatch.setitem(sys.modules, "remote_test_rewards", m)
    cfg = parse_args(PPOConfig, [
        f"model.name_or_path={tiny_model_path}", "reward.functions=[remote_test_rewards:has_x]",
        f"reward.remote_url={server}/ok", "reward.remote_weight=0.5",
        "reward.remote_auth_env=TEST_REWARD_TOKEN", "reward.aggregation=normalise_then_sum",
        "reward.gold=remote_test_rewards:gold", "rollout.samples_per_prompt=2"], "rlhf.ppo")
    texts = ["x", "yy", "x yy", "z"]  # prompt 0: "x", "yy"; prompt 1: "x yy", "z"
    tok, episodes = made_up_episodes(tiny_model_path, texts, 2)
    runner = EpisodeRunner(cfg, None, tok)
    scored, failed = runner.score(episodes(), train=True)
    recs = [rec for _, rec in scored]
    lengths = [len(tok.decode(r.response_ids, skip_special_tokens=True)) for r in recs]
    assert [r.parts["remote"] for r in recs] == lengths
    assert [r.parts["gold"] for r in recs] == [-x for x in lengths]
    # within each prompt: the rule [1, 0] -> [1, -1]; the endpoint's two lengths -> +-1
    # by which is longer
    sign = [1 if lengths[i] > lengths[i ^ 1] else -1 for i in range(4)]
    rule = [1, -1, 1, -1]
    assert [r.score for r in recs] == pytest.approx(
        [rule[i] + 0.5 * sign[i] for i in range(4)], abs=1e-6)
    counts, stats = Counter(), Counter()
    assert len(runner.filter(scored, failed, counts, stats)) == 2
    runner.remote.url = f"{server}/malformed"
    scored, failed = runner.score(episodes(), train=True)
    assert runner.filter(scored, failed, counts, stats) == []
    assert counts == {DROP_UNSCORED: 2}


def made_up_episodes(model_path: str, texts: list[str], n: int):
    """(the tokenizer, a function making fresh episodes of `texts`: prompt i // n's
    sample i % n, as generated)."""
    from cluster.models import load_tokenizer
    from rlhf.online.episodes import Episode

    tok = load_tokenizer(model_path)

    def episodes():
        return [Episode(0, i // n, i % n, [1, 2], "{}", response_ids=ids,
                        logprobs=[0.0] * len(ids), versions=[0] * len(ids),
                        loss_mask=[1] * len(ids))
                for i, t in enumerate(texts) for ids in [tok(t, add_special_tokens=False)
                                                         ["input_ids"]]]
    return tok, episodes


def test_rejection_sampling_keeps_each_prompts_best_sample_above_the_threshold(
        tiny_model_path, monkeypatch):
    """algo.algorithm=rejection, reward = the number of x's, reward.min_score=1, 3
    samples per prompt: prompt 0 keeps "xx" (its best), prompt 1 the first of its two
    equal bests, prompt 2 (no x at all) is below the threshold and dropped."""
    import sys
    import types

    from rlhf.config import PPOConfig, parse_args
    from rlhf.online.episodes import DROP_OUTSIDE, EpisodeRunner

    m = types.ModuleType("rejection_test_rewards")
    m.xs = lambda p, r, meta: [float(x.count("x")) for x in r]
    monkeypatch.setitem(sys.modules, "rejection_test_rewards", m)
    cfg = parse_args(PPOConfig, [
        f"model.name_or_path={tiny_model_path}", "reward.functions=[rejection_test_rewards:xs]",
        "algo.algorithm=rejection", "reward.min_score=1", "rollout.samples_per_prompt=3"],
        "rlhf.ppo")
    texts = ["x", "xx", "y", "x a", "y", "x b", "y", "z", "w"]
    tok, episodes = made_up_episodes(tiny_model_path, texts, 3)
    runner = EpisodeRunner(cfg, None, tok)
    counts, stats = Counter(), Counter()
    kept = runner.filter(*runner.score(episodes(), train=True), counts, stats)
    assert [(g[0].group, g[0].sample) for _, g in kept] == [(0, 1), (1, 0)]
    assert all(len(g) == 1 and all(g[0].loss_mask) for _, g in kept)
    assert counts == {DROP_OUTSIDE: 1} and stats["rejected"] == 4


def test_the_pairwise_judge_reads_both_orders_of_a_tiny_model(tiny_model_path):
    """The judge's P(a better than b) is, by hand, the mean over the two orders of the
    letters' renormalised probabilities, each letter's log-prob taken from a plain
    forward of the whole question; so P(a > b) + P(b > a) = 1 and P(a > a) = 1/2."""
    import torch
    from transformers import AutoModelForCausalLM

    from cluster.judge_service import PairwiseJudge
    from rlhf.data.judge_question import judge_prompt

    judge = PairwiseJudge(tiny_model_path, batch_size=3)  # batches cut across questions
    prompts, a, b = ["Say hi.", "Count to 3."], ["Hi!", "1 2 3"], ["Go away.", "1 2"]
    got = judge.prefer(prompts, a, b)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()

    def letter_lp(seq: list[int], other: list[int]) -> float:
        start = next(i for i, (x, y) in enumerate(zip(seq, other)) if x != y)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        return sum(float(lp[t - 1, seq[t]]) for t in range(start, len(seq)))

    def p_first(x: str, y: str, p: str) -> float:  # the renormalised p(A) with x as A
        with_a, with_b = judge_prompt(judge.tok, p, x, y, False, 1024)
        la, lb = letter_lp(with_a, with_b), letter_lp(with_b, with_a)
        return 1 / (1 + math.exp(lb - la))

    want = [0.5 * (p_first(x, y, p) + 1 - p_first(y, x, p)) for p, x, y in zip(prompts, a, b)]
    assert got == pytest.approx(want, abs=1e-5)
    back = judge.prefer(prompts, b, a)
    assert [g + k for g, k in zip(got, back)] == pytest.approx([1.0, 1.0], abs=1e-9)
    assert judge.score(prompts[:1], [(a[0], a[0])]) == pytest.approx([0.5], abs=1e-9)


@pytest.mark.parametrize("pairs,gap,want,dropped", [
    # reward = the number of x's: prompt 0 scores [1, 2, 0], prompt 1 [1, 0, 1], prompt
    # 2 [0, 0, 0] (no pair: dropped)
    ("best_worst", 0.0, [[(1, 2)], [(0, 1)]], 1),
    ("best_worst", 1.5, [[(1, 2)]], 2),  # prompt 1's gap of 1 is too small
    ("all", 0.0, [[(1, 0), (0, 2), (1, 2)], [(0, 1), (2, 1)]], 1 + 3),
])
def test_online_dpo_makes_each_prompts_pairs(tiny_model_path, monkeypatch, pairs, gap, want,
                                             dropped):
    """algo.algorithm=online_dpo: each prompt's samples as consecutive (chosen, rejected)
    records, ties never paired, a prompt with no pair dropped and counted; the pairs
    not made are counted per step (1 per prompt for best_worst, 3 for all with 3
    samples, less those made)."""
    import sys
    import types

    from rlhf.config import PPOConfig, parse_args
    from rlhf.online.episodes import DROP_NO_PAIR, EpisodeRunner

    m = types.ModuleType("pair_test_rewards")
    m.xs = lambda p, r, meta: [float(x.count("x")) for x in r]
    monkeypatch.setitem(sys.modules, "pair_test_rewards", m)
    cfg = parse_args(PPOConfig, [
        f"model.name_or_path={tiny_model_path}", "reward.functions=[pair_test_rewards:xs]",
        "algo.algorithm=online_dpo", f"algo.pairs={pairs}", f"algo.min_pair_gap={gap}",
        "rollout.samples_per_prompt=3"], "rlhf.ppo")
    tok, episodes = made_up_episodes(tiny_model_path, ["x", "xx", "y", "x a", "y", "x b",
                                                       "y", "z", "w"], 3)
    runner = EpisodeRunner(cfg, None, tok)
    counts, stats = Counter(), Counter()
    kept = runner.filter(*runner.score(episodes(), train=True), counts, stats)
    got = [[(g[i].sample, g[i + 1].sample) for i in range(0, len(g), 2)] for _, g in kept]
    assert got == want
    assert all([r.role for r in g] == ["chosen", "rejected"] * (len(g) // 2) for _, g in kept)
    assert all(g[i].score > g[i + 1].score for _, g in kept for i in range(0, len(g), 2))
    assert counts == {DROP_NO_PAIR: 3 - len(want)}
    assert stats["pairs"] == sum(map(len, want)) and stats["pairs_dropped"] == dropped
    assert (stats["paired_groups_reward"], stats["paired_groups_samples"]) == (5, 9)
