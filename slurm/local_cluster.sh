#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (for tests and CI): munged + slurmctld + slurmd on
# localhost, SelectType=select/cons_tres, one node, partition "debug".
#   sudo bash slurm/local_cluster.sh install   # Debian packages slurm-wlm and munge (once)
#   sudo bash slurm/local_cluster.sh start     # idempotent; restarts the daemons if the config changed
#   sudo bash slurm/local_cluster.sh stop
# The node advertises at least 16 CPUs and two placeholder GPUs (empty files under $STATE/gpu, no
# device), whatever the machine has (SlurmdParameters=config_overrides), so that the shipped
# scripts' requests (train.sbatch: 8 CPUs; --gpus-per-node or --gres=gpu:N) are scheduled as they
# are; jobs see SLURM_GPUS_ON_NODE, torch finds no CUDA and the ranks train on the CPU.
set -euo pipefail
STATE=${PREFOPT_SLURM_STATE:-/var/tmp/prefopt-slurm}
CONF=/etc/slurm/slurm.conf

install() {
  export DEBIAN_FRONTEND=noninteractive
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  apt-get update -q >/dev/null
  apt-get install -y -q slurm-wlm munge >/dev/null
}

write_conf() {  # into $1; start() compares it with the running config
  local cpus mem
  cpus=$(( $(nproc) > 16 ? $(nproc) : 16 ))
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p "$STATE"/{ctld,d,gpu} /etc/slurm /var/log/slurm
  touch "$STATE"/gpu/gpu0 "$STATE"/gpu/gpu1
  echo "Name=gpu File=$STATE/gpu/gpu[0-1]" > /etc/slurm/gres.conf
  cat > "$1" <<CONF
ClusterName=prefopt
GresTypes=gpu
SlurmdParameters=config_overrides
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
NodeName=localhost CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

start() {
  install
  write_conf "$CONF.new"
  if ! cmp -s "$CONF.new" "$CONF"; then
    mv "$CONF.new" "$CONF"
    stop  # daemons started with another config (an older version of this script)
  else
    rm "$CONF.new"
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
  for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      sinfo
      return 0
    fi
    scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "slurm did not come up; see /var/log/slurm/*.log" >&2
  return 1
}

stop() {
  local daemon
  for daemon in slurmd slurmctld munged; do
    pkill -x "$daemon" || true
    for _ in $(seq 30); do pgrep -x "$daemon" >/dev/null || break; sleep 1; done
  done
}

"${1:-start}"
