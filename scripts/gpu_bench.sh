#!/usr/bin/env bash
# GPU capacity benchmark: how many real-time streams one rapido process holds with the
# wav2lip-96 model on the torch backend in fp16 on one GPU.
#
#   scripts/gpu_bench.sh                 # JSON to ${OUT:-out}/gpu_bench.json
#   OUT=/tmp/res MAX_BATCH=16 scripts/gpu_bench.sh --speech 0.5
#   WHEELHOUSE=~/wheelhouse scripts/gpu_bench.sh    # a host with no package index
#
# Prints the GPU (nvidia-smi) first, then the capacity search progress; the result is
# `python -m rapido bench --capacity --json`: one object with `runs` (one per measured
# stream count), `capacity`, `machine`; the plot of fps and lateness (gpu_bench.png) and
# the log (gpu_bench.log) go beside it.
#
# With WHEELHOUSE=dir (made by scripts/wheelhouse.sh for this host's Python and
# platform) rapido is installed first with no package index: into a venv that sees the
# host's packages, so the host's own CUDA torch is used (a wheelhouse never carries
# torch), created or refreshed at VENV (default .venv-wheelhouse in the repo), by
# `pip install --no-index --find-links dir rapido[bench]`. PYTHON is then the host's
# interpreter the venv is made from (default python3).
#
# Bounded: the whole script, install included, stays under TIME_LIMIT_S (590 s). The
# bench gets what is left (at most BENCH_TIMEOUT_S, 570 s); at its limit it is
# interrupted (SIGINT) and still writes the runs measured so far to the JSON and the plot
# ("interrupted": true); the script then exits 124. Needs a GPU: without nvidia-smi, or
# with a torch that cannot see CUDA, it exits 2 with one line saying which. Bad
# arguments or knobs: exit 2 before anything is installed or run.
#
# Knobs (environment): PYTHON (default: the repo's .venv/bin/python, else python3),
# WHEELHOUSE, VENV, EXTRAS (rapido's extras to install, bench), STREAMS (first step of
# the search, 8), MAX_SEARCH (upper bound, 256), DURATION (s per step, 8), WARMUP (s, 2),
# MAX_BATCH (32), MAX_WAIT_MS (30), BENCH_TIMEOUT_S (570), TIME_LIMIT_S (590).
# Further arguments go to `rapido bench` unchanged (see python -m rapido bench --help).
set -euo pipefail

me=gpu_bench
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
started=$SECONDS

fail() {
    echo "$me: $*" >&2
    exit 2
}

usage() {
    cat <<'EOF'
usage: [WHEELHOUSE=dir] [OUT=dir] scripts/gpu_bench.sh [rapido bench flags...]

The wav2lip-96 capacity search on one NVIDIA GPU (torch, fp16), within TIME_LIMIT_S
(590 s) in all: $OUT/gpu_bench.json, gpu_bench.log and gpu_bench.png (OUT: ./out).
WHEELHOUSE=dir first installs rapido from a wheelhouse made by scripts/wheelhouse.sh,
with no package index, into a venv that uses the host's own CUDA torch.
Flags go to `python -m rapido bench` (e.g. --speech 0.5); the knobs (STREAMS,
MAX_SEARCH, DURATION, MAX_BATCH, ...) are listed at the top of this script.
EOF
}

bench_args=()
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --) shift; bench_args+=("$@"); break ;;
        *) bench_args+=("$1"); shift ;;
    esac
done

for knob in STREAMS MAX_SEARCH DURATION WARMUP MAX_BATCH MAX_WAIT_MS BENCH_TIMEOUT_S TIME_LIMIT_S; do
    value=${!knob:-}
    [[ -z $value || $value =~ ^[0-9]+$ ]] || fail "$knob=$value is not a whole number"
done
time_limit=${TIME_LIMIT_S:-590}

wheelhouse=${WHEELHOUSE:-}
if [[ -n $wheelhouse ]]; then
    [[ -d $wheelhouse ]] \
        || fail "WHEELHOUSE=$wheelhouse is not a folder (make one with scripts/wheelhouse.sh)"
    wheelhouse=$(cd "$wheelhouse" && pwd)
    rapido_whl=$(find "$wheelhouse" -maxdepth 1 -name 'rapido-*.whl' | sort | tail -n 1)
    [[ -n $rapido_whl ]] \
        || fail "WHEELHOUSE=$wheelhouse holds no rapido-*.whl (make it with scripts/wheelhouse.sh)"
    extras=${EXTRAS-bench}
    [[ -z $extras || $extras =~ ^[a-z0-9_-]+(,[a-z0-9_-]+)*$ ]] \
        || fail "EXTRAS=$extras is not a comma-separated list of rapido's extras"
fi

if [[ -n ${PYTHON:-} ]]; then
    python=$PYTHON
elif [[ -z $wheelhouse && -x $repo/.venv/bin/python ]]; then
    python=$repo/.venv/bin/python
else
    python=python3
fi

# The bench's flags are checked now, by the bench's own parser from this checkout, not
# after the install and the GPU checks (skipped where the interpreter cannot import it:
# the bench checks them again when it starts).
check_args='
import sys
try:
    from rapido.bench.args import validate
    from rapido.cli import _parser
except ImportError:
    sys.exit(0)
args = _parser().parse_args(["bench", *sys.argv[1:]])  # exits 2 with argparse`s line
problem = validate(args)
if problem:
    print(f"gpu_bench: {problem}", file=sys.stderr)
    sys.exit(2)
'
arg_status=0
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -c "$check_args" "${bench_args[@]}" \
    || arg_status=$?
((arg_status != 2)) || exit 2  # any other failure: that interpreter is checked below

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

# -- rapido from the wheelhouse, beside the host's torch -----------------------------------
if [[ -n $wheelhouse ]]; then
    venv=${VENV:-$repo/.venv-wheelhouse}
    base=$("$python" -c 'import sys; print(sys.base_prefix)')
    if [[ ! -x $venv/bin/python ]] \
        || ! grep -qx 'include-system-site-packages = true' "$venv/pyvenv.cfg" \
        || [[ $("$venv/bin/python" -c 'import sys; print(sys.base_prefix)' 2>/dev/null) != "$base" ]]; then
        echo "== venv $venv (from $python, with the host's packages)"
        "$python" -m venv --clear --system-site-packages "$venv" \
            || fail "could not create the venv $venv from $python"
    fi
    echo "== install from $wheelhouse (no package index)"
    pip=("$venv/bin/python" -m pip --disable-pip-version-check install --no-index
        --find-links "$wheelhouse")
    spec=rapido${extras:+[$extras]}
    timeout 300 "${pip[@]}" "$spec" \
        || fail "pip install --no-index --find-links $wheelhouse '$spec' failed (above): a" \
            "wheelhouse for another Python or platform? (scripts/wheelhouse.sh --python X.Y)"
    # The wheelhouse's rapido, even when one of the same version is installed already.
    timeout 120 "${pip[@]}" --quiet --no-deps --force-reinstall "$rapido_whl" \
        || fail "could not install $rapido_whl"
    "$venv/bin/python" -c 'import sys, torch
assert not torch.__file__.startswith(sys.prefix + "/"), torch.__file__' \
        || fail "torch in $venv is not the host's (a torch wheel in the wheelhouse?)"
    python=$venv/bin/python  # its torch: the host's, checked above to see CUDA
    cd "$out_dir"  # python -m rapido: the installed one, not a checkout in the cwd
fi

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
# What is left of the whole run's time, less the 20 s an interrupted bench may take to
# write its JSON and plot before it is killed.
left=$((time_limit - (SECONDS - started) - 20))
((left >= 30)) || fail "only ${left}s of TIME_LIMIT_S=${time_limit}s are left for the bench"
((limit <= left)) || limit=$left
cmd=("$python" -m rapido bench --capacity --json --model wav2lip-96
    --plot "$out_dir/gpu_bench.png"
    --streams "${STREAMS:-8}" --max-streams-search "${MAX_SEARCH:-256}"
    --duration "${DURATION:-8}" --warmup "${WARMUP:-2}"
    --max-batch "${MAX_BATCH:-32}" --max-wait-ms "${MAX_WAIT_MS:-30}" "${bench_args[@]}")
echo "== bench (RAPIDO_BACKEND=torch RAPIDO_DEVICE=cuda RAPIDO_DTYPE=float16, limit ${limit}s)"
echo "+ ${cmd[*]}"

start=$(date +%s)
status=0
# stdout (the JSON) to a file; progress (stderr) to the terminal and a log. At the limit
# the bench is interrupted and writes what it measured; killed 20 s later if it hangs.
timeout -s INT -k 20 "$limit" "${cmd[@]}" >"$out_dir/gpu_bench.json.part" \
    2> >(tee "$out_dir/gpu_bench.log" >&2) || status=$?
elapsed=$(($(date +%s) - start))
if [[ $status -eq 124 && -s $out_dir/gpu_bench.json.part ]]; then
    mv "$out_dir/gpu_bench.json.part" "$out_dir/gpu_bench.json"
    echo "$me: the bench ran past ${limit}s and was interrupted: $out_dir/gpu_bench.json holds" \
        "the runs measured so far (the search did not finish; a smaller MAX_SEARCH or" \
        "DURATION fits)" >&2
    exit 124
fi
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
echo "== done in ${elapsed}s (all: $((SECONDS - started))s): $out_dir/gpu_bench.json"
