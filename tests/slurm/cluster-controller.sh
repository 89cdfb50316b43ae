#!/usr/bin/env bash
# Stops or starts the test cluster's head: slurmctld and slurmdbd (cluster-up.sh started them),
# as when a head node restarts. The nodes, their jobs, MariaDB and munged keep running.
#   tests/slurm/cluster-controller.sh stop|start
set -euo pipefail
source "$(dirname "$0")/cluster-env.sh"
[ -e "$MARKER" ] || { log "no test cluster of ours is up (no $MARKER): nothing to stop or start"; exit 3; }

stop() {
  local pid
  pid=$(live_pid "$1") || return 0
  kill -TERM "$pid"
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
  kill -KILL "$pid" 2>/dev/null || true
}

case "${1:-}" in
  stop)
    stop "$RUN/slurmctld.pid"
    stop "$RUN/slurmdbd.pid"
    log "slurmctld and slurmdbd stopped"
    ;;
  start)
    live_pid "$RUN/slurmdbd.pid" >/dev/null || slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1
    wait_for 60 sacctmgr -n list cluster || { log "slurmdbd did not answer: see $LOG/slurmdbd.log"; exit 3; }
    live_pid "$RUN/slurmctld.pid" >/dev/null || slurmctld </dev/null >>"$LOG/slurmctld.out" 2>&1
    wait_for 60 scontrol ping || { log "slurmctld did not answer: see $LOG/slurmctld.log"; exit 3; }
    log "slurmctld and slurmdbd running"
    ;;
  *) log "usage: cluster-controller.sh stop|start"; exit 2 ;;
esac
