#!/usr/bin/env bash
# Build .whl/: the Python packages the project needs that the lent GPU machine lacks
# (Python 3.12, x86-64, torch 2.11+cu130, transformers, peft, accelerate, pandas, pyarrow
# are there; Ray, DeepSpeed, bitsandbytes, pydantic and jsonschema are not), slimmed to
# fit its 64 MiB working-tree limit. Run here, in the repo root; bench/gpu_check.sh
# installs them there.
#
#   Ray 2.60.0  79 MB -> ~42 MB: without its Java jar, dashboard web client, RLlib,
#               Serve and ray.llm (none is used by the project's training path).
#   bitsandbytes 43 MB -> ~2 MB: only its CUDA 13.0 library (torch there is cu130) and
#               the CPU one.
#   DeepSpeed 0.19.8 has no wheel on PyPI: built from its sdist (pure Python; ops JIT).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
full=${WHEEL_CACHE:-/tmp/rlhf-gpu-wheels}
mkdir -p "$full" .whl
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$full" "$@"
}
get ray==2.60.0 bitsandbytes==0.50.2 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
    rpds-py==2026.9.1
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python  # its setup.py imports torch
ls "$full"/deepspeed-0.19.8-*.whl >/dev/null 2>&1 ||
  $py -m pip wheel -q --no-deps --no-build-isolation -w "$full" deepspeed==0.19.8
rm -f .whl/*.whl
python3 - "$full" .whl <<'EOF'
import re, shutil, sys, zipfile
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
DROP = {
    "ray": re.compile(r"ray/(jars|rllib|serve|llm|dashboard/client)/"),
    "bitsandbytes": re.compile(r"bitsandbytes/libbitsandbytes_(?!cuda130\.so|cpu\.so)[^/]+$"),
}
for whl in sorted(src.glob("*.whl")):
    name = whl.name.split("-")[0]
    drop = DROP.get(name)
    if drop is None:
        shutil.copy(whl, dst / whl.name)
        continue
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(dst / whl.name, "w",
                                                      zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if drop.match(info.filename):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # drop the removed files' lines
                data = "".join(l for l in data.decode().splitlines(True)
                               if not drop.match(l.split(",")[0])).encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
EOF
du -ch .whl/*.whl | tail -1
