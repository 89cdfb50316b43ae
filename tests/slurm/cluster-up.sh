#!/usr/bin/env bash
# Brings up the integration tests' own SLURM on this machine: munged, MariaDB, slurmdbd (so sacct
# works, as on every real cluster), slurmctld, and N slurmd nodes named node1..nodeN.
#
#   tests/slurm/cluster-up.sh [--nodes N]      (default 1: the fastest to start)
#   SLURM_CONF=/etc/slurm-dprhpc/slurm.conf sinfo -N
#   tests/slurm/cluster-down.sh
#
# Each node is a slurmd in its own network, UTS (hostname), PID and mount namespace, joined to the
# controller by a veth pair on a bridge; every node shares this machine's filesystem, as a
# cluster's nodes share NFS. The cluster is entirely its own (cluster-env.sh): it never reuses a
# SLURM that merely answers, which could be a site's, only one that this script started (its
# marker file, its ClusterName, its controller's pid). Installs Debian's slurm-wlm where missing.
# Needs root; exits 3 with a reason on its last stderr line where it cannot run.
# The last stdout line is SLURM_CONF=<path>, for the tests' environment.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/cluster-env.sh"
# The last line on stderr is what the tests report as the reason: make it say what failed.
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

nodes=1
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=${2:-}; shift 2 ;;
    --nodes=*) nodes=${1#--nodes=}; shift ;;
    *) log "unknown argument $1 (usage: cluster-up.sh [--nodes N])"; exit 2 ;;
  esac
done
case "$nodes" in ''|*[!0-9]*|0) log "--nodes wants a whole number from 1 to 200, not '$nodes'"; exit 2 ;; esac
[ "$nodes" -le 200 ] || { log "--nodes wants a whole number from 1 to 200, not '$nodes'"; exit 2; }

# Ours and whole: the marker names this cluster and its node count, our slurmctld (by its pid
# file) runs, the controller that answers on our port calls itself $CLUSTER_NAME, and every node
# responds.
ours_and_up() {
  grep -qx "ClusterName=$CLUSTER_NAME nodes=$nodes" "$MARKER" 2>/dev/null || return 1
  live_pid "$RUN/slurmctld.pid" >/dev/null || return 1
  local config states
  config=$(scontrol show config 2>/dev/null) || return 1
  grep -Eq "^ClusterName += +$CLUSTER_NAME$" <<<"$config" || return 1
  sacct -n -X -S now-1minutes >/dev/null 2>&1 || return 1
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [ "$(grep -c . <<<"$states")" -eq "$nodes" ] || return 1
  ! grep -Eq '\*|down|unknown|not_responding|fail' <<<"$states"
}

if [ -e "$MARKER" ] && ours_and_up; then
  # A test may have drained a node; the cluster comes back whole.
  for node in $(sinfo -h -N -t drain,drained,draining -o %N 2>/dev/null | sort -u); do
    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
  done
  log "reusing the cluster this script started: $(sinfo -h -o '%P %D %T' | tr '\n' ' ')"
  echo "SLURM_CONF=$SLURM_CONF"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then log "not root: cannot install or start SLURM"; exit 3; fi
for tool in ip nsenter unshare; do
  command -v "$tool" >/dev/null || { log "no $tool here: cannot make the node namespaces"; exit 3; }
done
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v slurmdbd >/dev/null \
   || ! command -v mariadbd >/dev/null || ! command -v munged >/dev/null; then
  if ! command -v apt-get >/dev/null; then log "no apt-get: cannot install SLURM"; exit 3; fi
  log "installing slurm-wlm, slurmdbd, munge, mariadb-server (log: /tmp/slurm-harness-apt.log)"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server; } >/tmp/slurm-harness-apt.log 2>&1; then
    tail -5 /tmp/slurm-harness-apt.log >&2
    log "apt-get install failed"
    exit 3
  fi
fi

# Whatever is left of an earlier start of ours (another node count, a daemon that died) goes first.
"$here/cluster-down.sh" 2>/dev/null

for port in $CTLD_PORT $DBD_PORT $DB_PORT; do
  if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
    log "port $port is taken by a process that is not this test cluster's: stop it or change cluster-env.sh"; exit 3
  fi
done

host=$(hostname)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "$ETC" "$VAR/ctld" "$VAR/spool" "$RUN/munge" "$RUN/mysql" "$LOG/munge" "$VAR/munge"
chmod 755 "$ETC" "$RUN" "$LOG"
touch "$LOG/slurmctld.log" "$LOG/slurmdbd.log"
chown slurm:slurm "$VAR/ctld" "$LOG/slurmctld.log" "$LOG/slurmdbd.log"
chown munge:munge "$RUN/munge" "$LOG/munge" "$VAR/munge"; chmod 700 "$LOG/munge" "$VAR/munge"
chown mysql:mysql "$RUN/mysql"

# munge: our own daemon, key and socket; every daemon and command finds the socket in AuthInfo.
if [ ! -s "$ETC/munge.key" ]; then dd if=/dev/urandom of="$ETC/munge.key" bs=1024 count=1 status=none; fi
chown munge:munge "$ETC/munge.key"; chmod 400 "$ETC/munge.key"
runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$ETC/munge.key" --pid-file="$RUN/munge/munged.pid" \
  --log-file="$LOG/munge/munged.log" --seed-file="$VAR/munge/munged.seed" </dev/null >/dev/null 2>&1
wait_for 30 bash -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'" \
  || { log "munged did not start: see $LOG/munge/munged.log"; exit 3; }

# The bridge first: MariaDB, slurmdbd and slurmctld listen on its address. IPv6 stays off, so
# nothing but our own IPv4 addresses is ever used.
ip link add "$BRIDGE" type bridge
sysctl -qw "net.ipv6.conf.$BRIDGE.disable_ipv6=1"
ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
ip link set "$BRIDGE" up

# MariaDB: an instance of our own (data folder, socket, port), for slurmdbd's accounting.
if [ ! -d "$VAR/mysql/mysql" ]; then
  mkdir -p "$VAR/mysql"; chown mysql:mysql "$VAR/mysql"
  mariadb-install-db --no-defaults --user=mysql --datadir="$VAR/mysql" --auth-root-authentication-method=socket \
    >"$LOG/mariadb-install.log" 2>&1 || { log "mariadb-install-db failed: see $LOG/mariadb-install.log"; exit 3; }
fi
setsid mariadbd --no-defaults --user=mysql --datadir="$VAR/mysql" --socket="$RUN/mysql/mysqld.sock" \
  --pid-file="$RUN/mysql/mysqld.pid" --port="$DB_PORT" --bind-address="$CTL_ADDR" --skip-name-resolve \
  --innodb-buffer-pool-size=64M --log-error="$LOG/mariadb.log" </dev/null >/dev/null 2>&1 &
sql() { mariadb --no-defaults --socket="$RUN/mysql/mysqld.sock" -u root -e "$1"; }
wait_for 60 sql 'select 1' || { log "MariaDB did not start: see $LOG/mariadb.log"; exit 3; }
sql "CREATE USER IF NOT EXISTS 'slurm'@'$CTL_ADDR' IDENTIFIED BY 'slurmdbpass';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'$CTL_ADDR'; FLUSH PRIVILEGES;"

cat > "$ETC/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$host
DbdAddr=$CTL_ADDR
DbdPort=$DBD_PORT
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=$CTL_ADDR
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
CONF
chown slurm:slurm "$ETC/slurmdbd.conf"; chmod 600 "$ETC/slurmdbd.conf"

{
  cat <<CONF
ClusterName=$CLUSTER_NAME
# slurmctld runs in this machine's own namespaces, so it must carry the real hostname; it is
# reached at the bridge's address.
SlurmctldHost=$host($CTL_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=slurm
AuthType=auth/munge
# Our munged's socket. A requeued job is eligible again ~11 s after the requeue, not ~121 s.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTL_ADDR
AccountingStoragePort=$DBD_PORT
# With auth/munge, the munged socket for talking to slurmdbd (AuthInfo's is for slurmctld only).
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
# MaxRSS is sampled: at 1 s every stage job (>= 5 s of imports) is sampled, so sacct has its peak.
JobAcctGatherFrequency=1
# A job killed with its node (or by scontrol requeue) is queued again, as on a real cluster.
JobRequeue=1
SlurmctldPidFile=$RUN/slurmctld.pid
StateSaveLocation=$VAR/ctld
SlurmctldLogFile=$LOG/slurmctld.log
# One spool, pid file and log per node (%n: the node's name).
SlurmdSpoolDir=$VAR/spool/%n
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmdLogFile=$LOG/slurmd-%n.log
ReturnToService=2
MpiDefault=none
MinJobAge=300
KillWait=5
# Every node declares all of this machine's CPUs and memory: with N nodes the CPUs are
# oversubscribed N times over. That is on purpose for a test cluster (its jobs are tiny): each
# node can still run jobs side by side, as a real node would.
CONF
  for k in $(seq "$nodes"); do
    echo "NodeName=node$k NodeHostname=node$k NodeAddr=$(node_addr "$k") CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} > "$ETC/slurm.conf"

slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1
wait_for 60 sacctmgr -n list cluster || { log "slurmdbd did not answer: see $LOG/slurmdbd.log"; exit 3; }
sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER_NAME" || sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
slurmctld </dev/null >>"$LOG/slurmctld.out" 2>&1
wait_for 60 scontrol ping || { log "slurmctld did not answer: see $LOG/slurmctld.log"; exit 3; }

# The nodes: a veth pair each, one end on the bridge, the other in the node's network namespace.
# nsenter keeps /sys (and so /sys/fs/cgroup) visible, which `ip netns exec` would hide; unshare
# then gives the node its own hostname, pid space and /proc. bash is the namespace's first
# process, so it reaps the orphans an init must; killing it kills the whole node.
for k in $(seq "$nodes"); do
  netns=$(node_netns "$k"); veth=$(node_veth "$k")
  ip netns add "$netns"
  ip link add "$veth" type veth peer name eth0 netns "$netns"
  sysctl -qw "net.ipv6.conf.$veth.disable_ipv6=1"
  ip link set "$veth" master "$BRIDGE" up
  nsenter --net="/var/run/netns/$netns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip -n "$netns" addr add "$(node_addr "$k")/24" dev eth0
  ip -n "$netns" link set eth0 up
  ip -n "$netns" link set lo up
  setsid nsenter --net="/var/run/netns/$netns" unshare --uts --pid --mount --fork --mount-proc \
    bash -c "hostname node$k; slurmd -D -N node$k & wait" </dev/null >>"$LOG/node$k.out" 2>&1 &
  echo $! > "$RUN/node$k.pid"
done

all_idle() {
  local states
  states=$(sinfo -h -N -o '%N %T') || return 1
  [ "$(echo "$states" | grep -c ' idle$')" -eq "$nodes" ]
}
if ! wait_for 90 all_idle; then
  log "nodes not idle after 90 s: $(sinfo -h -N -o '%N %T' | tr '\n' ' '); see $LOG/slurmd-node*.log"; exit 3
fi
if ! sacct -n -X -S now-1minutes >/dev/null 2>&1; then
  log "the cluster started but sacct does not answer: see $LOG/slurmctld.log"; exit 3
fi
echo "ClusterName=$CLUSTER_NAME nodes=$nodes" > "$MARKER"
log "cluster up: $(sinfo -h -o '%P %D %T %c cpus' | head -1), nodes $(sinfo -h -N -o %N | tr '\n' ' ')"
echo "SLURM_CONF=$SLURM_CONF"
