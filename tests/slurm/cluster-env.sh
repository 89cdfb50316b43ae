# The test cluster's names, folders, ports and addresses: the one place cluster-up.sh and
# cluster-down.sh read them from (sourced, not run).
#
# Everything here is the test cluster's own, so that it never touches a site's SLURM on the same
# machine: its own SLURM_CONF, ClusterName, ports, munge daemon and key, MariaDB instance, and a
# bridge whose private addresses exist only on that bridge and inside the node namespaces.

CLUSTER_NAME=dprhpctest
ETC=/etc/slurm-dprhpc           # slurm.conf, slurmdbd.conf, munge key, the marker
VAR=/var/lib/slurm-dprhpc       # slurmctld state, slurmd spools, MariaDB data, munge seed
RUN=/run/slurm-dprhpc           # pid files and sockets
LOG=/var/log/slurm-dprhpc
MARKER=$ETC/started-by-dpr-hpc  # written last by cluster-up.sh: this cluster is ours to reuse or stop
export SLURM_CONF=$ETC/slurm.conf

# Ports away from SLURM's defaults (6817-6819) and MariaDB's (3306).
CTLD_PORT=16817
SLURMD_PORT=16818
DBD_PORT=16819
DB_PORT=16306

BRIDGE=dprhpc0
NET_PREFIX=10.217.0             # a private /24 on the bridge and inside the namespaces only
CTL_ADDR=$NET_PREFIX.1          # the bridge's address: slurmctld, slurmdbd and MariaDB listen here
MUNGE_SOCKET=$RUN/munge/munge.socket.2

node_addr() { echo "$NET_PREFIX.$((10 + $1))"; }   # node K's address
node_netns() { echo "dprhpc-node$1"; }
node_veth() { echo "dprhpc-n$1"; }                  # the bridge's end of node K's veth pair

log() { echo "slurm-harness: $*" >&2; }

# Pid of a pid file's process if it still runs, else nothing.
live_pid() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# Waits up to $1 seconds for the command that follows to succeed.
wait_for() {
  local seconds=$1; shift
  for _ in $(seq "$seconds"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  "$@" >/dev/null 2>&1
}
