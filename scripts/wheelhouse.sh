#!/usr/bin/env bash
# A wheelhouse for a host without a route to a package index (a GPU host with its own
# Python and CUDA torch): binary wheels of rapido and of every runtime dependency for
# one Python version and platform, one version of each, never torch (nor the nvidia-* and
# triton wheels a torch pulls): the host's own torch is used.
#
#   scripts/wheelhouse.sh --python 3.12                    # -> ./wheelhouse
#   scripts/wheelhouse.sh --python 3.12 --out /tmp/wh --platform manylinux_2_28_x86_64
#
# Then, on the host (scripts/gpu_bench.sh does this when WHEELHOUSE=dir is set):
#   python3 -m venv --system-site-packages venv
#   venv/bin/pip install --no-index --find-links wheelhouse 'rapido[bench]'
#
# The requirements are resolved once (one `pip download`), pinned into
# <out>/requirements.txt, and checked: one version of each name, no torch. Markers
# (python_version, sys_platform) are evaluated by the interpreter that runs pip:
# python<version> when it runs (on PATH or pyenv's; else the repo's .venv, with a note),
# so run it where that interpreter exists. Needs the network (a package index); run it on a
# machine that has one and carry the folder over.
set -euo pipefail

me=wheelhouse
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
usage: scripts/wheelhouse.sh --python X.Y [--platform TAG] [--extras LIST] [--out DIR]

Download binary wheels of rapido's runtime dependencies (never torch) for Python X.Y
on PLATFORM, and build rapido's own wheel, into DIR.

  --python X.Y      the target interpreter's version, e.g. 3.12 (required; >= 3.11)
  --platform TAG    wheel platform of the target (default manylinux_2_28_x86_64; a
                    manylinux_2_N tag also takes manylinux_2_17..N and manylinux2014
                    wheels); e.g. manylinux2014_x86_64, manylinux_2_28_aarch64
  --extras LIST     rapido's extras to include, comma-separated (default bench: the
                    plot of the capacity search); '' for none, e.g. bench,gpu
  --out DIR         where the wheels go (default ./wheelhouse); an existing wheelhouse
                    there is replaced
  -h, --help        this text

Environment: PYTHON, the interpreter whose pip resolves (default: a python<X.Y> found
on PATH or in pyenv, else the repo's .venv; markers are evaluated for its version).
EOF
}

fail() {
    echo "$me: $*" >&2
    exit 2
}

bad_usage() {
    echo "$me: $*" >&2
    echo "usage: scripts/wheelhouse.sh --python X.Y [--platform TAG] [--extras LIST] [--out DIR] (--help for more)" >&2
    exit 2
}

# -- arguments -------------------------------------------------------------------------
pyver="" platform=manylinux_2_28_x86_64 extras=bench out=wheelhouse
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --python | --platform | --extras | --out)
            (($# >= 2)) || bad_usage "$1 needs a value"
            case $1 in
                --python) pyver=$2 ;;
                --platform) platform=$2 ;;
                --extras) extras=$2 ;;
                --out) out=$2 ;;
            esac
            shift 2
            ;;
        --python=* | --platform=* | --extras=* | --out=*)
            value=${1#*=}
            case $1 in
                --python=*) pyver=$value ;;
                --platform=*) platform=$value ;;
                --extras=*) extras=$value ;;
                --out=*) out=$value ;;
            esac
            shift
            ;;
        *) bad_usage "unknown argument: $1" ;;
    esac
done
[[ -n $pyver ]] || bad_usage "--python X.Y is required (the target interpreter's version)"
[[ $pyver =~ ^3\.([0-9]+)$ ]] || bad_usage "--python: '$pyver' is not a version like 3.12"
((BASH_REMATCH[1] >= 11)) || bad_usage "--python: rapido needs Python >= 3.11, not $pyver"
[[ $platform =~ ^[a-z0-9_]+$ ]] || bad_usage "--platform: '$platform' is not a wheel platform tag"
[[ -z $extras || $extras =~ ^[a-z0-9_-]+(,[a-z0-9_-]+)*$ ]] \
    || bad_usage "--extras: '$extras' is not a comma-separated list of names"
[[ -n $out ]] || bad_usage "--out needs a folder"

# -- the interpreter whose pip resolves --------------------------------------------------
version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
if [[ -n ${PYTHON:-} ]]; then
    py=$PYTHON
    have=$(version_of "$py") || fail "cannot run PYTHON=$py"
else
    # python<X.Y> when it runs (a pyenv shim may be on PATH and still refuse), one of
    # pyenv's, else ours.
    py="" have=""
    shopt -s nullglob
    candidates=("python$pyver" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$pyver".*/bin/"python$pyver")
    shopt -u nullglob
    for cand in "${candidates[@]}" "$repo/.venv/bin/python" python3; do
        if v=$(version_of "$cand"); then
            py=$cand have=$v
            break
        fi
    done
    [[ -n $py ]] || fail "no Python found to run pip (set PYTHON)"
fi
"$py" -m pip --version >/dev/null 2>&1 || fail "$py has no pip (set PYTHON to one that has)"
if [[ $have != "$pyver" ]]; then
    echo "$me: note: resolving with Python $have for $pyver: dependency markers are" \
        "evaluated for $have (no python$pyver runs here: set PYTHON to one)" >&2
fi

# Platform tags pip accepts: pip takes only the tags it is given, so a manylinux_2_N tag
# is spelled out down to manylinux_2_17 (manylinux2014), which such a host also runs.
platforms=()
if [[ $platform =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
    glibc=${BASH_REMATCH[1]} arch=${BASH_REMATCH[2]}
    ((glibc >= 17)) || bad_usage "--platform: manylinux_2_$glibc is older than manylinux2014"
    for ((m = glibc; m >= 17; m--)); do platforms+=("manylinux_2_${m}_$arch"); done
    platforms+=("manylinux2014_$arch")
elif [[ $platform =~ ^manylinux2014_(.+)$ ]]; then
    platforms+=("$platform" "manylinux_2_17_${BASH_REMATCH[1]}")
else
    platforms+=("$platform")
fi
platform_args=()
for p in "${platforms[@]}"; do platform_args+=(--platform "$p"); done
target=(--only-binary=:all: --implementation cp --python-version "$pyver" "${platform_args[@]}")

# -- the output folder: new, or a wheelhouse made by this script ---------------------------
mkdir -p "$out"
out=$(cd "$out" && pwd)
for f in "$out"/* "$out"/.[!.]*; do
    [[ -e $f ]] || continue
    case ${f##*/} in
        *.whl | requirements.txt) ;;
        .stage.*) rm -rf "$f" ;; # left by an interrupted run
        *) fail "$out holds ${f##*/}, which is not a wheel: give --out an empty folder or a wheelhouse" ;;
    esac
done
stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# -- rapido's own wheel, and its requirements less torch -----------------------------------
echo "== rapido's wheel ($py, pip $("$py" -m pip --version | cut -d' ' -f2))" >&2
# Built from a copy of the checkout's files (tracked and not ignored): an in-tree build
# would reuse a stale build/ folder, and leave one behind.
src=$repo
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    src=$stage/src
    mkdir -p "$src"
    while IFS= read -r -d '' f; do
        if [[ -e $repo/$f ]]; then printf '%s\0' "$f"; fi  # not one deleted in the work tree
    done < <(git -C "$repo" ls-files -z --cached --others --exclude-standard) \
        | tar -C "$repo" --null -T - -cf - | tar -C "$src" -xf -
fi
"$py" -m pip wheel --quiet --no-deps -w "$stage/self" "$src" >&2 \
    || fail "building rapido's wheel failed (pip wheel --no-deps $repo)"
self=$(find "$stage/self" -name 'rapido-*.whl' -print -quit)
[[ -n $self ]] || fail "pip wheel made no rapido-*.whl"

# Requires-Dist of the wheel for the extras asked, markers evaluated here, torch dropped.
"$py" - "$self" "$extras" >"$stage/requirements.in" <<'EOF' || exit 2
import email.parser
import re
import sys
import zipfile

from pip._vendor.packaging.requirements import Requirement

wheel, extras = sys.argv[1], [e for e in sys.argv[2].split(",") if e]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    meta = email.parser.HeaderParser().parsestr(z.read(name).decode())
known = meta.get_all("Provides-Extra") or []
for e in extras:
    if e not in known:
        sys.exit(f"wheelhouse: --extras: rapido has no extra {e!r} (it has: {', '.join(known)})")
for line in meta.get_all("Requires-Dist") or []:
    req = Requirement(line)
    if req.marker is not None and not any(
            req.marker.evaluate({"extra": e}) for e in (extras or [""])):
        continue
    if re.sub(r"[-_.]+", "-", req.name).lower() == "torch":
        continue  # the host's own (CUDA) torch is used
    req.marker = None
    print(req)
EOF

# -- resolve once, download ----------------------------------------------------------------
echo "== downloading for cp${pyver/./} ${platforms[0]}: $(paste -sd' ' "$stage/requirements.in")" >&2
"$py" -m pip download --quiet --disable-pip-version-check "${target[@]}" \
    -d "$stage/wheels" -r "$stage/requirements.in" >&2 \
    || fail "pip download failed (above): a dependency without a binary wheel for" \
        "Python $pyver on ${platforms[0]}, or no package index reachable"
cp "$self" "$stage/wheels/"

# -- checks: binary wheels only, one version of each, no torch -----------------------------
declare -A seen=()
pins=()
for f in "$stage/wheels"/*; do
    base=${f##*/}
    [[ $base == *.whl ]] || fail "not a wheel: $base (only binary wheels belong in a wheelhouse)"
    IFS=- read -r dist version _ <<<"$base"
    norm=$(tr '[:upper:]_.' '[:lower:]--' <<<"$dist")
    case $norm in
        torch | triton | nvidia-*)
            fail "$base is in the wheelhouse: a dependency pulls $norm, which must come from the host" ;;
    esac
    [[ -z ${seen[$norm]:-} ]] || fail "two versions of $norm: ${seen[$norm]} and $version"
    seen[$norm]=$version
    pins+=("$norm==$version")
done
((${#pins[@]} > 1)) || fail "no dependencies were downloaded"

# -- in place --------------------------------------------------------------------------------
rm -f "$out"/*.whl "$out/requirements.txt"
mv "$stage/wheels"/*.whl "$out/"
{
    echo "# rapido's wheelhouse for cp${pyver/./} ${platforms[0]}, extras '${extras}' (made by scripts/wheelhouse.sh)"
    echo "# torch is not here: the host's own is used (pip install --no-index --find-links .)"
    printf '%s\n' "${pins[@]}" | sort
} >"$out/requirements.txt"
rm -rf "$stage"
size=$(du -sh "$out" | cut -f1)
echo "$me: wrote ${#pins[@]} wheels ($size) to $out for Python $pyver on ${platforms[0]}; pins in $out/requirements.txt"
