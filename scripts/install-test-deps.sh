#!/usr/bin/env bash
# The system tools the test suite runs for real, in one place: `make test` calls this
# (it installs only as root, and only what is missing), `.ci/run` calls it too and then
# requires every tool (RAPIDO_TEST_REQUIRE_SYSTEM_TOOLS=1). A test whose tool is missing
# otherwise skips and names the package (tests/conftest.py: system_tool).
#
#   scripts/install-test-deps.sh           install what is missing (root), else list it
#   scripts/install-test-deps.sh --check   list what is missing; exit 1 if anything is
#
# tests/conftest.py reads TOOLS from this file: one list, keep its one-entry-a-line form.
set -euo pipefail

# command -> Debian package
TOOLS=(
  "systemd-analyze:systemd"   # tests/test_deploy.py: the unit files verify
  "systemctl:systemd"         # tests/test_deploy.py: the installer enables units
  "nginx:nginx"               # tests/test_deploy.py: the example front door passes nginx -t
  "openssl:openssl"           # tests/test_deploy.py: a test certificate for that config
  "shellcheck:shellcheck"     # tests/test_deploy.py: the deployment scripts
  "chromium:chromium"         # tests/test_viewer.py: the viewer page in a real browser
  "serf:serf"                 # tests/test_serf.py: the gossip agent the cluster runs on
  "nft:nftables"              # tests/test_cluster_faults.py: loss, partitions, counters
  "unshare:util-linux"        # tests/test_cluster_faults.py: a network namespace per test
  "setpriv:util-linux"        # tests/test_cluster_faults.py: a group id per partitioned agent
)

check_only=0
case "${1:-}" in
  --check) check_only=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

found() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

missing_cmds=()
missing_pkgs=()
for entry in "${TOOLS[@]}"; do
  cmd=${entry%%:*}
  pkg=${entry#*:}
  if ! found "$cmd"; then
    missing_cmds+=("$cmd")
    [[ " ${missing_pkgs[*]} " == *" $pkg "* ]] || missing_pkgs+=("$pkg")
  fi
done

if ((${#missing_pkgs[@]} == 0)); then
  exit 0
fi
if ((check_only)); then
  echo "missing test tools: ${missing_cmds[*]} (Debian packages: ${missing_pkgs[*]})"
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "note: the tests that need ${missing_cmds[*]} will skip; as root, or with" \
       "'sudo apt-get install -y ${missing_pkgs[*]}', they run" >&2
  exit 0
fi
echo "installing test tools: ${missing_pkgs[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >/dev/null
