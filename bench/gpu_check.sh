#!/usr/bin/env bash
# The project's CUDA paths in one run on a lent GPU machine (one H100/H200, Python 3.12,
# torch cu130, transformers; no Ray, DeepSpeed or bitsandbytes, no network).
# Prepare here with `bash bench/gpu_wheels.sh` (.whl/, ~49 MB), then there, from the repo
# root with .whl carried:
#
#   bash bench/gpu_check.sh        # log and JUnit XML under $OUT (default /tmp/gpu-check)
#
# GPU_CHECK_STEPS="install kernels speed" runs only those steps; GPU_RAY_K=zero3 picks
# the Ray tests by name (pytest -k).
# Steps, most important first, each under its own time limit so that the whole run
# ends within GPU_CHECK_BUDGET seconds (default 390) and the summary is always written:
#   env      nvidia-smi, torch / transformers / peft versions, the GPU torch sees
#   install  .whl/ -> /tmp/site (Ray 2.60, DeepSpeed 0.19.8, bitsandbytes, pydantic, ...)
#   kernels  tests/gpu/test_kernels_gpu.py (packed == padded log-probs and gradients on
#            CUDA, fp32 and bf16) + the QLoRA export test of tests/unit/test_models.py
#            (bitsandbytes 4-bit on CUDA) + tests/gpu/test_weight_sync_gpu.py (the
#            broadcast weight sync over NCCL; needs 2 GPUs, skips on one)
#   engine   bench/gpu_engine_check.py: DeepSpeed ZeRO-2 / ZeRO-3 / LoRA / QLoRA / ORPO engines of
#            the DPO task on one GPU, without Ray; loss must fall, export must reload
#   speed    bench/gpu_packing_speed.py: tokens/s padded vs packed, ~120M Llama, bf16
#   ray      tests/gpu/test_dpo_gpu.py: rlhf.dpo (DPO, ORPO) and rlhf.kto end to end on Ray
#   async    bench/async_rollout.py --gpu: rlhf.ppo with max_staleness 0 / 1 / 2 side by
#            side, one training GPU and one engine GPU; needs vLLM with CUDA and two GPUs
#            (it says so and skips where either is missing: the wheels above carry no
#            vLLM, so bring one in .whl/ or run on a machine that has it)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-390}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_TRAIN_V2_ENABLED=1
export RLHF_CACHE=/tmp/rlhf-cache PYTHONPATH=/tmp/site:$PWD
PY=${PY:-python3}
declare -a RESULTS=()

# step NAME CAP CMD...: run CMD under min(CAP, time left), record its exit status.
step() {
  local name=$1 cap=$2; shift 2
  # GPU_CHECK_STEPS="install kernels": run only these steps (a rerun of what failed)
  if [[ -n "${GPU_CHECK_STEPS:-}" && " $GPU_CHECK_STEPS " != *" $name "* ]]; then return; fi
  local left=$((BUDGET - SECONDS - 5))
  local limit=$((cap < left ? cap : left))
  echo; echo "=== $name (limit ${limit}s, at ${SECONDS}s) ==="
  if ((limit < 20)); then RESULTS+=("$name: SKIPPED (no time left)"); return; fi
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@"
  local rc=$?
  local how="ok"; ((rc == 124 || rc == 137)) && how="TIMED OUT" || { ((rc)) && how="FAILED"; }
  RESULTS+=("$name: $how (rc $rc, $((SECONDS - t0)) s)")
  echo "=== $name: $how (rc $rc, $((SECONDS - t0)) s) ==="
}

run_all() {
  echo "gpu_check: $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)" \
       "$(git status --short 2>/dev/null | wc -l) changed files; budget ${BUDGET}s"
  step env 60 bash -c '
    nvidia-smi; uname -srm; nproc; free -g | head -2; df -h /dev/shm /tmp | tail -2
    '"$PY"' -c "import sys, torch, transformers, peft, accelerate, numpy
print(sys.version.split()[0], sys.executable)
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"| transformers\",
      transformers.__version__, \"| peft\", peft.__version__, \"| accelerate\",
      accelerate.__version__, \"| numpy\", numpy.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability(),
      torch.cuda.get_device_properties(0).total_memory // 2**20, \"MiB\")"'
  step install 90 bash -c '
    '"$PY"' -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    '"$PY"' -c "import ray, ray.train.torch, ray.data, deepspeed, bitsandbytes, pydantic
print(\"ray\", ray.__version__, \"| deepspeed\", deepspeed.__version__, \"| bitsandbytes\",
      bitsandbytes.__version__, \"| pydantic\", pydantic.__version__)
from deepspeed.accelerator import get_accelerator
print(\"deepspeed accelerator:\", get_accelerator()._name)"'
  step kernels 150 "$PY" -m pytest -q -s -rs -p no:cacheprovider \
    tests/gpu/test_kernels_gpu.py tests/unit/test_models.py::test_qlora_export_unpacks_the_4bit_weights \
    tests/gpu/test_weight_sync_gpu.py \
    --junitxml="$OUT/junit-kernels.xml"
  step engine 150 "$PY" bench/gpu_engine_check.py
  step speed 120 "$PY" bench/gpu_packing_speed.py --steps ${GPU_SPEED_STEPS:-15}
  rm -rf /tmp/pt-dpo-gpu
  step ray 300 "$PY" -m pytest -q -rA -p no:cacheprovider --basetemp=/tmp/pt-dpo-gpu \
    tests/gpu/test_dpo_gpu.py ${GPU_RAY_K:+-k "$GPU_RAY_K"} --junitxml="$OUT/junit-dpo-gpu.xml"
  step async 240 bash -c '
    '"$PY"' -c "import vllm, torch; assert torch.cuda.device_count() >= 2" 2>/dev/null || {
      echo "skipped: bench/async_rollout.py --gpu needs vLLM (CUDA) and 2 GPUs here"; exit 0; }
    '"$PY"' bench/async_rollout.py --gpu --seeds 1 --steps 12 | tee "'"$OUT"'/async.txt"'
  for t in qlora_bf16 zero3_bf16_full; do  # the runs' summaries, when they got that far
    f=$(find /tmp/pt-dpo-gpu -path "*test_${t}*" -name summary.json 2>/dev/null | head -1)
    [ -n "$f" ] && cp "$f" "$OUT/summary-$t.json"
  done
  echo; echo "=== summary (${SECONDS}s) ==="
  printf '%s\n' "${RESULTS[@]}"
  ! printf '%s\n' "${RESULTS[@]}" | grep -qv ': ok '
}

run_all 2>&1 | tee "$OUT/gpu_log.txt"
