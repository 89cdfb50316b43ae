#!/usr/bin/env bash
# Stops the test cluster that tests/slurm/cluster-up.sh started: its slurmd nodes (each node's
# namespaces, with every job still running on it), slurmctld, slurmdbd, MariaDB and munged, each
# by the pid file cluster-up.sh wrote in its own folder; then removes the node namespaces, the
# bridge and the marker. It touches nothing else: a site's SLURM on this machine keeps running.
# The state (job ids, accounting) is kept, so job ids keep rising across restarts and never
# meet an earlier job's accounting record.
set -euo pipefail
source "$(dirname "$0")/cluster-env.sh"

# SIGTERM, then SIGKILL after $2 seconds.
stop_pidfile() {
  local file=$1 grace=${2:-30} pid
  pid=$(live_pid "$file") || { rm -f "$file"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq "$grace"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$file"
}

# A node is its pid namespace: killing the namespace's first process kills everything in it,
# as losing the machine would.
for file in "$RUN"/node*.pid; do
  [ -e "$file" ] || continue
  if outer=$(live_pid "$file"); then
    for init in $(cat "/proc/$outer/task/$outer/children" 2>/dev/null); do kill -KILL "$init" 2>/dev/null || true; done
  fi
  stop_pidfile "$file" 10
done
stop_pidfile "$RUN/slurmctld.pid"
stop_pidfile "$RUN/slurmdbd.pid"
stop_pidfile "$RUN/mysql/mysqld.pid" 60
stop_pidfile "$RUN/munge/munged.pid"

for netns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^dprhpc-node[0-9]*$' || true); do
  ip netns delete "$netns"
done
# A namespace outlives its name until its last process is reaped; its veth goes with it, or here.
for veth in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep '^dprhpc-n[0-9]*$' || true); do
  ip link delete "$veth" 2>/dev/null || true
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE"; fi
rm -f "$MARKER" "$RUN"/slurmd-*.pid  # the slurmd pid files hold pids inside the node namespaces
log "cluster $CLUSTER_NAME is down"
