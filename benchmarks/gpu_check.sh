#!/usr/bin/env bash
# GPU check for fastmae (issue #13): CUDA tests, then train-step speed of fastmae vs Hugging Face (ViT-B/16 and
# ViT-L/16 at 224 px, bf16, eager and compiled; fine-tuning vs ViTForImageClassification) with peak memory and
# MFU against the bf16 matmul peak measured in the same process, and the JPEG data loader's img/s with 16
# workers next to the model's. Each part has its own time limit inside one overall budget (GPU_CHECK_BUDGET_S,
# default 450 s), a failed or timed-out part does not stop the next, and summary.json / summary.md come last.
# Everything goes to $OUT (default ./gpu_out): at most 8 files, the device tool's limit.
#
# Preparation, once, on the machine that calls the device (the GPU image has no tyro and no network):
#   cd <repo root> && python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       tyro==1.0.17 typeguard==4.6.1 docstring-parser==0.18.0 typing-extensions==4.16.0
#   (.whl/ is git-ignored; the device sends the session's own checkout, so .whl/ must be in that checkout.)
# The device call:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Here, without a GPU, it stops within seconds: `CUDA_VISIBLE_DEVICES= OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh`.

set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
RESERVE_S=15  # kept back for the summary
PARTS=()      # name=rc:seconds:limit, for gpu_summary.py

SITE=/tmp/fastmae_site  # the wheels go here only when pip cannot install them into the environment
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}:$SITE" PYTHONUNBUFFERED=1
cd "$REPO" || exit 2

# run_part NAME MAX_SECONDS COMMAND...: run COMMAND under `timeout` (the smaller of MAX_SECONDS and what is left
# of the budget), log its exit code and duration, and go on whatever happened.
run_part() {
  local name=$1 max=$2
  shift 2
  local left=$((BUDGET_S - SECONDS - RESERVE_S))
  if ((left < 20)); then
    echo "=== $name: skipped, $left s of the budget left"
    PARTS+=("$name=skipped:0:0")
    return
  fi
  local limit=$((max < left ? max : left)) t0=$SECONDS rc
  echo "=== $name (limit ${limit} s, at ${SECONDS} s): $*"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  PARTS+=("$name=$rc:$((SECONDS - t0)):$limit")
}

# tyro (the CLI's parser) from the carried wheels, unless it is already importable.
install_tyro() {
  "$PY" -c "import tyro" 2>/dev/null && return 0
  [ -d .whl ] || { echo "no .whl/ folder: carry it (see the top of this script)"; return 1; }
  "$PY" -m pip install -q --no-index --no-cache-dir --find-links .whl tyro && return 0
  echo "pip could not install tyro into the environment; installing the wheels under $SITE instead"
  "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --target "$SITE" .whl/*.whl
}

summary() {
  "$PY" benchmarks/gpu_summary.py --out "$OUT" "${PARTS[@]/#/--part=}"
}

main() {
  echo "=== gpu_check: $(date -Is) on $(hostname), output in $OUT, budget ${BUDGET_S} s"
  if command -v nvidia-smi >/dev/null; then
    run_part nvidia-smi 30 bash -c "{ nvidia-smi; nvidia-smi --format=csv \
      --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version; } | tee '$OUT/nvidia-smi.txt'"
  else
    echo "nvidia-smi: not found" | tee "$OUT/nvidia-smi.txt"
  fi
  run_part install-tyro 90 bash "${BASH_SOURCE[0]}" --install-tyro  # `timeout` runs programs, not functions
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device: torch.cuda.is_available() is False (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-unset}'); nothing was measured"
    PARTS+=("cuda-device=3:0:0")
    summary >/dev/null
    return 3
  fi
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

  run_part cuda-tests 150 "$PY" -m pytest tests/test_cuda.py -m cuda -q -rs -p no:cacheprovider --durations=10 \
    --junitxml="$OUT/pytest_cuda.xml"
  run_part data-loader 60 "$PY" benchmarks/bench_data.py --jpeg-only --files 4096 --workers 16 --batch 256 --epochs 3 \
    --json "$OUT/bench_data.json"
  # Fine-tuning (eager, about a minute) before pretraining, whose two compilations take most of what is left;
  # bench_model rewrites its JSON after every case, so a time-out in case L keeps case B.
  local common=(--device cuda --precisions bf16 --impls fastmae,hf --rounds 3 --max-rounds 3 --round-seconds 1)
  run_part finetune-speed 90 "$PY" benchmarks/bench_model.py --cases BF,LF "${common[@]}" \
    --json "$OUT/bench_finetune.json"
  run_part pretrain-speed 270 "$PY" benchmarks/bench_model.py --cases B,L --compile "${common[@]}" \
    --json "$OUT/bench_pretrain.json"
  echo "=== done at ${SECONDS} s"
  summary
}

# The script calls itself with --install-tyro for that one step, so that it runs under `timeout` too.
if [ "${1:-}" = "--install-tyro" ]; then
  install_tyro
  exit
fi

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
