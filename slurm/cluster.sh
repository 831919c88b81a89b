#!/usr/bin/env bash
# A SLURM cluster on this machine, from Debian's packages (munge, slurmctld, slurmd), for
# development and CI. Needs root (munged runs as the munge user, the SLURM daemons as root).
#
#   slurm/cluster.sh start [--nodes N]  # write the config, start munged/slurmctld/slurmd(s), wait for idle nodes
#   slurm/cluster.sh status   # exit 0 when every node answers and is usable
#   slurm/cluster.sh stop     # cancel every job, stop the daemons and remove the namespaces this script made
#   slurm/cluster.sh env      # print `export SLURM_CONF=...` for the shell
#   slurm/cluster.sh nodes    # (N > 1) one line per node: name, address, network namespace
#   slurm/cluster.sh kill-node K      # (N > 1) SIGKILL every process of node K's namespace (a crashed host)
#   slurm/cluster.sh link K down|up   # (N > 1) cut node K off the network, or plug it back in
#   slurm/cluster.sh host-addr        # (N > 1) the host's address on the bridge: where the head listens
#
# Everything lives under $PF_SLURM_DIR (default /tmp/pf-slurm): slurm.conf, state, spool, logs.
# For the default directory the config is also installed as /etc/slurm/slurm.conf when that
# file is absent (or was written by this script), so that plain `sinfo`/`sbatch` find it
# without SLURM_CONF; a cluster in another directory (and on other ports: PF_SLURM_CTLD_PORT)
# runs beside it and is reached with its own SLURM_CONF.
#
# One node (the default) is this machine itself. N > 1 nodes are N hosts on this machine: each
# node K is a network namespace with its own address on a private bridge (the host's side of
# the bridge is .1, node K is .(10+K) of PF_SLURM_SUBNET, a /24 that no route of this machine
# uses) and its own hostname (a UTS namespace kept in a file), running `slurmd -N nodeK`;
# slurmctld runs on the host and listens on the bridge address. Nodes share the host's file
# system (mounts are not unshared: slurmd needs the host's /sys/fs/cgroup), as cluster nodes
# share a network file system. Nothing leaves the machine: the nodes have no default route.
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
# N > 1: CPUs of each node (default: the machine's split evenly, at least 1).
# Seconds without an answer before slurmctld declares a node DOWN and ends its jobs.
SLURMD_TIMEOUT=${PF_SLURM_SLURMD_TIMEOUT:-60}
NODES_FILE="$STATE_DIR/nodes"  # N of a running multi-node cluster (absent: one node)
# Names of this cluster's namespaces and links: a short hash of the state dir, so clusters in
# different directories never touch each other's.
NET_ID=$(printf %s "$STATE_DIR" | cksum | cut -d' ' -f1)
NET_TAG=pf$(printf %04x $((NET_ID % 65536)))
SUBNET=${PF_SLURM_SUBNET:-10.213.$((NET_ID % 200 + 20))}  # first three octets of the bridge's /24
BRIDGE=${NET_TAG}br
HOST_ADDR=$SUBNET.1

log() { echo "[pf-slurm] $*" >&2; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
  mkdir -p "$STATE_DIR"/{state,spool,log}
  local n=$1 host node_line gres_line="" gres_types="" ctld_host slurmd_paths
  host=$(hostname -s)
  # slurmd -C reports this machine's CPUs/sockets/cores/threads/RealMemory in slurm.conf syntax.
  node_line=$(slurmd -C | head -n1)
  # Leave some memory to the OS so memory requests are honest; N nodes share the machine's.
  local mem
  mem=$(echo "$node_line" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  node_line=$(echo "$node_line" | sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10 / n))/")
  if [ "$n" -eq 1 ]; then
    node_line=$(echo "$node_line" | sed "s/^NodeName=[^ ]*/NodeName=$host/")
    ctld_host=$host
    slurmd_paths="SlurmdSpoolDir=$STATE_DIR/spool
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmdLogFile=$STATE_DIR/log/slurmd.log"
  else
    # The machine's CPUs split among the nodes (at least one each), so that one 1-CPU job
    # fills a small node and jobs spread over nodes as they would on a cluster.
    local k lines="" cpus machine_cpus
    machine_cpus=$(echo "$node_line" | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
    cpus=${PF_SLURM_NODE_CPUS:-$(( machine_cpus / n > 0 ? machine_cpus / n : 1 ))}
    for k in $(seq "$n"); do
      lines+="NodeName=node$k NodeHostname=node$k NodeAddr=$(node_addr "$k") CPUs=$cpus Boards=1 SocketsPerBoard=1"
      lines+=" CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$((mem * 9 / 10 / n))"$'\n'
    done
    node_line=${lines%$'\n'}
    ctld_host="$host($HOST_ADDR)"
    # %n: the node's name, so the slurmds of one machine keep apart
    slurmd_paths="SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log"
  fi
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
SlurmctldHost=$ctld_host
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
SlurmdTimeout=$SLURMD_TIMEOUT
StateSaveLocation=$STATE_DIR/state
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
$slurmd_paths
$gres_types
$(echo "$node_line" | sed "s/\$/${gres_line} State=UNKNOWN/")
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  # cgroup.conf is read by some plugins even when cgroups are off; keep it explicit.
  echo "IgnoreSystemd=yes" > "$STATE_DIR/cgroup.conf"
  if [ "$STATE_DIR" = /tmp/pf-slurm ] && [ -w "$(dirname "$SYSTEM_CONF")" ] \
     && { [ ! -e "$SYSTEM_CONF" ] || grep -qF "$MARKER" "$SYSTEM_CONF"; }; then
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

# --- nodes: one (this machine) or N network namespaces -------------------------------------------

node_count() { cat "$NODES_FILE" 2>/dev/null || echo 1; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }
node_netns() { echo "${NET_TAG}-node$1"; }
node_uts() { echo "$STATE_DIR/ns/node$1.uts"; }
node_pidfile() { if [ "$(node_count)" -eq 1 ]; then echo "$STATE_DIR/slurmd.pid"; else echo "$STATE_DIR/slurmd-node$1.pid"; fi; }
# Run a command on node K: its network and hostname, the host's mounts (and so /sys/fs/cgroup).
on_node() { local k=$1; shift; nsenter --net="/run/netns/$(node_netns "$k")" --uts="$(node_uts "$k")" "$@"; }

check_subnet() {
  # The bridge's /24 must be ours alone: no address or route of this machine may use it.
  if ip -4 -o addr show | grep -v " $BRIDGE " | grep -qF " $SUBNET." \
     || ip -4 route show | grep -v " dev $BRIDGE " | grep -qE "^$SUBNET\\.0/|via $SUBNET\\."; then
    log "subnet $SUBNET.0/24 is in use on this machine (ip addr / ip route); set PF_SLURM_SUBNET to a free one"
    return 1
  fi
}

make_nodes() {
  local n=$1 k ns veth
  check_subnet
  mkdir -p "$STATE_DIR/ns"
  echo "$n" > "$NODES_FILE"  # before anything is made: stop removes what a failed start left
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr replace "$HOST_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for k in $(seq "$n"); do
    ns=$(node_netns "$k") veth=${NET_TAG}v$k
    if [ ! -e "/run/netns/$ns" ]; then
      ip netns add "$ns"
      ip link add "$veth" type veth peer name eth0 netns "$ns"
      ip link set "$veth" master "$BRIDGE" up
      ip -n "$ns" addr add "$(node_addr "$k")/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
    fi
    if ! mountpoint -q "$(node_uts "$k")"; then
      touch "$(node_uts "$k")"
      unshare --uts="$(node_uts "$k")" hostname "node$k"
    fi
  done
}

remove_nodes() {
  local n k ns pids
  n=$(node_count)
  [ "$n" -gt 1 ] || return 0
  for k in $(seq "$n"); do
    ns=$(node_netns "$k")
    if [ -e "/run/netns/$ns" ]; then
      # Whatever still runs on the node (a Ray node of a job SLURM gave up on) goes with it.
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
      ip netns del "$ns"
    fi
    ip link del "${NET_TAG}v$k" 2>/dev/null || true
    if mountpoint -q "$(node_uts "$k")"; then umount "$(node_uts "$k")"; fi
    rm -f "$(node_uts "$k")"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -f "$NODES_FILE"
}

node_states() { SLURM_CONF="$CONF" sinfo -h -N -o "%N %T" 2>/dev/null | sort -u; }

status() {
  local k n
  n=$(node_count)
  pid_alive "$STATE_DIR/slurmctld.pid" || return 1
  for k in $(seq "$n"); do pid_alive "$(node_pidfile "$k")" || return 1; done
  [ "$(node_states | grep -cE ' (idle|mixed|allocated|completing)$')" -eq "$n" ]
}

start() {
  local n=${1:-1} k
  if [ -f "$NODES_FILE" ] && [ "$(node_count)" -ne "$n" ]; then
    log "a cluster of $(node_count) nodes runs in $STATE_DIR; stop it first"; return 1
  fi
  if status; then log "already running ($(node_states | tr '\n' ' '))"; return 0; fi
  [ "$n" -eq 1 ] || make_nodes "$n"
  write_config "$n"
  start_munge
  export SLURM_CONF="$CONF"
  if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
    log "starting slurmctld"
    /usr/sbin/slurmctld -f "$CONF"
  fi
  for k in $(seq "$n"); do
    pid_alive "$(node_pidfile "$k")" && continue
    if [ "$n" -eq 1 ]; then
      log "starting slurmd"
      /usr/sbin/slurmd -f "$CONF"
    else
      log "starting slurmd on node$k ($(node_addr "$k"), netns $(node_netns "$k"))"
      on_node "$k" /usr/sbin/slurmd -f "$CONF" -N "node$k"
    fi
  done
  local deadline=$((SECONDS + START_TIMEOUT_S)) states=""
  while [ $SECONDS -lt $deadline ]; do
    states=$(node_states)
    if [ "$(echo "$states" | grep -cE ' (idle|mixed|allocated)$')" -eq "$n" ]; then
      log "$n node(s) ready in partition $PARTITION: $(echo "$states" | tr '\n' ' ')"; return 0
    fi
    for name in $(echo "$states" | awk '$2 ~ /^(down|drain)/ {print $1}'); do
      scontrol update nodename="$name" state=resume 2>/dev/null || true
    done
    sleep 1
  done
  log "nodes did not become idle within ${START_TIMEOUT_S}s (${states:-no state}); logs in $STATE_DIR/log"
  tail -n 20 "$STATE_DIR"/log/*.log >&2 || true
  return 1
}

stop_daemon() {
  local name=$1 pidfile=$2 pid i
  pid=$(cat "$pidfile" 2>/dev/null) || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  log "stopping $name"
  kill "$pid" 2>/dev/null || true
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  local k
  if pid_alive "$STATE_DIR/slurmctld.pid"; then
    SLURM_CONF="$CONF" scancel --full --user="$(id -un)" 2>/dev/null || true
    sleep 1
  fi
  for k in $(seq "$(node_count)"); do stop_daemon "slurmd" "$(node_pidfile "$k")"; done
  stop_daemon slurmctld "$STATE_DIR/slurmctld.pid"
  remove_nodes
  # munged is shared with anything else on the machine that uses munge: leave it running.
}

need_multi() {
  if [ "$(node_count)" -le 1 ] || [ -z "${1:-}" ] || [ "$1" -lt 1 ] || [ "$1" -gt "$(node_count)" ]; then
    echo "$0: no node '${1:-}' in a multi-node cluster in $STATE_DIR" >&2; exit 2
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  start)
    nodes=${PF_SLURM_NODES:-1}
    while [ $# -gt 0 ]; do
      case "$1" in
        --nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
        --nodes=*) nodes=${1#--nodes=}; shift ;;
        *) echo "$0 start: unknown option $1" >&2; exit 2 ;;
      esac
    done
    [[ "$nodes" =~ ^[1-9][0-9]?$ ]] || { echo "$0 start: --nodes must be 1 to 99, not '$nodes'" >&2; exit 2; }
    start "$nodes" ;;
  stop) stop ;;
  status) if status; then echo "running ($(node_states | tr '\n' ' '))"; else echo "not running"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  nodes)
    if [ "$(node_count)" -gt 1 ]; then
      for k in $(seq "$(node_count)"); do echo "node$k $(node_addr "$k") $(node_netns "$k")"; done
    else
      echo "$(hostname -s) - -"
    fi ;;
  kill-node)
    need_multi "${1:-}"
    pids=$(ip netns pids "$(node_netns "$1")")
    log "node$1: SIGKILL to $(echo $pids | wc -w) processes"
    [ -z "$pids" ] || kill -9 $pids ;;
  link)
    need_multi "${1:-}"
    case "${2:-}" in
      up|down) ip link set "${NET_TAG}v$1" "$2" ;;
      *) echo "usage: $0 link K down|up" >&2; exit 2 ;;
    esac ;;
  host-addr) echo "$HOST_ADDR" ;;
  *) echo "usage: $0 start [--nodes N]|stop|status|env|nodes|kill-node K|link K down|up|host-addr" >&2; exit 2 ;;
esac
