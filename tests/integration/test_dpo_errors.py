"""Bad input through the command line: a clear message, a non-zero exit, no hang.

One case runs `python -m rlhf.dpo` as a process of its own (exit status and stderr as a
shell sees them); the others call the same `rlhf.dpo.main(argv)` that `python -m`
runs, in this process, on the shared local Ray (a Python and Ray start less each)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.config.entry_points import ENTRY_POINTS
from rlhf.data.demo import demo_pair

ROOT = Path(__file__).resolve().parents[2]


def cli(tmp_path, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "rlhf.dpo", f"output.dir={tmp_path / 'runs'}",
                           "cluster.num_workers=2", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=timeout)


def main(tmp_path, capsys, *args) -> tuple[int, str]:
    """rlhf.dpo.main as `python -m rlhf.dpo` calls it: (exit status, stderr)."""
    from rlhf.dpo import main as dpo_main

    capsys.readouterr()
    code = dpo_main([f"output.dir={tmp_path / 'runs'}", "cluster.num_workers=2", *args])
    return code, capsys.readouterr().err


def test_malformed_line_from_the_shell_is_one_message_last(tmp_path):
    """The error a Ray Data task raises reaches the shell as one line, printed last; the
    tracebacks Ray logs on the way are in the run's run.log, not on the terminal."""
    lines = [json.dumps(demo_pair(i)) for i in range(30)]
    lines[17] = lines[17][:-5]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    out = cli(tmp_path, f"data.path={f}")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {f}, line 18: not valid JSON (") and last.endswith(
        "). Fix or delete that line."), out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    logs = list((tmp_path / "runs").glob("dpo-*/run.log"))
    assert logs and "Traceback" in logs[0].read_text()


def test_missing_columns(tmp_path, capsys):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "p", "preferred": "a", "dispreferred": "b"}) + "\n")
    code, err = main(tmp_path, capsys, f"data.path={f}")
    assert code == 2
    assert "Could not find column(s) 'chosen', 'rejected'" in err
    assert "Columns found: prompt, preferred, dispreferred" in err
    # the flags, guessed from the names, as the last line
    assert err.strip().splitlines()[-1].endswith(
        "data.columns.chosen=preferred data.columns.rejected=dispreferred")


def test_empty_file_corrupt_file_and_missing_model(tmp_path, capsys):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    code, err = main(tmp_path, capsys, f"data.path={f}")
    assert code == 2 and "the data set is empty" in err
    f = tmp_path / "pairs.parquet"  # text saved under a parquet name
    f.write_text("prompt,chosen,rejected\nq,a,b\n")
    code, err = main(tmp_path, capsys, f"data.path={f}")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"error: {f}: not a readable .parquet file"), err
    assert "Traceback" not in err
    code, err = main(tmp_path, capsys, "model.name_or_path=/no/such/model")
    assert code == 2 and "no such model folder" in err


def test_unknown_key_and_contradiction(ray_cluster, tmp_path, capsys):
    code, err = main(tmp_path, capsys, "train.lr=1e-5")
    assert code == 2 and "Unknown config key 'train.lr'" in err
    code, err = main(tmp_path, capsys, "train.global_batch_size=12")
    assert code == 2 and "multiple of" in err
    # more than the (shared, 4-CPU) Ray has: said before anything starts, not a hang
    code, err = main(tmp_path, capsys, "cluster.cpus_per_worker=2")
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "error: The local Ray cluster has 4 CPUs and 0 GPUs; 2 workers need 4 CPUs (+1 for "
        "the data pipeline)"), err


@pytest.mark.parametrize("entry", [e.module for e in ENTRY_POINTS.values() if e.name != "dpo"])
def test_malformed_line_is_the_last_line_of_every_entry_point(ray_cluster, tmp_path, capfd,
                                                              entry):
    """Every entry point (rlhf.dpo: above, from the shell) stops on a malformed line deep
    in the file with the one message last and no traceback on the terminal."""
    import importlib

    lines = [json.dumps(demo_pair(i)) for i in range(40)]
    lines[30] = "{not json"
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    args = [f"data.path={f}", f"output.dir={tmp_path / 'runs'}"]
    if entry == "rlhf.evaluate":
        args += ["model=builtin:tiny-llama", "base=builtin:tiny-llama",
                 "judge.model=builtin:tiny-llama"]
    capfd.readouterr()
    code = importlib.import_module(entry).main(args)
    out, err = capfd.readouterr()
    assert code == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"error: {f}, line 31: not valid JSON (Expecting "
                                            "property name enclosed in double quotes, "
                                            "column 2). Fix or delete that line."), err[-3000:]
    assert "Traceback" not in out + err


def test_nan_loss_stops_with_advice_and_keeps_last_checkpoint(ray_cluster, tmp_path, capsys):
    code, err = main(tmp_path, capsys, "data.demo_pairs=160", "data.demo_eval_pairs=16",
                     "train.learning_rate=1e15", "train.max_grad_norm=0",
                     "train.warmup_ratio=0", "train.checkpoint_every=1", "train.eval_every=0",
                     "output.name=nan")
    assert code == 1, err[-3000:]
    assert "loss became nan" in err.lower() or "loss became inf" in err.lower()
    assert "learning rate too high" in err
    ckpts = list((tmp_path / "runs" / "nan" / "checkpoints").glob("step_*"))
    assert ckpts  # the steps before the NaN were checkpointed and kept


def test_resume_without_a_run_is_an_error(tmp_path):
    from rlhf.config import ConfigError, DPOConfig, parse_args
    from rlhf.dpo import run

    with pytest.raises(ConfigError, match="no earlier dpo run"):
        run(parse_args(DPOConfig, [f"output.dir={tmp_path}", "train.resume=true"], "x"))
