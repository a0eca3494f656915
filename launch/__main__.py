"""python -m launch: start and follow runs on a Ray cluster without remembering flags.

    python -m launch plan   RECIPE [key=value ...] [--arch HUB_ID] [--cluster ray-cluster.yaml]
    python -m launch submit RECIPE [key=value ...] [--address URL] [--no-wait] [--dry-run]
    python -m launch status [JOB_ID] [--address URL]
    python -m launch logs   JOB_ID [--follow] [--address URL]

plan     what the recipe asks of Ray, a per-GPU memory estimate for each model, and
         whether it fits the node types of ray-cluster.yaml (exit 1 if it does not):
         the out-of-memory error, predicted before the run instead of an hour into it
submit   `ray job submit --working-dir <project> -- python -m rlhf.<entry> --config
         RECIPE ...`; the entry point comes from the recipe's name (dpo-, rm-, sft-, ppo-)
         or --entry. Nothing secret is put on the command line or in the job's runtime
         environment (both are visible in the dashboard): the nodes read W&B keys, hub
         tokens and cloud credentials from their own environment
status   `ray job list`, or `ray job status JOB_ID`
logs     `ray job logs JOB_ID`

The address is --address, else $RAY_ADDRESS, else http://127.0.0.1:8265 (what `ray
dashboard ray-cluster.yaml` forwards: the job server is not exposed beyond the head).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launch.plan import describe, plan_recipe
from rlhf.config import ConfigError
from rlhf.config.entry_points import TRAINING as ENTRIES

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRY_HELP = ", ".join(f"rlhf.{e}" for e in ENTRIES)  # the training entry points


def _address(a) -> str:
    return a.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _ray() -> str:
    here = Path(sys.executable).with_name("ray")
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise SystemExit("the `ray` command is not installed here (pip install 'ray[default]').")
    return found


def entry_of(recipe: Path, entry: str | None) -> str:
    kind = entry or recipe.name.split("-")[0]
    if kind.startswith("rlhf."):
        kind = kind[len("rlhf."):]
    if kind not in ENTRIES:
        raise SystemExit(f"{recipe.name}: cannot tell the entry point; name the recipe "
                         f"<{'|'.join(ENTRIES)}>-... or pass --entry {ENTRY_HELP}.")
    return kind


def submit_command(recipe: Path, overrides: list[str], address: str, entry: str,
                   wait: bool) -> list[str]:
    """The `ray job submit` command line for a recipe. The recipe path is given relative
    to the project, since the job runs in the uploaded copy of it."""
    try:
        rel = recipe.resolve().relative_to(ROOT)
    except ValueError:
        raise SystemExit(f"{recipe} is outside the project ({ROOT}): the job runs in an "
                         "uploaded copy of the project, so put the recipe under launch/recipes/.")
    cmd = [_ray(), "job", "submit", "--address", address, "--working-dir", str(ROOT)]
    if not wait:
        cmd.append("--no-wait")
    return cmd + ["--", "python", "-m", f"rlhf.{entry}", "--config", str(rel), *overrides]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="resources and memory of a recipe, and whether it fits")
    p.add_argument("recipe", type=Path)
    p.add_argument("overrides", nargs="*", help="section.key=value, as for the entry point")
    p.add_argument("--arch", help="model shape to assume (a hub id known to launch.plan "
                                  "or a local folder): for a policy path that is not here")
    p.add_argument("--cluster", type=Path, default=ROOT / "ray-cluster.yaml")
    p.add_argument("--entry", help=ENTRY_HELP)
    s = sub.add_parser("submit", help="ray job submit a recipe")
    s.add_argument("recipe", type=Path)
    s.add_argument("overrides", nargs="*")
    s.add_argument("--address")
    s.add_argument("--entry")
    s.add_argument("--no-wait", action="store_true")
    s.add_argument("--dry-run", action="store_true", help="print the command only")
    st = sub.add_parser("status", help="ray job list / status")
    st.add_argument("job_id", nargs="?")
    st.add_argument("--address")
    lg = sub.add_parser("logs", help="ray job logs")
    lg.add_argument("job_id")
    lg.add_argument("--follow", action="store_true")
    lg.add_argument("--address")
    a = ap.parse_args(argv)

    if a.cmd == "plan":
        kind = entry_of(a.recipe, a.entry)
        try:
            plan, cfg = plan_recipe(a.recipe, a.overrides, a.cluster, a.arch, kind)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(describe(plan, cfg))
        return 0 if plan.ok else 1
    if a.cmd == "submit":
        if not a.recipe.is_file():
            raise SystemExit(f"no such recipe: {a.recipe}")
        cmd = submit_command(a.recipe, a.overrides, _address(a), entry_of(a.recipe, a.entry),
                             wait=not a.no_wait)
        print(shlex.join(cmd), flush=True)
        return 0 if a.dry_run else subprocess.call(cmd)
    if a.cmd == "status":
        cmd = [_ray(), "job", "status" if a.job_id else "list", "--address", _address(a)]
        return subprocess.call(cmd + ([a.job_id] if a.job_id else []))
    cmd = [_ray(), "job", "logs", "--address", _address(a), a.job_id]
    return subprocess.call(cmd + (["--follow"] if a.follow else []))


if __name__ == "__main__":
    sys.exit(main())
