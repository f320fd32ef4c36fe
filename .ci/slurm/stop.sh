#!/usr/bin/env bash
# Stop the CI SLURM cluster started by .ci/slurm/setup.sh, by pid file (slurmd, slurmctld, then munged).
#   bash .ci/slurm/stop.sh [--keep-munge]
set -uo pipefail
STATE="${PARARNN_SLURM_STATE:-/tmp/pararnn-slurm}"

stop() {  # name pidfile
    local name="$1" pidfile="$2" pid
    [ -s "$pidfile" ] || { echo "[slurm-stop] $name: no pid file"; return 0; }
    pid="$(cat "$pidfile")"
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "[slurm-stop] $name: not running"; rm -f "$pidfile"; return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "[slurm-stop] $name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
    echo "[slurm-stop] $name (pid $pid) stopped"
}

stop slurmd "$STATE/slurmd.pid"
stop slurmctld "$STATE/slurmctld.pid"
[ "${1:-}" = "--keep-munge" ] || stop munged /run/munge/munged.pid
[ -d "$STATE" ] && echo "stopped by .ci/slurm/stop.sh" > "$STATE/setup.status"
exit 0
