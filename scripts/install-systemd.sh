#!/usr/bin/env bash
# Install rapido as systemd services: one instance per GPU (rapido@0 .. rapido@N-1),
# all under rapido.target. Idempotent: run it again after adding or removing GPUs or
# after updating the unit files; it changes only what differs.
#
#   sudo scripts/install-systemd.sh              # install + enable (start: systemctl start rapido.target)
#   sudo scripts/install-systemd.sh --now        # ... and start what is not running
#   scripts/install-systemd.sh --dry-run         # print what it would do, change nothing
#   scripts/install-systemd.sh --root /tmp/stage --gpus 4   # into a staging root (tests)
#   sudo scripts/install-systemd.sh --cluster-addr 10.0.0.5  # ... each instance in a cluster
#
# What it installs (ROOT is / unless --root; PREFIX is /opt/rapido unless --prefix):
#   ROOT/etc/systemd/system/rapido@.service   the template (/opt/rapido replaced by PREFIX)
#   ROOT/etc/systemd/system/rapido.target     all instances
#   ROOT/etc/rapido/rapido.env                from systemd/rapido.env.example, if absent
#   ROOT/PREFIX/bin/rapido-instance           the ExecStart wrapper (ports by index)
#   ROOT/etc/systemd/system/rapido-serf@.service  a Serf agent per instance (cluster only)
#   ROOT/etc/rapido/serf-keyring.json         the cluster's Serf keyring, if absent: a JSON
#                                             list of one random base64 32-byte key, 0600,
#                                             owned by rapido; never overwritten
# and enables rapido@I.service for every GPU I (as `nvidia-smi -L` lists them, or
# --gpus N) plus rapido.target; instances beyond the GPU count are disabled.
#
# Cluster (README.md, "Many nodes"): --cluster-addr IP (this machine's address the other
# machines reach) gives every instance I a Serf agent of its own unit, rapido-serf@I, at a
# higher CPU priority than the media work:
#   ROOT/etc/rapido/serf@I.json               the agent's config, if absent (never
#                                             overwritten): node_name NAME-I, bind
#                                             IP:7946+I, rpc_addr 127.0.0.1:7373+I, a random
#                                             rpc_auth, the keyring; 0640 root:rapido
#   ROOT/etc/systemd/system/rapido@I.service.d/20-serf-agent.conf
#                                             Wants=rapido-serf@I; RAPIDO_SERF_RPC,
#                                             RAPIDO_SERF_RPC_AUTH_FILE, RAPIDO_NODE_ID=NAME-I
# NAME is --node-name NAME, default this host's short name. The drop-in follows the agent
# config (its node_name and rpc_addr): written while /etc/rapido/serf@I.json exists (later
# runs need no --cluster-addr), removed once it is gone. Join the others with RAPIDO_JOIN
# in /etc/rapido/rapido.env.
# Every machine of a cluster needs the same keyring: --keyring FILE installs a copy of the
# first machine's (where none is yet); a different one already there is an error.
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
    echo "options: --dry-run  --root DIR  --prefix DIR (default /opt/rapido)  --gpus N  --now"
    echo "         --cluster-addr IP  --node-name NAME  --keyring FILE  -h"
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
cluster_addr=""
node_name=""
keyring_src=""
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
        --cluster-addr) [[ $# -ge 2 ]] || die "--cluster-addr needs an IP address"; cluster_addr=$2; shift ;;
        --cluster-addr=*) cluster_addr=${1#*=} ;;
        --node-name) [[ $# -ge 2 ]] || die "--node-name needs a name"; node_name=$2; shift ;;
        --node-name=*) node_name=${1#*=} ;;
        --keyring) [[ $# -ge 2 ]] || die "--keyring needs a file"; keyring_src=$2; shift ;;
        --keyring=*) keyring_src=${1#*=} ;;
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

# The gossip address: an IP literal (Serf binds it; the other machines reach it).
if [[ -n $cluster_addr ]]; then
    if [[ $cluster_addr =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
        gossip_host=$cluster_addr
    elif [[ $cluster_addr =~ ^[0-9A-Fa-f:]+$ && $cluster_addr == *:* ]]; then
        gossip_host="[$cluster_addr]"
    else
        die "--cluster-addr '$cluster_addr' must be this machine's IP address (not a name)"
    fi
    case $cluster_addr in
        0.0.0.0 | :: | 127.* | ::1) die "--cluster-addr $cluster_addr: give the address the other machines reach" ;;
    esac
fi
if [[ -z $node_name ]]; then
    node_name=${HOSTNAME%%.*}  # the short host name (bash sets HOSTNAME)
    node_name=${node_name//[^A-Za-z0-9_.-]/-}
fi
# Node ids are 1-64 of A-Z a-z 0-9 _ . - starting alphanumeric, and "-I" is appended.
[[ $node_name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$ ]] \
    || die "--node-name '$node_name': 1-60 of A-Z a-z 0-9 _ . -, starting alphanumeric"
if [[ -n $keyring_src ]]; then
    [[ -r $keyring_src ]] || die "--keyring '$keyring_src' cannot be read"
    # A JSON list of base64 keys, as serf-keyring.json holds (the node checks each key).
    grep -Eqz '^[[:space:]]*\[[[:space:]]*"[A-Za-z0-9+/=]{22,}"([[:space:]]*,[[:space:]]*"[A-Za-z0-9+/=]{22,}")*[[:space:]]*\][[:space:]]*$' "$keyring_src" \
        || die "--keyring '$keyring_src' is not a Serf keyring (a JSON list of base64 keys)"
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

# -- the cluster -------------------------------------------------------------------------
serf_bin=$(command -v serf || true)
if [[ -z $serf_bin ]]; then
    serf_bin=/usr/bin/serf
    if [[ -n $cluster_addr ]]; then
        echo "$me: note: serf is not installed; rapido-serf@ runs $serf_bin (Debian: apt install serf)" >&2
    fi
fi
sed "s|/usr/bin/serf|$serf_bin|g" "$src_units/rapido-serf@.service" >"$tmp/rapido-serf@.service"
install_file "$tmp/rapido-serf@.service" "$unit_dir/rapido-serf@.service" 0644

# chown_service FILE OWNER:GROUP: on the running system only (a staging root has no user).
chown_service() {
    if [[ -z $root ]]; then run chown "$2" "$1"; fi
}

keyring=$conf_dir/serf-keyring.json
if [[ -e $keyring ]]; then
    if [[ -n $keyring_src ]] && ! cmp -s "$keyring_src" "$keyring"; then
        die "$keyring exists and differs from --keyring $keyring_src; it is never overwritten (remove it first to replace it, on every node at once)"
    fi
    echo "  kept: $keyring (never overwritten)"
else
    if [[ -n $keyring_src ]]; then
        cp "$keyring_src" "$tmp/serf-keyring.json"
    else
        # 32 random bytes, base64: what `serf keygen` prints.
        printf '["%s"]\n' "$(head -c 32 /dev/urandom | base64 -w 0)" >"$tmp/serf-keyring.json"
    fi
    run install -D -m 0600 "$tmp/serf-keyring.json" "$keyring"
    chown_service "$keyring" rapido:rapido
    if [[ -z $keyring_src && $dry_run == 0 ]]; then
        echo "$me: made the cluster's Serf keyring $keyring. Every machine of the cluster needs"
        echo "  this same file: copy it to the others before you install there, e.g."
        echo "    scp $keyring other-host:/tmp/serf-keyring.json"
        echo "    ssh other-host sudo $0 --keyring /tmp/serf-keyring.json --cluster-addr THEIR_IP"
        echo "  (then delete the copy in /tmp). Keep it secret: it decrypts the gossip."
    fi
fi

# json_string FILE KEY: the string value of KEY in the JSON file (as the installer wrote
# it, or reformatted), empty if there is none.
json_string() {
    local match
    match=$(grep -o "\"$2\"[[:space:]]*:[[:space:]]*\"[^\"]*\"" "$1" | head -n 1) || true
    match=${match%\"}
    printf '%s' "${match##*\"}"
}

agents=()
for i in "${instances[@]}"; do
    agent_conf=$conf_dir/serf@$i.json
    dropin_dir=$unit_dir/rapido@$i.service.d
    have_agent=0
    if [[ -e $agent_conf ]]; then
        echo "  kept: $agent_conf (never overwritten)"
        # The drop-in follows the agent's config as it is, whatever this run was given.
        agent_name=$(json_string "$agent_conf" node_name)
        agent_rpc=$(json_string "$agent_conf" rpc_addr)
        [[ -n $agent_name && -n $agent_rpc ]] \
            || die "$agent_conf: no node_name or rpc_addr in it (fix it, or remove it to have it written again)"
        have_agent=1
    elif [[ -n $cluster_addr ]]; then
        agent_name=$node_name-$i
        agent_rpc=127.0.0.1:$((7373 + i))
        token=$(head -c 24 /dev/urandom | base64 -w 0 | tr '+/' '-_')
        cat >"$tmp/serf@$i.json" <<EOF
{
  "node_name": "$agent_name",
  "bind": "$gossip_host:$((7946 + i))",
  "rpc_addr": "$agent_rpc",
  "rpc_auth": "$token",
  "keyring_file": "/etc/rapido/serf-keyring.json",
  "profile": "lan",
  "leave_on_terminate": true,
  "log_level": "warn"
}
EOF
        # Read by the agent and by the node (its rpc_auth), both running as rapido.
        run install -D -m 0640 "$tmp/serf@$i.json" "$agent_conf"
        chown_service "$agent_conf" root:rapido
        have_agent=1
    fi
    if [[ $have_agent == 1 ]]; then
        agents+=("rapido-serf@$i.service")
        cat >"$tmp/20-serf-agent.conf" <<EOF
# Written by scripts/install-systemd.sh while /etc/rapido/serf@$i.json exists; removed by it
# once that file is gone. rapido@$i uses the Serf agent of rapido-serf@$i.service (its
# config: /etc/rapido/serf@$i.json, whose node_name and rpc_addr these are).
[Unit]
Wants=rapido-serf@$i.service

[Service]
Environment=RAPIDO_SERF_RPC=$agent_rpc
Environment=RAPIDO_SERF_RPC_AUTH_FILE=/etc/rapido/serf@$i.json
Environment=RAPIDO_NODE_ID=$agent_name
EOF
        install_file "$tmp/20-serf-agent.conf" "$dropin_dir/20-serf-agent.conf" 0644
    else
        if [[ -e $dropin_dir/20-serf-agent.conf ]]; then
            run rm -f "$dropin_dir/20-serf-agent.conf"
            run rmdir --ignore-fail-on-non-empty "$dropin_dir"
            changed=1
        fi
        if compgen -G "$conf_dir/serf@*.json" >/dev/null; then
            echo "$me: note: rapido@$i has no Serf agent config ($agent_conf): run again" \
                "with --cluster-addr IP to make one" >&2
        fi
    fi
done

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

if [[ ${#agents[@]} -gt 0 ]]; then
    echo "$me: Serf agents: ${agents[*]} (started with their instance; join the cluster" \
        "with RAPIDO_JOIN in $conf_dir/rapido.env)"
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
