"""DPO throughput, this project vs TRL 1.16's DPOTrainer, side by side in one invocation.

Same machine, same model config (Llama: hidden 512, 8 layers, 8 heads, vocab ~4096,
random init, built here), the same hh-rlhf pairs from ../shared/data/hh-rlhf, the same
batch of 8 pairs, max_length 256, fp32, the same number of measured steps after a
warm-up. Each trainer runs in its own process, so peak memory is its own.

    .venv/bin/python bench/dpo_vs_trl.py                    # ~6 min on 2 cores
    .venv/bin/python bench/dpo_vs_trl.py --record           # also append to bench/RESULTS.md
    .venv/bin/python bench/dpo_vs_trl.py --gpu --record     # GPU machine (make setup EXTRA=gpu)
    .venv/bin/python bench/dpo_vs_trl.py --objectives --record   # + KTO against TRL's
        # KTOTrainer on the same pairs split in two, and ORPO, CPO, SimPO (no reference
        # model) beside DPO: ~12 min on 2 cores
    .venv/bin/python bench/dpo_vs_trl.py --kto-only --record     # just the KTO rows

Prints, for both: real (non-pad) tokens/s (prompt+chosen and prompt+rejected, what
TRL runs less its padding: the ratio is the ratio of pairs/s), s/step, peak resident
memory per training process, useful FLOP/s as a share of a 2048x2048 fp32 matmul
measured in the same run, and the ratios. Useful FLOPs are the work a pair needs:
8 x non-embedding parameters (policy forward and backward, reference forward; 6 x when
the reference ran before the measured steps) x its tokens counted once each
(prompt + chosen + rejected); padding and a second pass over the prompt are not useful.
KTO's examples (a pair split in two, each prompt + one completion) need 12 x parameters
per token: policy forward and backward, reference forward, and both forwards again on
the mismatched completion that estimates the KL point (8 where the reference's forwards
ran before the measured steps); the reference-free objectives 6.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
MODEL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8)
# --gpu: a Qwen2-0.5B-shaped model (its vocabulary size too; token ids above the BPE's
# own vocabulary are simply never used), bf16, max_length 2048, one GPU per trainer.
GPU_MODEL = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)


def build_model(out: Path, vocab: int = 4096, shape: dict | None = None) -> None:
    """Random-init Llama + byte-level BPE trained on the hh-rlhf text itself."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(x)["chosen"] for x in gzip.open(HH, "rt")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|pad|>", "<|eos|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>",
                                  eos_token="<|eos|>")
    torch.manual_seed(0)
    shape = dict(shape or MODEL)
    shape.setdefault("vocab_size", len(tok))
    model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False,
                                         pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, **shape))
    model.save_pretrained(out)
    tok.save_pretrained(out)


def write_pairs(out: Path, n: int) -> None:
    rows = [x for x in gzip.open(HH, "rt")][: n + 16]
    (out / "train.jsonl").write_text("".join(rows[:n]))
    (out / "eval.jsonl").write_text("".join(rows[n:]))


def write_unpaired(out: Path) -> None:
    """The same pairs in TRL's unpaired format (prompt, completion, label), each split into
    its chosen (desirable) and rejected (undesirable) response, for both KTO trainers."""
    from trl.data_utils import extract_prompt

    for name in ("train", "eval"):
        lines = []
        for x in (out / f"{name}.jsonl").read_text().splitlines():
            p = extract_prompt(json.loads(x))
            lines += [json.dumps({"prompt": p["prompt"], "completion": p[side],
                                  "label": side == "chosen"}) for side in ("chosen", "rejected")]
        (out / f"{name}-unpaired.jsonl").write_text("\n".join(lines) + "\n")


def matmul_flops(seconds: float = 3.0, gpu: bool = False) -> float:
    """Best FLOP/s of a square matmul: 2048 fp32 on CPU, 8192 bf16 on a GPU."""
    import torch

    n = 8192 if gpu else 2048
    kw = {"device": "cuda", "dtype": torch.bfloat16} if gpu else {}
    a, b = torch.randn(n, n, **kw), torch.randn(n, n, **kw)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, t_end = 0.0, time.time() + seconds
    while time.time() < t_end:
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        sync()
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def useful_params(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for p in m.parameters()) - m.get_input_embeddings().weight.numel()


# ------------------------------------------------------------------------------- TRL


def trl_child(model_dir: str, data_dir: str, steps: int, warmup: int, batch: int,
              gpu: bool = False, kto: bool = False) -> dict:
    """TRL's DPOTrainer on `batch` pairs a step, or (kto) its KTOTrainer on the same pairs
    split in two (2 x batch examples a step)."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1",
                      WANDB_DISABLED="true")
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = f"{data_dir}/train-unpaired.jsonl" if kto else f"{data_dir}/train.jsonl"
    ds = load_dataset("json", data_files=data, split="train")
    Config, Trainer = (KTOConfig, KTOTrainer) if kto else (DPOConfig, DPOTrainer)
    args = Config(output_dir=tempfile.mkdtemp(),
                  per_device_train_batch_size=2 * batch if kto else batch,
                  max_length=2048 if gpu else 256, bf16=gpu, fp16=False, use_cpu=not gpu,
                  gradient_checkpointing=False, report_to="none", max_steps=steps + warmup,
                  save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                  dataloader_num_workers=0, dataloader_pin_memory=False, seed=0,
                  learning_rate=5e-7)
    dtype = "bfloat16" if gpu else "float32"
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
                      ref_model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
                      args=args, train_dataset=ds, processing_class=tok)
    real_tokens: list[int] = []
    collate = trainer.data_collator

    def counting_collator(features):
        out = collate(features)
        real = int(out["attention_mask"].sum())
        if kto:  # one sequence per example: each prompt once
            real_tokens.append((real, real))
            return out
        prompts = real - int(out["completion_mask"].sum())  # every prompt twice
        real_tokens.append((real, real - prompts // 2))
        return out

    trainer.data_collator = counting_collator
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if gpu:
                import torch

                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Clock())
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if gpu:
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**20
    kept = real_tokens[warmup:len(times)]
    return {"step_s": times[warmup:], "tokens": [a for a, _ in kept],
            "unique_tokens": [b for _, b in kept], "peak_rss_mb": peak}


def run_trl(model_dir: Path, data_dir: Path, a, kto: bool = False) -> dict:
    out = subprocess.run([sys.executable, __file__, "--trl-child", str(model_dir),
                          str(data_dir), str(a.steps), str(a.warmup), str(a.batch),
                          "gpu" if a.gpu else "cpu", "kto" if kto else "dpo"],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"TRL run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- ours


def run_ours(model_dir: Path, data_dir: Path, a, extra: list[str], workers: int = 1,
             kto: bool = False) -> dict:
    """CPU: `workers` Ray Train workers sharing the machine's cores (TRL gets them all in
    one process); GPU: one worker on one GPU. kto: rlhf.kto on the unpaired file (2 x
    batch examples a step), else rlhf.dpo on the pairs."""
    runs = Path(tempfile.mkdtemp())
    cpus = max(1, (os.cpu_count() or 2) // workers)
    # One worker has nothing to shard: ZeRO-0 skips ZeRO-2's gradient and parameter
    # partition copies (~0.15 s a step here). Two workers keep the default ZeRO-2.
    stage = 0 if workers == 1 else 2
    rows = 2 * a.batch if kto else a.batch
    suffix = "-unpaired" if kto else ""
    cmd = [sys.executable, "-m", "rlhf.kto" if kto else "rlhf.dpo",
           f"model.name_or_path={model_dir}", f"data.path={data_dir / f'train{suffix}.jsonl'}",
           f"data.eval_path={data_dir / f'eval{suffix}.jsonl'}",
           *(["data.max_length=2048", "data.max_prompt_length=1024", "model.dtype=bf16",
              "cluster.use_gpu=true", "cluster.num_workers=1",
              f"train.micro_batch_size={rows}"]
             + ["cluster.reference_gpus_per_actor=0.2"]
             if a.gpu else
             ["data.max_length=256", "data.max_prompt_length=128",
              f"cluster.num_workers={workers}", f"cluster.cpus_per_worker={cpus}",
              f"cluster.zero_stage={stage}",
              f"train.micro_batch_size={rows // workers}"]),
           f"train.global_batch_size={rows}", f"train.max_steps={a.steps + a.warmup}",
           "train.eval_every=0", "train.checkpoint_every=0", "train.learning_rate=5e-7",
           f"output.dir={runs}", "output.name=bench", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise RuntimeError(f"our run failed:\n{out.stderr[-3000:]}")
    log = [json.loads(x) for x in (runs / "bench" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in log if "train/step_time_s" in r][a.warmup:]
    return {"step_s": [r["train/step_time_s"] for r in train],
            "tokens": [r["train/tokens_per_s"] * r["train/step_time_s"] for r in train],
            "unique_tokens": [r["train/unique_tokens_per_s"] * r["train/step_time_s"]
                              for r in train],
            "peak_rss_mb": max(r["train/peak_rss_mb"] for r in train)}


# ----------------------------------------------------------------------------- report


def summarise(name: str, r: dict, params: int, ceiling: float, per_token: int = 8) -> dict:
    """per_token: 6 (policy forward + backward) + 2 (reference forward) FLOPs per
    parameter and token, or 6 where the reference ran before the measured steps."""
    step = statistics.median(r["step_s"])
    tok_s = sum(r["tokens"]) / sum(r["step_s"])
    flops = per_token * params * sum(r["unique_tokens"]) / sum(r["step_s"])
    return {"name": name, "s_per_step": step, "tokens_per_s": tok_s,
            "peak_rss_mb": r["peak_rss_mb"], "flops": flops, "mfu": flops / ceiling}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-child":
        _, _, model_dir, data_dir, steps, warmup, batch, device, kind = sys.argv
        print(json.dumps(trl_child(model_dir, data_dir, int(steps), int(warmup), int(batch),
                                   gpu=device == "gpu", kto=kind == "kto")))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="measured steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps not measured")
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    ap.add_argument("--gpu", action="store_true",
                    help="GPU comparison: Qwen2-0.5B-shaped model, bf16, max_length 2048, "
                         "one GPU each (peak memory column = peak GPU memory)")
    ap.add_argument("--objectives", action="store_true",
                    help="also KTO against TRL's KTOTrainer (the pairs split in two) and "
                         "ORPO, CPO, SimPO (no reference model) beside DPO")
    ap.add_argument("--kto-only", action="store_true",
                    help="only KTO against TRL's KTOTrainer (the pairs split in two)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    build_model(work / "model", shape=GPU_MODEL if a.gpu else MODEL)
    write_pairs(work, (a.steps + a.warmup) * a.batch)
    write_unpaired(work)
    params = useful_params(work / "model")
    ceiling = matmul_flops(gpu=a.gpu)
    print(f"model: {params / 1e6:.1f}M non-embedding parameters; matmul ceiling "
          f"{ceiling / 1e9:.0f} GFLOP/s", flush=True)
    m, pre = work / "model", ["loss.precompute_reference=true"]
    results = [] if a.kto_only else [
        summarise("TRL 1.16 DPOTrainer", run_trl(m, work, a), params, ceiling),
        summarise("rlhf.dpo (packing)", run_ours(m, work, a, []), params, ceiling),
        summarise("rlhf.dpo (packing, precomputed reference)", run_ours(m, work, a, pre),
                  params, ceiling, per_token=6),
    ]
    if not a.gpu and not a.objectives and not a.kto_only:  # data parallel on one machine
        results.append(summarise("rlhf.dpo (packing), 2 workers x 1 CPU, ZeRO-2",
                                 run_ours(m, work, a, [], workers=2), params, ceiling))
    for r in results:
        r.update(base="TRL", rss_vs="")
    if a.objectives or a.kto_only:
        kto_trl = summarise("TRL 1.16 KTOTrainer (pairs split in two)",
                            run_trl(m, work, a, kto=True), params, ceiling, per_token=12)
        kto_trl.update(base=kto_trl, rss_vs="")
        results.append(kto_trl)
        for name, extra, per_token in (("", [], 12), (", precomputed reference", pre, 8)):
            kto = summarise(f"rlhf.kto (packing{name}, same examples)",
                            run_ours(m, work, a, extra, kto=True), params, ceiling,
                            per_token=per_token)
            kto.update(base=kto_trl, rss_vs=f" ({kto['peak_rss_mb'] / kto_trl['peak_rss_mb']:.2f}x"
                       " TRL's)")
            results.append(kto)
    if a.objectives:
        dpo_rss = results[1]["peak_rss_mb"]
        for kind in ("orpo", "cpo", "simpo"):
            r = summarise(f"rlhf.dpo loss.type={kind} (no reference)",
                          run_ours(m, work, a, [f"loss.type={kind}"]), params, ceiling,
                          per_token=6)
            r.update(base="TRL", rss_vs=f" ({r['peak_rss_mb'] / dpo_rss:.2f}x rlhf.dpo's)")
            results.append(r)
    lines = ["| trainer | s/step | real tokens/s | vs TRL | peak RSS / process (MB) | "
             "useful FLOP/s | of matmul ceiling |", "|---|---|---|---|---|---|---|"]
    for r in results:
        base = results[0] if r["base"] == "TRL" else r["base"]  # KTO: TRL's KTOTrainer
        lines.append(f"| {r['name']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                     f"{r['peak_rss_mb']:.0f}{r['rss_vs']} | {r['flops'] / 1e9:.1f} G | "
                     f"{r['mfu']:.0%} |")
    table = "\n".join(lines)
    print(table)
    if a.record:
        device = f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
        if a.gpu:
            import torch

            device = f"{torch.cuda.get_device_name(0)}, {device}"
        head = (f"\n## {date.today()} - {platform.node() or 'machine'}: {device}\n\n"
                f"`.venv/bin/python bench/dpo_vs_trl.py {'--gpu ' if a.gpu else ''}"
                f"{'--objectives ' if a.objectives else ''}"
                f"{'--kto-only ' if a.kto_only else ''}--steps "
                f"{a.steps} --warmup {a.warmup} --batch {a.batch} --record`; {params / 1e6:.1f}M non-embedding "
                f"parameters, matmul ceiling {ceiling / 1e9:.0f} GFLOP/s.\n\n")
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(head + table + "\n")


if __name__ == "__main__":
    main()
