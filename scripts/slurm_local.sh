#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying the bcm launcher and for the `slurm` tests.
#
#   scripts/slurm_local.sh install   apt-get install slurm-wlm and munge (Debian/Ubuntu; skipped when present)
#   scripts/slurm_local.sh start     write slurm.conf for this host, start munged, slurmctld, slurmd; wait for idle
#   scripts/slurm_local.sh stop      stop the daemons started by `start`, by their pid files
#   scripts/slurm_local.sh status    sinfo
#
# Needs root (the daemons run as root; slurm.conf goes to /etc/slurm/slurm.conf, where sbatch/squeue look for it).
# State, logs and pid files live in $SLURM_LOCAL_DIR (default /tmp/slurm-local). An /etc/slurm/slurm.conf that this
# script did not write is never overwritten. The node has this host's CPUs and memory (`slurmd -C`) and no GPUs;
# plugins are the ones that work in a container: proctrack/linuxproc, task/none, no cgroups, no accounting.
set -euo pipefail

STATE_DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
CONF=/etc/slurm/slurm.conf
MARKER="# written by ft-exporter scripts/slurm_local.sh"
MUNGE_PID="$STATE_DIR/munged.pid"
MUNGE_SOCKET_DIR=/run/munge

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $*" >&2; exit 1; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    say "slurm-wlm and munge already installed"
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "installing packages needs root"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurm-wlm munge
}

write_conf() {
  local host node_line
  host="$(hostname -s)"
  # `slurmd -C` prints this machine's real shape: NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
  node_line="$(slurmd -C | head -n 1)"
  [[ "$node_line" == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node_line"
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; not overwriting it"
  fi
  mkdir -p /etc/slurm "$STATE_DIR/state" "$STATE_DIR/spool"
  cat >"$CONF.tmp" <<EOF
$MARKER
ClusterName=local
SlurmctldHost=$host(127.0.0.1)  # the address given: no name lookup needed
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
SlurmdTimeout=60
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if pid_alive "$MUNGE_PID"; then
    say "munged already running (pid $(cat "$MUNGE_PID"))"
    return
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  mkdir -p "$MUNGE_SOCKET_DIR" /var/lib/munge /var/log/munge "$STATE_DIR"
  chown munge:munge "$MUNGE_SOCKET_DIR" /var/lib/munge /var/log/munge
  # munged runs as its own user; its pid file goes where that user may write.
  touch "$MUNGE_PID" && chown munge:munge "$MUNGE_PID"
  runuser -u munge -- munged --pid-file="$MUNGE_PID"
  for _ in $(seq 50); do pid_alive "$MUNGE_PID" && return; sleep 0.1; done
  die "munged did not start"
}

wait_idle() {
  local host state
  host="$(hostname -s)"
  for i in $(seq 120); do
    state="$(sinfo -h -n "$host" -o %t 2>/dev/null || true)"
    case "$state" in
      idle) say "node $host is idle after ${i}x0.5s"; return ;;
      down*|drain*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  say "slurmctld log:"; tail -n 20 "$STATE_DIR/slurmctld.log" >&2 || true
  say "slurmd log:"; tail -n 20 "$STATE_DIR/slurmd.log" >&2 || true
  die "node $host not idle after 60s (state: '${state:-none}')"
}

start() {
  [ "$(id -u)" -eq 0 ] || die "start needs root"
  command -v slurmctld >/dev/null || die "slurmctld not installed: run '$0 install' first"
  write_conf
  start_munge
  if pid_alive "$STATE_DIR/slurmctld.pid"; then
    say "slurmctld already running"
  else
    slurmctld -i  # -i: ignore unreadable state from an earlier run; daemonizes and writes its pid file
  fi
  if pid_alive "$STATE_DIR/slurmd.pid"; then
    say "slurmd already running"
  else
    slurmd
  fi
  wait_idle
  sinfo
}

stop_one() {  # stop_one NAME PIDFILE
  local pid
  if ! pid_alive "$2"; then
    rm -f "$2"
    return
  fi
  pid="$(cat "$2")"
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    say "$1 (pid $pid) still running after 10s; sending SIGKILL"
    kill -9 "$pid"
  fi
  rm -f "$2"
  say "stopped $1 (pid $pid)"
}

stop() {
  stop_one slurmd "$STATE_DIR/slurmd.pid"
  stop_one slurmctld "$STATE_DIR/slurmctld.pid"
  stop_one munged "$MUNGE_PID"
}

case "${1:-}" in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
