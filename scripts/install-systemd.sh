#!/usr/bin/env bash
# Install rapido as systemd services: one instance per GPU (rapido@0 .. rapido@N-1),
# all under rapido.target. Idempotent: run it again after adding or removing GPUs or
# after updating the unit files; it changes only what differs.
#
#   sudo scripts/install-systemd.sh              # install + enable (start: systemctl start rapido.target)
#   sudo scripts/install-systemd.sh --now        # ... and start what is not running
#   scripts/install-systemd.sh --dry-run         # print what it would do, change nothing
#   scripts/install-systemd.sh --root /tmp/stage --gpus 4   # into a staging root (tests)
#
# What it installs (ROOT is / unless --root; PREFIX is /opt/rapido unless --prefix):
#   ROOT/etc/systemd/system/rapido@.service   the template (/opt/rapido replaced by PREFIX)
#   ROOT/etc/systemd/system/rapido.target     all instances
#   ROOT/etc/rapido/rapido.env                from systemd/rapido.env.example, if absent
#   ROOT/PREFIX/bin/rapido-instance           the ExecStart wrapper (ports by index)
# and enables rapido@I.service for every GPU I (as `nvidia-smi -L` lists them, or
# --gpus N) plus rapido.target; instances beyond the GPU count are disabled.
#
# No GPU: exactly one instance, rapido@0, on the CPU (port RAPIDO_BASE_PORT+0). The drop-in
# ROOT/etc/systemd/system/rapido@0.service.d/10-cpu-only.conf sets CUDA_VISIBLE_DEVICES=
# (empty) and RAPIDO_DEVICE=cpu; it is removed again once the host has a GPU. (Settings in
# /etc/rapido/rapido.env or rapido@0.env still win over it.)
#
# The virtual environment is not made here: PREFIX/.venv must hold rapido, e.g.
#   python3 -m venv /opt/rapido/.venv && /opt/rapido/.venv/bin/pip install /path/to/rapido
#
# Without --root it also creates the system user and group `rapido` (home /var/lib/rapido,
# no login) and runs systemctl daemon-reload / enable. With --root it never touches the
# running system: systemctl --root=ROOT only edits symlinks under ROOT (or, without
# systemctl, it makes the same symlinks itself).
set -euo pipefail

me=install-systemd
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src_units=$(cd "$here/../systemd" && pwd)

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    echo "options: --dry-run  --root DIR  --prefix DIR (default /opt/rapido)  --gpus N  --now  -h"
}

die() {
    echo "$me: $*" >&2
    exit 2
}

dry_run=0
root=""
prefix=/opt/rapido
gpus=""
start_now=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) dry_run=1 ;;
        --root) [[ $# -ge 2 ]] || die "--root needs a directory"; root=$2; shift ;;
        --root=*) root=${1#*=} ;;
        --prefix) [[ $# -ge 2 ]] || die "--prefix needs a directory"; prefix=$2; shift ;;
        --prefix=*) prefix=${1#*=} ;;
        --gpus) [[ $# -ge 2 ]] || die "--gpus needs a number"; gpus=$2; shift ;;
        --gpus=*) gpus=${1#*=} ;;
        --now) start_now=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

# PREFIX goes into ExecStart= and a sed replacement: keep it to plain path characters.
[[ $prefix =~ ^/[A-Za-z0-9._/+-]*$ ]] \
    || die "--prefix '$prefix' must be an absolute path of letters, digits and ._/+-"
prefix=${prefix%/}
[[ -n $prefix ]] || die "--prefix must not be /"
if [[ -n $root ]]; then
    [[ $root == /* ]] || root=$PWD/$root
    root=${root%/}
    [[ -n $root ]] || die "--root / is the running system: leave --root out"
    if [[ $start_now == 1 ]]; then die "--now cannot start services in a staging --root"; fi
else
    if [[ $dry_run == 0 && $EUID -ne 0 ]]; then die "run as root (or use --dry-run / --root DIR)"; fi
fi

# Every change goes through run: printed always, executed unless --dry-run.
run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ $dry_run == 0 ]]; then "$@"; fi
}

# -- how many GPUs ---------------------------------------------------------------------
if [[ -n $gpus ]]; then
    [[ $gpus =~ ^(0|[1-9][0-9]{0,2})$ ]] || die "--gpus '$gpus' must be a number 0..999"
elif command -v nvidia-smi >/dev/null 2>&1; then
    if listing=$(nvidia-smi -L 2>/dev/null); then
        gpus=$(grep -c '^GPU ' <<<"$listing" || true)
    else
        echo "$me: nvidia-smi -L failed (driver not loaded?): installing the CPU instance" >&2
        gpus=0
    fi
else
    gpus=0
fi
if [[ $gpus == 0 ]]; then
    instances=(0)
    echo "$me: no GPU: one CPU instance, rapido@0"
else
    instances=()
    for ((i = 0; i < gpus; i++)); do instances+=("$i"); done
    echo "$me: $gpus GPU(s): rapido@0$( ((gpus > 1)) && echo " .. rapido@$((gpus - 1))")"
fi

unit_dir=$root/etc/systemd/system
conf_dir=$root/etc/rapido
bin_dir=$root$prefix/bin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# install_file SRC DEST MODE: write DEST when it differs from SRC (or is missing).
changed=0
install_file() {
    local src=$1 dest=$2 mode=$3
    if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
        if [[ $(stat -c %a "$dest") != "${mode#0}" ]]; then run chmod "$mode" "$dest"; fi
        echo "  unchanged: $dest"
        return
    fi
    run install -D -m "$mode" "$src" "$dest"
    changed=1
}

# -- the user ----------------------------------------------------------------------------
if [[ -z $root ]]; then
    if ! getent group rapido >/dev/null; then run groupadd --system rapido; fi
    if ! getent passwd rapido >/dev/null; then
        run useradd --system --gid rapido --home-dir /var/lib/rapido --no-create-home \
            --shell /usr/sbin/nologin --comment "rapido media server" rapido
    fi
fi

# -- files -------------------------------------------------------------------------------
sed "s|/opt/rapido|$prefix|g" "$src_units/rapido@.service" >"$tmp/rapido@.service"
install_file "$tmp/rapido@.service" "$unit_dir/rapido@.service" 0644
install_file "$src_units/rapido.target" "$unit_dir/rapido.target" 0644
install_file "$here/rapido-instance" "$bin_dir/rapido-instance" 0755

if [[ -e $conf_dir/rapido.env ]]; then
    echo "  kept: $conf_dir/rapido.env (never overwritten)"
else
    # 0600 root: systemd reads EnvironmentFile= as root, and it holds the API key.
    run install -D -m 0600 "$src_units/rapido.env.example" "$conf_dir/rapido.env"
fi

dropin=$unit_dir/rapido@0.service.d/10-cpu-only.conf
if [[ $gpus == 0 ]]; then
    cat >"$tmp/10-cpu-only.conf" <<'EOF'
# Written by scripts/install-systemd.sh on a host without a GPU; removed by it once the
# host has one. rapido@0 then runs the model on the CPU.
[Service]
Environment=CUDA_VISIBLE_DEVICES=
Environment=RAPIDO_DEVICE=cpu
EOF
    install_file "$tmp/10-cpu-only.conf" "$dropin" 0644
elif [[ -e $dropin ]]; then
    run rm -f "$dropin"
    run rmdir --ignore-fail-on-non-empty "${dropin%/*}"
    changed=1
fi

if [[ ! -x $root$prefix/.venv/bin/python ]]; then
    echo "$me: note: $root$prefix/.venv/bin/python is missing; create the venv before" \
        "starting: python3 -m venv $prefix/.venv && $prefix/.venv/bin/pip install <rapido>" >&2
fi

# -- enable ------------------------------------------------------------------------------
want=()
for i in "${instances[@]}"; do want+=("rapido@$i.service"); done
stale=()
for link in "$unit_dir"/rapido.target.wants/rapido@*.service; do
    [[ -e $link || -L $link ]] || continue
    name=${link##*/}
    keep=0
    for w in "${want[@]}"; do [[ $name == "$w" ]] && keep=1; done
    if [[ $keep == 0 ]]; then stale+=("$name"); fi
done

if [[ -n $root ]]; then
    if command -v systemctl >/dev/null 2>&1; then
        if [[ ${#stale[@]} -gt 0 ]]; then run systemctl --root="$root" disable "${stale[@]}"; fi
        run systemctl --root="$root" enable "${want[@]}" rapido.target
    else
        # What systemctl enable does for these units: the [Install] WantedBy= links.
        for name in "${stale[@]}"; do run rm -f "$unit_dir/rapido.target.wants/$name"; done
        for name in "${want[@]}"; do
            run mkdir -p "$unit_dir/rapido.target.wants"
            run ln -sfn /etc/systemd/system/rapido@.service "$unit_dir/rapido.target.wants/$name"
        done
        run mkdir -p "$unit_dir/multi-user.target.wants"
        run ln -sfn /etc/systemd/system/rapido.target "$unit_dir/multi-user.target.wants/rapido.target"
    fi
else
    run systemctl daemon-reload
    if [[ ${#stale[@]} -gt 0 ]]; then run systemctl disable --now "${stale[@]}"; fi
    run systemctl enable "${want[@]}" rapido.target
    if [[ $start_now == 1 ]]; then
        run systemctl start rapido.target
    fi
fi

if [[ $dry_run == 1 ]]; then
    echo "$me: dry run: nothing was changed"
elif [[ -z $root ]]; then
    if [[ $start_now == 0 ]]; then echo "$me: start with: systemctl start rapido.target"; fi
    if [[ $changed == 1 ]]; then
        echo "$me: unit files changed: running instances pick them up on their next" \
            "restart (systemctl restart rapido.target drains each first)"
    fi
fi
echo "$me: done"
