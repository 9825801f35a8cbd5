#!/usr/bin/env bash
# GPU capacity benchmark: how many real-time streams one rapido process holds with the
# wav2lip-96 model on the torch backend in fp16 on one GPU.
#
#   scripts/gpu_bench.sh                 # JSON to ${OUT:-out}/gpu_bench.json
#   OUT=/tmp/res MAX_BATCH=16 scripts/gpu_bench.sh --speech 0.5
#
# Prints the GPU (nvidia-smi) first, then the capacity search progress; the result is
# `python -m rapido bench --capacity --json`: one object with `runs` (one per measured
# stream count), `capacity`, `machine`; the plot of fps and lateness goes beside it.
# Bounded: the bench is stopped after 570 s (the script then exits 124), so the whole
# script stays under 10 minutes. Needs a GPU: without nvidia-smi, or with a torch that
# cannot see CUDA, it exits 2 with one line saying which.
#
# Knobs (environment): PYTHON (default: the repo's .venv/bin/python, else python3),
# STREAMS (first step of the search, 8), MAX_SEARCH (upper bound, 256), DURATION (s per
# step, 8), WARMUP (s, 2), MAX_BATCH (32), MAX_WAIT_MS (30), BENCH_TIMEOUT_S (570).
# Further arguments go to `rapido bench` unchanged (see python -m rapido bench --help).
# Plots (--plot) arrive with the bench work; this script passes only today's flags.
set -euo pipefail

me=gpu_bench
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

fail() {
    echo "$me: $*" >&2
    exit 2
}

if [[ -n ${PYTHON:-} ]]; then
    python=$PYTHON
elif [[ -x $repo/.venv/bin/python ]]; then
    python=$repo/.venv/bin/python
else
    python=python3
fi

# -- is there a GPU torch can use? -------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 \
    || fail "no GPU: nvidia-smi not found (this benchmark needs an NVIDIA GPU and driver)"
gpu_list=$(nvidia-smi -L 2>/dev/null) \
    || fail "no GPU: nvidia-smi -L failed (driver not loaded?)"
grep -q '^GPU ' <<<"$gpu_list" || fail "no GPU: nvidia-smi -L lists no GPU"
"$python" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1 \
    || fail "no GPU: torch in $python cannot use CUDA (missing, a CPU-only build, or no visible device)"

out_dir=${OUT:-out}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)

# -- what we run on ------------------------------------------------------------------
echo "== GPU"
echo "$gpu_list"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,utilization.gpu,clocks.max.sm,power.limit \
    --format=csv 2>/dev/null || true
"$python" -c 'import sys, torch; print(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda {torch.version.cuda}  device {torch.cuda.get_device_name(0)}")' || true
nvidia-smi >"$out_dir/nvidia-smi.txt" 2>&1 || true

# -- the bench ---------------------------------------------------------------------------
export RAPIDO_BACKEND=torch RAPIDO_DEVICE=cuda RAPIDO_DTYPE=float16
# Built models land in the output folder's cache, not in the user's home.
export RAPIDO_MODEL_DIR=${RAPIDO_MODEL_DIR:-$out_dir/models}
limit=${BENCH_TIMEOUT_S:-570}
cmd=("$python" -m rapido bench --capacity --json --model wav2lip-96
    --plot "$out_dir/gpu_bench.png"
    --streams "${STREAMS:-8}" --max-streams-search "${MAX_SEARCH:-256}"
    --duration "${DURATION:-8}" --warmup "${WARMUP:-2}"
    --max-batch "${MAX_BATCH:-32}" --max-wait-ms "${MAX_WAIT_MS:-30}" "$@")
echo "== bench (RAPIDO_BACKEND=torch RAPIDO_DEVICE=cuda RAPIDO_DTYPE=float16, limit ${limit}s)"
echo "+ ${cmd[*]}"

start=$(date +%s)
status=0
# stdout (the JSON) to a file; progress (stderr) to the terminal and a log.
timeout -k 10 "$limit" "${cmd[@]}" >"$out_dir/gpu_bench.json.part" \
    2> >(tee "$out_dir/gpu_bench.log" >&2) || status=$?
elapsed=$(($(date +%s) - start))
if [[ $status -ne 0 ]]; then
    rm -f "$out_dir/gpu_bench.json.part"
    if [[ $status -eq 124 || $status -eq 137 ]]; then
        echo "$me: the bench ran past ${limit}s and was stopped (log: $out_dir/gpu_bench.log)" >&2
        exit 124
    fi
    echo "$me: the bench failed with exit code $status after ${elapsed}s (log: $out_dir/gpu_bench.log)" >&2
    exit "$status"
fi
mv "$out_dir/gpu_bench.json.part" "$out_dir/gpu_bench.json"
nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv >>"$out_dir/nvidia-smi.txt" 2>&1 || true
echo "== done in ${elapsed}s: $out_dir/gpu_bench.json"
