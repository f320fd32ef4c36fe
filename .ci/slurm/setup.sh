#!/usr/bin/env bash
# Start a single-node SLURM cluster on localhost for tests/test_slurm.py (Debian's slurm-wlm + munge).
#
#   bash .ci/slurm/setup.sh            # install if needed, write slurm.conf, start munged/slurmctld/slurmd
#   bash .ci/slurm/setup.sh --strict   # exit non-zero when the cluster does not come up (default: exit 0)
#   bash .ci/slurm/stop.sh             # stop the daemons (by pid file)
#   PARARNN_SLURM_GPUS=4 bash .ci/slurm/setup.sh   # a GPU node: GRES gpu:4 (jobs ask --gpus-per-node)
#   PARARNN_SLURM_DEBS=DIR bash .ci/slurm/setup.sh  # no network: install from .ci/slurm/fetch_debs.sh's files
#
# Idempotent: a second run finds the daemons alive and only checks that the node answers. Without
# --strict it never fails CI: when something does not work it writes the reason to
# $PARARNN_SLURM_STATE/setup.status, and the SLURM test is skipped with that reason.
# Needs root (apt-get, daemons as root). State, logs and pid files live in $PARARNN_SLURM_STATE.
set -uo pipefail

STATE="${PARARNN_SLURM_STATE:-/tmp/pararnn-slurm}"
CONF=/etc/slurm/slurm.conf
MARKER="# written by pararnn-lm .ci/slurm/setup.sh"
STRICT=0
[ "${1:-}" = "--strict" ] && STRICT=1

log() { echo "[slurm-setup] $*"; }
fail() {  # reason [--logs]
    log "FAILED: $1"
    mkdir -p "$STATE" && echo "failed: $1" > "$STATE/setup.status"
    if [ "${2:-}" = "--logs" ]; then
        for f in slurmctld.log slurmd.log munged.log; do
            [ -s "$STATE/$f" ] && { log "--- tail of $STATE/$f"; tail -n 15 "$STATE/$f"; }
        done
    fi
    exit $(( STRICT ? 1 : 0 ))
}
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

mkdir -p "$STATE" || fail "cannot create $STATE"
echo "starting" > "$STATE/setup.status"
[ "$(id -u)" -eq 0 ] || fail "must run as root (apt-get and the daemons)"

# --- install ------------------------------------------------------------------------------------
installed() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null
if ! installed && [ -n "${PARARNN_SLURM_DEBS:-}" ]; then  # an offline host: .ci/slurm/fetch_debs.sh's files
    log "installing from the .deb files in $PARARNN_SLURM_DEBS"
    bash "$(dirname "$0")/install_debs.sh" "$PARARNN_SLURM_DEBS" || fail "installing from $PARARNN_SLURM_DEBS failed"
fi
if ! installed; then
    command -v apt-get >/dev/null || fail "slurm is not installed and apt-get is not available"
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$STATE/apt.log" 2>&1 \
        && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >>"$STATE/apt.log" 2>&1 \
        || { tail -n 20 "$STATE/apt.log"; fail "apt-get install failed (see $STATE/apt.log)"; }
fi
log "$(slurmctld -V)"

# --- slurm.conf ---------------------------------------------------------------------------------
if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    fail "$CONF exists and was not written by this script; refusing to overwrite a real cluster's config"
fi
CPUS="$(nproc)"
HOST="$(hostname -s)"
GPUS="${PARARNN_SLURM_GPUS:-0}"
mkdir -p "$STATE/ctld" "$STATE/slurmd" /etc/slurm
GRES_TYPES="" NODE_GRES=""
if [ "$GPUS" -gt 0 ]; then
    GRES_TYPES="GresTypes=gpu" NODE_GRES=" Gres=gpu:$GPUS"
    # SLURM drops GPUs without device files; it sets CUDA_VISIBLE_DEVICES per job from them.
    [ -e "/dev/nvidia$((GPUS - 1))" ] || fail "PARARNN_SLURM_GPUS=$GPUS but /dev/nvidia$((GPUS - 1)) does not exist"
    printf '%s\nName=gpu File=/dev/nvidia[0-%d]\n' "$MARKER" "$((GPUS - 1))" > /etc/slurm/gres.conf
elif [ -e /etc/slurm/gres.conf ] && grep -qF "$MARKER" /etc/slurm/gres.conf; then
    rm -f /etc/slurm/gres.conf
fi
NEW_CONF="$(cat <<EOF
$MARKER
# A one-node cluster on localhost for CI; no accounting. State and logs: $STATE
ClusterName=pararnn-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Job step credentials live 5 s (default 120 s); a requeued job waits that long before it restarts.
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Schedule every 2 s (default 60 s): a requeued job starts as soon as its credential has expired.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to 'scontrol show job' for a minute.
MinJobAge=60
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=10
BatchStartTimeout=20
$GRES_TYPES
NodeName=localhost CPUs=$CPUS RealMemory=1000$NODE_GRES State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
)"
CHANGED=0
if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    printf '%s\n' "$NEW_CONF" > "$CONF"
    CHANGED=1
    log "wrote $CONF (node localhost, $CPUS CPUs, partition ci)"
fi

# --- daemons ------------------------------------------------------------------------------------
if [ "$CHANGED" = 1 ] && { alive "$STATE/slurmctld.pid" || alive "$STATE/slurmd.pid"; }; then
    log "configuration changed: restarting the slurm daemons"
    bash "$(dirname "$0")/stop.sh" --keep-munge
fi

mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    (command -v mungekey >/dev/null && mungekey --create --force) \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
fi
if alive /run/munge/munged.pid; then
    log "munged already running (pid $(cat /run/munge/munged.pid))"
else
    log "starting munged"
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid --log-file=/var/log/munge/munged.log \
        || fail "munged did not start" --logs
fi
ln -sf /var/log/munge/munged.log "$STATE/munged.log"
ln -sf /run/munge/munged.pid "$STATE/munged.pid"
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null 2>&1 || fail "munge credentials do not round-trip" --logs

if alive "$STATE/slurmctld.pid"; then
    log "slurmctld already running (pid $(cat "$STATE/slurmctld.pid"))"
else
    log "starting slurmctld"
    slurmctld -i >>"$STATE/slurmctld.log" 2>&1 || fail "slurmctld did not start" --logs
fi
if alive "$STATE/slurmd.pid"; then
    log "slurmd already running (pid $(cat "$STATE/slurmd.pid"))"
else
    log "starting slurmd"
    log_lines="$(cat "$STATE/slurmd.log" 2>/dev/null | wc -l)"  # the log is appended to: read this start's lines
    if ! slurmd -N localhost >>"$STATE/slurmd.log" 2>&1; then
        # Some slurmd builds (Debian's 22.05) always start their cgroup/v2 plugin, which asks systemd over
        # dbus for a scope; a container has neither. With IgnoreSystemd slurmd makes the scope directory
        # itself, under system.slice, which must exist.
        # (grep reads all of tail's output: with -q, tail could die of SIGPIPE and pipefail report a miss)
        tail -n "+$((log_lines + 1))" "$STATE/slurmd.log" | grep "cgroup_dbus_attach_to_scope" >/dev/null \
            || fail "slurmd did not start" --logs
        [ ! -e /etc/slurm/cgroup.conf ] || grep -qF "$MARKER" /etc/slurm/cgroup.conf \
            || fail "slurmd needs cgroup.conf IgnoreSystemd=yes, but /etc/slurm/cgroup.conf is not ours" --logs
        log "no systemd/dbus for slurmd's cgroup plugin: IgnoreSystemd=yes in /etc/slurm/cgroup.conf, retrying"
        printf '%s\nCgroupPlugin=autodetect\nIgnoreSystemd=yes\n' "$MARKER" > /etc/slurm/cgroup.conf
        mkdir -p /sys/fs/cgroup/system.slice
        slurmd -N localhost >>"$STATE/slurmd.log" 2>&1 || fail "slurmd did not start" --logs
    fi
fi

# --- wait for the node ------------------------------------------------------------------------
state=""
for _ in $(seq 60); do
    state="$(sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -n 1)"
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 ;;
    esac
    sleep 0.5
done
case "$state" in
    idle|mixed|allocated|completing) ;;
    *) fail "node localhost is '${state:-not answering}' after 30 s" --logs ;;
esac
echo "ok" > "$STATE/setup.status"
log "ready: $(sinfo -h -o '%P %a %D %T %N')"
exit 0
