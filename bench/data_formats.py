"""The public data formats, counted: for each (argilla's UltraFeedback, H4's UltraFeedback
in a hub-layout folder, an OpenAssistant message table) and each entry point that reads
it (DPO/RM pairs, SFT conversations, PPO prompts), rows read, rows made and rows
dropped by reason, through the real pipeline (local Ray, Ray Data); with --s3, the S3
round trip of a short DPO run (pairs in, checkpoints out, resumed from there) on a
real S3-compatible server (moto) on 127.0.0.1.

    .venv/bin/python bench/data_formats.py            # the table
    .venv/bin/python bench/data_formats.py --s3 --record   # + S3, + bench/RESULTS.md

The samples are tests/data_samples.py's: the real column names and value shapes (see
there where each was checked), small.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _counts(cfg, kind):
    from rlhf.data import pipeline as data
    from rlhf.data.demo import tiny_model_path

    plan = data.inspect(cfg, kind=kind)
    pipes = data.build(plan, cfg, str(tiny_model_path()), seed=0)
    both = pipes.train_counts + pipes.eval_counts
    return plan, both, pipes.notes


def formats_table(tmp: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlhf.config import DataConfig, PromptDataConfig, SFTDataConfig
    from rlhf.data.pipeline import PAIRS
    from rlhf.data.prompts import PROMPTS
    from rlhf.data.examples import EXAMPLES
    from tests.data_samples import argilla_rows, oasst_tree, write_h4_repo

    uf = tmp / "argilla.jsonl"
    uf.write_text("".join(json.dumps(r) + "\n" for r in argilla_rows(400)))
    repo = write_h4_repo(tmp / "h4", {"train_prefs": 400, "test_prefs": 40, "train_sft": 400,
                                      "test_sft": 40, "train_gen": 400, "test_gen": 40})
    msgs = [m for t in range(300) for m in oasst_tree(t, "de" if t % 10 == 9 else "en")]
    pq.write_table(pa.Table.from_pylist(msgs), tmp / "oasst.parquet")
    cases = [
        ("argilla UltraFeedback, 400 rows", "DPO/RM pairs, min_score_gap=1",
         DataConfig(path=str(uf), eval_fraction=0.1, min_score_gap=1.0), PAIRS),
        ("argilla UltraFeedback, 400 rows", "SFT (chosen side)",
         SFTDataConfig(path=str(uf), eval_fraction=0.1), EXAMPLES),
        ("H4 UltraFeedback (hub layout), 6 splits", "DPO/RM pairs (train_prefs+test_prefs), "
         "min_score_gap=1", DataConfig(path=str(repo), min_score_gap=1.0), PAIRS),
        ("H4 UltraFeedback (hub layout), 6 splits", "SFT (train_sft+test_sft)",
         SFTDataConfig(path=str(repo)), EXAMPLES),
        ("H4 UltraFeedback (hub layout), 6 splits", "PPO prompts (train_gen+test_gen)",
         PromptDataConfig(path=str(repo)), PROMPTS),
        (f"oasst table, 300 trees, {len(msgs)} messages", "DPO/RM pairs, lang=en",
         DataConfig(path=str(tmp / "oasst.parquet"), lang="en", eval_fraction=0.1), PAIRS),
        (f"oasst table, 300 trees, {len(msgs)} messages", "SFT threads, lang=en",
         SFTDataConfig(path=str(tmp / "oasst.parquet"), lang="en", eval_fraction=0.1),
         EXAMPLES),
        (f"oasst table, 300 trees, {len(msgs)} messages", "PPO prompts, lang=en",
         PromptDataConfig(path=str(tmp / "oasst.parquet"), lang="en", eval_fraction=0.1),
         PROMPTS),
    ]
    lines = ["| data | read as | rows made (usable) | dropped, by reason | s |",
             "|---|---|---|---|---|"]
    for name, what, cfg, kind in cases:
        t = time.time()
        _, both, notes = _counts(cfg, kind)
        dropped = "; ".join(f"{n} {r}" for r, n in sorted(both.items()) if r) or "none"
        extra = f" ({notes[-1]})" if len(notes) > 1 else ""
        lines.append(f"| {name} | {what} | {both['']}{extra} | {dropped} | "
                     f"{time.time() - t:.1f} |")
        print(lines[-1], flush=True)
    return lines


def s3_round_trip(tmp: Path) -> list[str]:
    """A short DPO run reading its pairs from S3 and checkpointing there, then resumed."""
    from rlhf.data.demo import demo_pair
    from tests.integration.conftest import dpo, s3_server, summary

    with s3_server() as (client, bucket):
        body = "".join(json.dumps(demo_pair(i)) + "\n" for i in range(96)).encode()
        client.put_object(Bucket=bucket, Key="pairs/train.jsonl", Body=body)
        held = "".join(json.dumps(demo_pair(i, "eval")) + "\n" for i in range(32)).encode()
        client.put_object(Bucket=bucket, Key="pairs/held.jsonl", Body=held)
        args = ["output.name=s3", f"data.path=s3://{bucket}/pairs/train.jsonl",
                f"data.eval_path=s3://{bucket}/pairs/held.jsonl",
                f"cluster.storage_path=s3://{bucket}/runs", "train.checkpoint_every=5"]
        t = time.time()
        first = dpo(tmp, *args, "train.max_steps=5")
        t1, steps1 = time.time() - t, summary(first)["steps"]
        objs = client.list_objects_v2(Bucket=bucket, Prefix="runs/s3/").get("Contents", [])
        t = time.time()
        dpo(tmp, *args, "train.resume=true")
        t2, s2 = time.time() - t, summary(first)
        return [f"- S3 round trip (moto on 127.0.0.1): {len(body) + len(held)} bytes of pairs "
                f"read from s3://; the first run, {steps1} steps in {t1:.0f} s, wrote "
                f"{len(objs)} objects ({sum(o['Size'] for o in objs) / 1e6:.1f} MB) under "
                f"runs/s3/; the resumed run restored step {steps1} from there and finished "
                f"at step {s2['steps']} ({s2['samples']} pairs, none twice) in {t2:.0f} s."]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--s3", action="store_true")
    p.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    a = p.parse_args(argv)
    from tests.integration.conftest import shared_ray

    shared_ray()
    with tempfile.TemporaryDirectory() as d:
        lines = formats_table(Path(d))
        if a.s3:
            lines += [""] + s3_round_trip(Path(d))
            print(lines[-1])
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - public data formats (`bench/data_formats.py"
                    f"{' --s3' if a.s3 else ''}`)\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
