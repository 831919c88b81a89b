#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, from Debian's packages (munge, slurmctld, slurmd),
# for development and CI. Needs root (munged runs as the munge user, the SLURM daemons as root).
#
#   slurm/cluster.sh start    # write the config, start munged/slurmctld/slurmd, wait for an idle node
#   slurm/cluster.sh status   # exit 0 when the node answers and is usable
#   slurm/cluster.sh stop     # cancel every job and stop the daemons this script started
#   slurm/cluster.sh env      # print `export SLURM_CONF=...` for the shell
#
# Everything lives under $PF_SLURM_DIR (default /tmp/pf-slurm): slurm.conf, state, spool, logs.
# The config is also installed as /etc/slurm/slurm.conf when that file is absent (or was
# written by this script), so that plain `sinfo`/`sbatch` find it without SLURM_CONF.
# Why these settings: containers have no usable cgroups (proctrack/linuxproc, task/none);
# select/cons_tres lets several 1-CPU jobs share the node; ReturnToService=2 brings the node
# back after a restart instead of leaving it DOWN.
set -euo pipefail

STATE_DIR=${PF_SLURM_DIR:-/tmp/pf-slurm}
CONF="$STATE_DIR/slurm.conf"
SYSTEM_CONF=/etc/slurm/slurm.conf
MARKER="# written by pianoforge slurm/cluster.sh"
PARTITION=${PF_SLURM_PARTITION:-debug}
CTLD_PORT=${PF_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${PF_SLURM_SLURMD_PORT:-6818}
START_TIMEOUT_S=${PF_SLURM_START_TIMEOUT_S:-60}

log() { echo "[pf-slurm] $*" >&2; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
  mkdir -p "$STATE_DIR"/{state,spool,log}
  local host node_line gres_line="" gres_types=""
  host=$(hostname -s)
  # slurmd -C reports this machine's CPUs/sockets/cores/threads/RealMemory in slurm.conf syntax.
  node_line=$(slurmd -C | head -n1 | sed "s/^NodeName=[^ ]*/NodeName=$host/")
  # Leave some memory to the OS so memory requests are honest.
  local mem
  mem=$(echo "$node_line" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  node_line=$(echo "$node_line" | sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/")
  local n_gpus
  n_gpus=$(ls /dev/nvidia[0-9]* 2>/dev/null | wc -l || true)
  if [ "$n_gpus" -gt 0 ]; then
    gres_types="GresTypes=gpu"
    gres_line=" Gres=gpu:$n_gpus"
    echo "Name=gpu File=/dev/nvidia[0-$((n_gpus - 1))]" > "$STATE_DIR/gres.conf"
  fi
  cat > "$CONF.tmp" <<EOF
$MARKER
ClusterName=pianoforge
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
# SIGTERM to SIGKILL: time for a pool job to stop Ray and remove its temp dir (SLURM default)
KillWait=30
MinJobAge=60
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
$gres_types
${node_line}${gres_line} State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  # cgroup.conf is read by some plugins even when cgroups are off; keep it explicit.
  echo "IgnoreSystemd=yes" > "$STATE_DIR/cgroup.conf"
  if [ -w "$(dirname "$SYSTEM_CONF")" ] && { [ ! -e "$SYSTEM_CONF" ] || grep -qF "$MARKER" "$SYSTEM_CONF"; }; then
    cp "$CONF" "$SYSTEM_CONF.tmp" && mv "$SYSTEM_CONF.tmp" "$SYSTEM_CONF"
  fi
}

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
}

node_state() { SLURM_CONF="$CONF" sinfo -h -N -o "%T" 2>/dev/null | head -n1; }

status() {
  pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid" || return 1
  case "$(node_state)" in
    idle|mixed|allocated|completing) return 0 ;;
    *) return 1 ;;
  esac
}

start() {
  if status; then log "already running ($(node_state))"; return 0; fi
  write_config
  start_munge
  export SLURM_CONF="$CONF"
  if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
    log "starting slurmctld"
    /usr/sbin/slurmctld -f "$CONF"
  fi
  if ! pid_alive "$STATE_DIR/slurmd.pid"; then
    log "starting slurmd"
    /usr/sbin/slurmd -f "$CONF"
  fi
  local deadline=$((SECONDS + START_TIMEOUT_S)) state=""
  while [ $SECONDS -lt $deadline ]; do
    state=$(node_state)
    case "$state" in
      idle|mixed|allocated) log "node $state; partition $PARTITION ready"; return 0 ;;
      down*|drain*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  log "node did not become idle within ${START_TIMEOUT_S}s (state: ${state:-none}); logs in $STATE_DIR/log"
  tail -n 20 "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log" >&2 || true
  return 1
}

stop_daemon() {
  local name=$1 pid i
  pid=$(cat "$STATE_DIR/$1.pid" 2>/dev/null) || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  log "stopping $name"
  kill "$pid" 2>/dev/null || true
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  if pid_alive "$STATE_DIR/slurmctld.pid"; then
    SLURM_CONF="$CONF" scancel --full --user="$(id -un)" 2>/dev/null || true
    sleep 1
  fi
  stop_daemon slurmd
  stop_daemon slurmctld
  # munged is shared with anything else on the machine that uses munge: leave it running.
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if status; then echo "running ($(node_state))"; else echo "not running"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
