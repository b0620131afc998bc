#!/usr/bin/env bash
# Run one command inside a cgroup v1 memory group capped at CAP, cold page cache.
#   sudo scripts/run_capped.sh CAP command args...     CAP: bytes, or 235MiB / 1GiB / 512MB
# Prints the group's peak usage (page cache included), how often the limit was hit (each hit is
# a reclaim of page cache, not a kill) and how many processes the kernel OOM-killed (exit 137).
set -euo pipefail
cap=$(python3 -c "import re,sys; m=re.fullmatch(r'([0-9.]+)\s*([kmgt]?i?b?)', sys.argv[1].lower()) \
or sys.exit(f'CAP {sys.argv[1]!r}: bytes or a size like 235MiB'); u=m.group(2).rstrip('b'); \
print(int(float(m.group(1)) * ({'': 1, 'k': 1e3, 'm': 1e6, 'g': 1e9, 't': 1e12}[u] if 'i' not in u \
else 1024 ** ' kmgt'.index(u[0]))))" "$1"); shift
root=/sys/fs/cgroup/memory
[ -w "$root" ] || { echo "needs root and a cgroup v1 memory controller at $root" >&2; exit 2; }
group=$root/mlx_flash_capped_$$
mkdir "$group"
trap 'rmdir "$group" 2>/dev/null || true' EXIT
echo "$cap" > "$group/memory.limit_in_bytes"
sync; echo 3 > /proc/sys/vm/drop_caches
status=0
sh -c "echo \$\$ > $group/cgroup.procs; exec \"\$@\"" sh "$@" || status=$?
kills=$(awk '$1 == "oom_kill" {print $2}' "$group/memory.oom_control")
echo "cgroup: cap $cap B, peak usage $(cat "$group/memory.max_usage_in_bytes") B, limit hit \
$(cat "$group/memory.failcnt") times, oom kills ${kills:-?}, exit status $status" >&2
exit $status
