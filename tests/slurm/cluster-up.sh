#!/usr/bin/env bash
# Brings up a one-node SLURM on this machine for the integration tests: munge, MariaDB,
# slurmdbd (so sacct works, as on every real cluster), slurmctld and slurmd, with one partition
# over the machine's cores. Idempotent: a cluster that already answers is reused.
# Needs root and apt (Debian's slurm-wlm); exits 3 with a reason where it cannot run.
set -euo pipefail

log() { echo "slurm-harness: $*" >&2; }
# The last line on stderr is what the tests report as the reason: make it say what failed.
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

if sinfo -h -o %T >/dev/null 2>&1 && sacct -n -X -S now-1minutes >/dev/null 2>&1; then
  log "cluster already up: $(sinfo -h -o '%P %D %T' | head -1)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then log "not root: cannot install or start SLURM"; exit 3; fi
if ! command -v apt-get >/dev/null; then log "no apt-get: cannot install SLURM"; exit 3; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  log "installing slurm-wlm, slurmdbd, munge, mariadb-server (log: /tmp/slurm-harness-apt.log)"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server; } >/tmp/slurm-harness-apt.log 2>&1; then
    tail -5 /tmp/slurm-harness-apt.log >&2
    log "apt-get install failed"
    exit 3
  fi
fi

host=$(hostname)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
etc=/etc/slurm
mkdir -p "$etc" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge /var/lib/munge /var/log/munge
chown slurm:slurm /var/spool/slurmctld /var/log/slurm
chown munge:munge /etc/munge /var/lib/munge /var/log/munge

# munge: every daemon and client authenticates through it.
if [ ! -s /etc/munge/munge.key ]; then
  (mungekey --create 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null)
fi
chown munge:munge /etc/munge/munge.key /run/munge; chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force
  sleep 1
fi

# MariaDB for slurmdbd's accounting.
if ! mariadb -e 'select 1' >/dev/null 2>&1; then
  mkdir -p /run/mysqld /etc/mysql/conf.d; chown mysql:mysql /run/mysqld
  if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/var/log/slurm/mariadb-install.log 2>&1
  fi
  (mariadbd-safe >/var/log/slurm/mariadb.log 2>&1 &)
  for _ in $(seq 60); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 1; done
  mariadb -e 'select 1' >/dev/null 2>&1 || { log "MariaDB did not start: see /var/log/slurm/mariadb.log"; exit 3; }
fi
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

cat > "$etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
CONF
chown slurm:slurm "$etc/slurmdbd.conf"; chmod 600 "$etc/slurmdbd.conf"

cat > "$etc/slurm.conf" <<CONF
ClusterName=dprhpc
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
# A requeued job is eligible again ~11 s after the requeue instead of ~121 s.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
# MaxRSS is sampled: at 1 s every stage job (>= 5 s of imports) is sampled, so sacct has its peak.
JobAcctGatherFrequency=1
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
MpiDefault=none
MinJobAge=300
KillWait=5
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

if ! pgrep -x slurmdbd >/dev/null; then slurmdbd; fi
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 1; done
sacctmgr -n list cluster >/dev/null 2>&1 || { log "slurmdbd did not answer: see /var/log/slurm/slurmdbd.log"; exit 3; }
sacctmgr -n list cluster format=cluster | grep -qw dprhpc || sacctmgr -i add cluster dprhpc >/dev/null
if ! pgrep -x slurmctld >/dev/null; then slurmctld; fi
if ! pgrep -x slurmd >/dev/null; then slurmd; fi
for _ in $(seq 60); do
  state=$(sinfo -h -o %T 2>/dev/null | head -1)
  case "$state" in idle*|mixed*|alloc*) break ;; esac
  sleep 1
done
scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
if ! sacct -n -X -S now-1minutes >/dev/null 2>&1; then
  log "the cluster started but sacct does not answer: see /var/log/slurm/slurmctld.log"; exit 3
fi
log "cluster up: $(sinfo -h -o '%P %D %T %c cpus' | head -1)"
