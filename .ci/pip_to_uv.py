"""Print the `uv pip install` flags that give it the package sources pip is configured with.

uv reads no pip.conf, so on a machine whose pip is set up with local mirrors, wheel folders
or constraints (PIP_FIND_LINKS, /etc/pip.conf, ...) `uv` alone would install something else
than `pip` would. `make setup` calls this with the venv's pip and passes the flags on:

    uv pip install $(python .ci/pip_to_uv.py path/to/pip) -e ".[cpu,test]"

Where pip has the same key in several places, the one pip itself obeys wins: environment
over the venv's (site) file over the user's over the global one.
"""
import shlex
import subprocess
import sys

# pip's key -> uv's flag; the values of these keys are whitespace-separated lists
FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}
PRIORITY = {":env:": 3, "site": 2, "user": 1, "global": 0}


def uv_flags(pip_config_list: str) -> list[str]:
    """Lines of `pip config list` (`global.find-links='/opt/wheels'`) -> uv's flags."""
    best: dict[str, tuple[int, str]] = {}
    for line in pip_config_list.splitlines():
        name, sep, value = line.partition("=")
        scope, dot, key = name.rpartition(".")
        if not (sep and dot):
            continue
        value = value.strip().strip("'\"")
        rank = PRIORITY.get(scope, 0)
        if key in FLAGS and (key not in best or rank >= best[key][0]):
            best[key] = (rank, value)
        if key == "no-index" and value.lower() in ("1", "true", "yes", "on"):
            best[key] = (rank, value)
    flags: list[str] = []
    for key, (_, value) in best.items():
        if key == "no-index":
            flags.append("--no-index")
            continue
        for item in value.split():
            flags += [FLAGS[key], item]
    return flags


if __name__ == "__main__":
    pip = sys.argv[1] if len(sys.argv) > 1 else "pip"
    listing = subprocess.run([pip, "config", "list"], capture_output=True, text=True, check=True)
    print(shlex.join(uv_flags(listing.stdout)))
