#!/usr/bin/env bash
# Run one command inside a cgroup v1 memory group capped at CAP bytes, cold page cache.
#   sudo scripts/run_capped.sh CAP_BYTES command args...
# Prints the group's peak usage (page cache included) and whether the limit was hit.
set -euo pipefail
cap=$1; shift
root=/sys/fs/cgroup/memory
[ -w "$root" ] || { echo "needs root and a cgroup v1 memory controller at $root" >&2; exit 2; }
group=$root/mlx_flash_capped_$$
mkdir "$group"
trap 'rmdir "$group" 2>/dev/null || true' EXIT
echo "$cap" > "$group/memory.limit_in_bytes"
sync; echo 3 > /proc/sys/vm/drop_caches
status=0
sh -c "echo \$\$ > $group/cgroup.procs; exec \"\$@\"" sh "$@" || status=$?
echo "cgroup: cap $cap B, peak usage $(cat "$group/memory.max_usage_in_bytes") B, limit hit \
$(cat "$group/memory.failcnt") times, exit status $status" >&2
exit $status
