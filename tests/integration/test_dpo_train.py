"""End-to-end DPO runs on local Ray: the run directory, learning, epochs, a worker lost
mid-run, the export (its own held-out metrics are the reported ones), LoRA merged and
adapter-only. ZeRO-3 with offload is checked against ZeRO-2 in test_dpo_invariance."""

import json
import math
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import dpo, metrics, summary


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


SECRETS = {"WANDB_API_KEY": "wandb-secret-7f3a9c", "HF_TOKEN": "hf_secret_52b1e0",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-c4d8e2"}


def _held_out_metrics(model, ref, tok, n: int = 32, beta: float = 0.1) -> dict:
    """DPO's held-out metrics of `model` against `ref` through plain transformers, one
    padded pair at a time: the demo's held-out pairs, tokenised as the pipeline does."""
    from rlhf.config import DataConfig
    from rlhf.data.pipeline import tokenize_pair
    from rlhf.data.demo import demo_pair
    from rlhf.core.logprobs import pad_pairs, sequence_logprobs

    d = DataConfig()
    acc = margin = logp_chosen = 0.0
    for i in range(n):
        p = demo_pair(i, "eval")
        ids = tokenize_pair(tok, p["prompt"], p["chosen"], p["rejected"], False,
                            d.max_length, d.max_prompt_length, d.truncation)
        b = pad_pairs([ids[0]], [ids[1]], [ids[2]], tok.pad_token_id)
        with torch.no_grad():
            pol, rf = (sequence_logprobs(m(input_ids=b["input_ids"],
                                           attention_mask=b["attention_mask"]).logits,
                                         b["input_ids"], b["loss_mask"])[0]
                       for m in (model, ref))
        rc, rr = beta * (pol[0] - rf[0]).item(), beta * (pol[1] - rf[1]).item()
        acc += float(rc > rr)
        margin += rc - rr
        logp_chosen += pol[0].item()
    return {"accuracy": acc / n, "margin": margin / n, "logps/chosen": logp_chosen / n}


def test_run_directory_learning_epochs_and_a_lost_worker(ray_cluster, tmp_path,
                                                         tiny_model_path, monkeypatch,
                                                         capfd):
    """One ZeRO-2 run of 48 pairs x 2 epochs (12 steps), checkpointed every 4 steps; the
    last worker dies hard after step 6 (the end of epoch 1) and Ray Train restarts the
    group from the step-4 checkpoint. (Merged: the run-directory, two-epoch and
    worker-crash tests of earlier suites.)"""
    for k, v in SECRETS.items():  # credentials in the environment, as on a cluster node
        monkeypatch.setenv(k, v)
    run_dir = dpo(tmp_path, "cluster.zero_stage=2", "data.demo_pairs=48", "train.epochs=2",
                  "train.checkpoint_every=4", "cluster.max_failures=1", crash_once_at_step=6)
    # ... are never written to the run directory (config, metrics, checkpoints) or output
    printed = capfd.readouterr()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("checkpoints" in p.parts for p in files)
    for f in files:
        data = f.read_bytes()
        assert not any(v.encode() in data for v in SECRETS.values()), f
    assert not any(v in printed.out + printed.err for v in SECRETS.values())
    # as the worker built it (a Ray Train worker's line reaches the driver on both
    # streams; the console shows the first to arrive)
    assert "reference model: a frozen copy of" in printed.out + printed.err
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model/model.safetensors",
                 "model/tokenizer.json", "model/config.json", "curves.png"):
        assert (run_dir / name).is_file(), name
    # the export carries the base's generation config and a model card
    assert ((run_dir / "model" / "generation_config.json").read_text()
            == (Path(tiny_model_path) / "generation_config.json").read_text())
    card = (run_dir / "model" / "README.md").read_text()
    s = json.loads((run_dir / "summary.json").read_text())
    for text in ("base_model: builtin:tiny-llama", "DPO (direct preference optimisation)",
                 f"train: {s['data']['train']['rows']} rows read",
                 f"| eval/rewards/accuracy | {s['eval/rewards/accuracy']:.4g} |",
                 "python -m rlhf.dpo --config config.yaml", "beta: 0.1"):
        assert text in card, text

    # the crash: steps 5-6 redone from the step-4 state
    assert (run_dir / ".crash-injected").read_text() == "6"
    rows = metrics(run_dir)
    train = [r for r in rows if "train/loss" in r]
    # Rank 0 logs step 5, then waits for the dead rank inside step 6's metric reduction;
    # the restarted group resumes after step 4.
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5] + list(range(5, 13))
    # TensorBoard holds the same losses, step for step (float32), redone steps included
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), purge_orphaned_data=False)
    events.Reload()
    tb = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in tb] == [r["step"] for r in train]
    assert [v for _, v in tb] == pytest.approx([r["train/loss"] for r in train], rel=1e-6)
    by_step = {r["step"]: r for r in train}  # the last record of a redone step wins
    for key in ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/margin",
                "train/rewards/accuracy", "train/logps/chosen", "train/logps/rejected",
                "train/grad_norm", "train/learning_rate", "train/tokens_per_s", "train/samples"):
        assert key in train[0], key
    assert [by_step[i]["train/epoch"] for i in range(1, 13)] == [1] * 6 + [2] * 6
    evals = [r for r in rows if "eval/rewards/accuracy" in r]
    assert [r["step"] for r in evals] == [6, 12]
    s = summary(run_dir)
    assert s["samples"] == 96 and s["steps"] == 12 and s["eval/pairs"] == 32
    assert s["pairs_left_out_by_split"] == 0  # every pair twice, none skipped or repeated
    assert s["data"]["train"] == {"rows": 48, "usable": 48, "dropped": {}}
    assert s["counts"]["prompt truncated"] == 0
    assert s["eval/rewards/accuracy"] > 0.6, s  # learning, not just motion
    assert by_step[12]["train/loss"] < by_step[1]["train/loss"]

    # The export is the trained model: through plain transformers its held-out metrics
    # against the base are the ones the run reported, and it generates
    model, tok = _load(run_dir / "model")
    base, _ = _load(tiny_model_path)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))
    mine = _held_out_metrics(model.eval(), base.eval(), tok)
    assert mine["accuracy"] == s["eval/rewards/accuracy"]
    assert mine["margin"] == pytest.approx(s["eval/rewards/margin"], abs=1e-4)
    assert mine["logps/chosen"] == pytest.approx(s["eval/logps/chosen"], rel=1e-5)
    prompt = tok("\n\nHuman: hi\n\nAssistant:", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert 1 <= len(new) <= 5 and (len(new) == 5 or new[-1] == tok.eos_token_id), new


def test_lora_bf16_merged_export(ray_cluster, tmp_path, tiny_model_path):
    """bf16 weights, bf16 adapters, DeepSpeed bf16, gradient checkpointing: one dtype."""
    run_dir = dpo(tmp_path, "model.lora.enabled=true", "model.lora.r=8", "model.dtype=bf16",
                  "model.gradient_checkpointing=true", "train.learning_rate=1e-2",
                  "train.max_steps=4")
    model, _ = _load(run_dir / "model")
    assert model.dtype == torch.bfloat16
    base, _ = _load(tiny_model_path)
    base = base.to(torch.bfloat16)
    names = [n for n, _ in model.named_parameters()]
    assert not any("lora" in n for n in names)
    changed = {n for (n, a), b in zip(model.named_parameters(), base.parameters())
               if not torch.equal(a, b)}
    assert changed and all(any(m in n for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
                           for n in changed), changed
    # step 1: the adapters start at zero, so the policy is the reference exactly
    first = next(r for r in metrics(run_dir) if "train/loss" in r)
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_orpo_lora_zero3_adapter_only_export(ray_cluster, tmp_path, tiny_model_path, capfd):
    """ORPO (reference-free: NLL + lambda x odds-ratio term) with LoRA under ZeRO-3, the
    adapter exported alone and evaluated. The workers say they built no reference, not
    even the policy with its adapters off (checked where it is built, not assumed from
    the config), and no reference forward is timed."""
    from peft import PeftModel

    run_dir = dpo(tmp_path, "loss.type=orpo", "model.lora.enabled=true",
                  "model.lora.merge_on_export=false", "cluster.zero_stage=3",
                  "train.learning_rate=1e-2", "train.max_steps=4")
    out = "".join(capfd.readouterr())
    assert "reference model: none (loss.type=orpo needs none)" in out
    assert "adapters off" not in out and "frozen copy" not in out
    train = [r for r in metrics(run_dir) if "train/loss" in r]
    assert len(train) == 4 and not any("time/reference_s" in r for r in train)
    # the loss as trained (NLL + lambda x odds-ratio term) and the chosen NLL fall
    first, last = train[0], train[-1]
    assert last["train/nll"] < first["train/nll"] and last["train/loss"] < first["train/loss"]
    assert first["train/loss"] > first["train/nll"]  # the NLL is in the reported loss
    assert (run_dir / "model" / "adapter_model.safetensors").is_file()
    base, _ = _load(tiny_model_path)
    peft_model = PeftModel.from_pretrained(base, run_dir / "model")
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained (B starts at 0)
    # rlhf.evaluate takes the adapter as the aligned model: merged into its base's
    # weights for the engine (the base then reloaded into it in place). Same seeds for
    # both: a KL of exactly 0 would mean the adapter was not applied.
    from rlhf.evaluate import main

    assert main([f"run={run_dir}", f"output.dir={tmp_path}", "output.name=ev",
                 "data.max_prompts=8", "generation.max_new_tokens=16"]) == 0
    r = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert r["aligned"] == str((run_dir / "model").resolve())
    assert r["adapter_merged"] and r["engines"] == {"started": 1, "reloaded": 1}
    s = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert len(s) == 8 and r["kl"]["per_response"] != 0
    assert any(x["aligned"] != x["base"] for x in s)
