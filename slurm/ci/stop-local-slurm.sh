#!/usr/bin/env bash
# stop-local-slurm.sh - stop the daemons that start-local-slurm.sh launched, and only those
# (TokenFold copy of ../shared/slurm/stop-local-slurm.sh):
# each pid comes from $RUN_DIR/<name>.pid and is signalled only if /proc/<pid>/comm still names
# that daemon (guards against pid reuse). Nothing is killed by name.
#
#   LOCAL_SLURM_CANCEL_JOBS=1   1: scancel all queued/running jobs first and wait for them to end
#                               (otherwise their slurmstepd/job processes outlive slurmd).
set -uo pipefail
RUN_DIR=/run/local-slurm
CANCEL_JOBS=${LOCAL_SLURM_CANCEL_JOBS:-1}
log() { printf '[local-slurm %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }
[ -d "$RUN_DIR" ] || { log "nothing to stop ($RUN_DIR absent)"; exit 0; }
exec 9>"$RUN_DIR/.lock"; flock -w 120 9 || { echo "another start/stop holds $RUN_DIR/.lock" >&2; exit 1; }

# live PID: exists and is not a zombie (a container pid 1 that does not reap leaves zombies)
live() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]; }
alive() {  # alive NAME COMM -> prints pid if the recorded pid is alive and is COMM
  local f="$RUN_DIR/$1.pid" pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [[ "$pid" =~ ^[0-9]+$ ]] && live "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  echo "$pid"
}

if [ "$CANCEL_JOBS" = 1 ] && alive slurmctld slurmctld > /dev/null && alive slurmd slurmd > /dev/null; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 300); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.1; done
    [ -n "$(squeue -h 2>/dev/null)" ] && log "warning: jobs still listed after 30s: $(squeue -h -o %A | tr '\n' ' ')"
  fi
fi

rc=0
for entry in slurmd:slurmd slurmctld:slurmctld slurmdbd:slurmdbd mariadbd:mariadbd munged:munged; do
  name=${entry%%:*}; comm=${entry#*:}; f="$RUN_DIR/$name.pid"
  [ -e "$f" ] || continue
  if ! pid=$(alive "$name" "$comm"); then
    log "$name: recorded pid $(cat "$f" 2>/dev/null) is not a running $comm; removing stale pid file"
    rm -f "$f"; continue
  fi
  kill -TERM "$pid"
  for _ in $(seq 1 300); do live "$pid" || break; sleep 0.1; done
  if live "$pid"; then
    log "$name (pid $pid) ignored SIGTERM for 30s; sending SIGKILL"; kill -KILL "$pid"; sleep 0.5
  fi
  if live "$pid"; then log "$name (pid $pid) still present"; rc=1; else log "stopped $name (pid $pid)"; rm -f "$f"; fi
done
exit $rc
