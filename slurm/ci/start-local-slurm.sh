#!/usr/bin/env bash
# start-local-slurm.sh - run a REAL single-node SLURM cluster on localhost (no systemd, no cgroups).
#
# TokenFold's copy of the tested recipe in ../shared/slurm/ (see its README for the pitfalls each
# step handles). What CI (.ci/run) and tests/test_slurm.py run against. Differences from the recipe:
#   - AuthInfo=cred_expire=10: a requeued job (stage 05 after SIGUSR1/preemption) waits
#     cred_expire seconds before it may start again; the default 120 s would slow the requeue test.
#
#   munged -> [mariadbd -> slurmdbd] -> slurmctld -> slurmd   (all bound to / talking over 127.0.0.1)
#
# Idempotent: packages are installed only when missing, daemons that this script started
# earlier (tracked by pid files in $RUN_DIR) and that are still alive are left alone.
# Must run as root. Stop with stop-local-slurm.sh (kills only the pids recorded here).
#
# Environment knobs:
#   LOCAL_SLURM_ACCOUNTING=1     1: also run mariadb + slurmdbd so `sacct` works (submitit polls sacct
#                                for job states; without it states read UNKNOWN and a job killed
#                                before writing its result makes job.result() wait forever).
#                                0: no accounting daemons (sacct fails; `sacct -c` reads jobcomp file).
#   LOCAL_SLURM_PARTITION=debug  name of the single (default) partition.
#   LOCAL_SLURM_CLEAN_STATE=0    1: slurmctld -c (forget saved jobs; job ids restart at 1).
#   LOCAL_SLURM_TIMEOUT=90       seconds to wait for each daemon / for the node to become idle.
#   LOCAL_SLURM_SKIP_INSTALL=0   1: never call apt-get.
#   LOCAL_SLURM_FORCE_CONF=0     1: overwrite an /etc/slurm/slurm.conf not written by this script.
set -euo pipefail

RUN_DIR=/run/local-slurm            # pid files written by this script (the only thing stop uses)
LOG_DIR=/var/log/local-slurm        # daemon logs
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARKER="# managed by start-local-slurm.sh"
ACCOUNTING=${LOCAL_SLURM_ACCOUNTING:-1}
PARTITION=${LOCAL_SLURM_PARTITION:-debug}
CLEAN_STATE=${LOCAL_SLURM_CLEAN_STATE:-0}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-90}
MYSQL_SOCK=/run/mysqld/mysqld.sock
DB_USER=slurm
DB_PASS=slurm-local-only            # mariadb runs with --skip-networking: socket access only

log() { printf '[local-slurm %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[local-slurm] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

[ "$(id -u)" = 0 ] || die "must run as root"
T_START=$(now)
mkdir -p "$RUN_DIR" "$LOG_DIR"
exec 9>"$RUN_DIR/.lock"; flock -w 120 9 || die "another start/stop holds $RUN_DIR/.lock"

# ---------------------------------------------------------------- 1. install (skipped if present)
PKGS=(munge slurm-client slurmctld slurmd)
[ "$ACCOUNTING" = 1 ] && PKGS+=(slurmdbd mariadb-server)
MISSING=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || MISSING+=("$p")
done
if [ ${#MISSING[@]} -gt 0 ]; then
  [ "${LOCAL_SLURM_SKIP_INSTALL:-0}" = 1 ] && die "missing packages: ${MISSING[*]}"
  T_INST=$(now)
  log "installing: ${MISSING[*]}"
  # keep maintainer scripts from auto-starting munge/mariadb/slurm through /etc/init.d
  TEMP_POLICY=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; TEMP_POLICY=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${MISSING[@]}" > "$LOG_DIR/apt-install.log" 2>&1 \
    || { tail -30 "$LOG_DIR/apt-install.log" >&2; [ $TEMP_POLICY = 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install failed"; }
  [ $TEMP_POLICY = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "install done in $(since "$T_INST")s"
fi
T_DAEMONS=$(now)

# refuse to clobber a slurm.conf that someone else wrote (before starting anything)
mkdir -p /etc/slurm
if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
  [ "${LOCAL_SLURM_FORCE_CONF:-0}" = 1 ] || die "$CONF exists and was not written by this script (set LOCAL_SLURM_FORCE_CONF=1 to replace it)"
  cp -a "$CONF" "$CONF.bak.$(date +%s)"
fi

# ---------------------------------------------------------------- helpers
# live PID: process exists and is not a zombie (containers whose pid 1 does not reap keep zombies)
live() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]; }
# running NAME COMM: true if the pid recorded in $RUN_DIR/NAME.pid is alive and is COMM
running() {
  local f="$RUN_DIR/$1.pid" pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [[ "$pid" =~ ^[0-9]+$ ]] && live "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
# launch NAME CMD...: start a foreground-mode daemon detached, record its pid
launch() {
  local name=$1; shift
  rm -f "$RUN_DIR/$name.pid"
  # The subshell closes every inherited fd above 2 (our lock fd 9, CI output pipes...) so a daemon
  # can neither hold the lock nor keep a CI step's pipes open, then execs setsid; the subshell is
  # not a process-group leader (no job control in scripts) so setsid execs in place too, and $!
  # is the daemon's own pid.
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}; [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-"
    done
    exec setsid "$@"
  ) < /dev/null >> "$LOG_DIR/$name.out" 2>&1 &
  echo $! > "$RUN_DIR/$name.pid"
}
# wait_for NAME COMM DESC CMD...: poll CMD until success; fail early if the daemon died
wait_for() {
  local name=$1 comm=$2 desc=$3; shift 3
  local deadline=$(( $(date +%s) + TIMEOUT ))
  until "$@" > /dev/null 2>&1; do
    if [ -n "$name" ] && ! running "$name" "$comm"; then
      tail -n 30 "$LOG_DIR/$name.out" >&2 || true
      die "$name exited while waiting for: $desc (log: $LOG_DIR/$name.out)"
    fi
    [ "$(date +%s)" -lt "$deadline" ] || die "timeout (${TIMEOUT}s) waiting for: $desc"
    sleep 0.1
  done
}
# stop_ours NAME COMM: stop a daemon this script started (config change restart)
stop_ours() {
  running "$1" "$2" || { rm -f "$RUN_DIR/$1.pid"; return 0; }
  local pid; pid=$(cat "$RUN_DIR/$1.pid")
  kill -TERM "$pid"
  for _ in $(seq 1 300); do live "$pid" || break; sleep 0.1; done
  if live "$pid"; then kill -KILL "$pid"; fi
  rm -f "$RUN_DIR/$1.pid"
}
munge_ok()     { munge -n 2>/dev/null | unmunge > /dev/null 2>&1; }
mysql_ok()     { mariadb-admin --socket="$MYSQL_SOCK" -s ping > /dev/null 2>&1; }
dbd_ok()       { (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null; }
ctld_ok()      { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state()   { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1; }
node_ready()   { case "$(node_state)" in idle|mixed|allocated|completing) return 0;; *) return 1;; esac; }
# slurmd registered since we launched it? (a restarted slurmctld restores the node as "idle" from
# saved state before slurmd has registered, so the state alone is not enough)
slurmd_registered() {
  local t; t=$(scontrol show node "$NODE" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2)
  [ -n "$t" ] && [ "$t" != None ] && [ "$(date -d "$t" +%s 2>/dev/null || echo 0)" -ge "$SLURMD_LAUNCHED" ]
}

# ---------------------------------------------------------------- 2. munge
install -d -o munge -g munge -m 0700 /etc/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0700 /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 0600 /etc/munge/munge.key
if running munged munged; then
  log "munged already running (pid $(cat "$RUN_DIR/munged.pid"))"
elif munge_ok; then
  log "a munged not started by this script is already answering; using it"
else
  # run as the munge user directly (setpriv execs; runuser would stay as a parent process)
  launch munged setpriv --reuid=munge --regid=munge --init-groups -- /usr/sbin/munged --foreground
  wait_for munged munged "munge credential round-trip" munge_ok
  log "munged started (pid $(cat "$RUN_DIR/munged.pid"))"
fi

# ---------------------------------------------------------------- 3. slurm.conf
NODE=$(hostname -s 2>/dev/null || uname -n); NODE=${NODE%%.*}
HW=$(slurmd -C 2>/dev/null | head -1)          # NodeName=x CPUs=.. Boards=.. ... RealMemory=..
[[ "$HW" == NodeName=* ]] || die "slurmd -C failed: $HW"
HW=${HW#NodeName=* }
CPUS=$(sed -n 's/.*\bCPUs=\([0-9]*\).*/\1/p' <<< "$HW")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<< "$HW")
DEFMEM=$(( MEM / CPUS ))                       # else a job without --mem takes the whole node
if [ "$ACCOUNTING" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
NEW_CONF=$(cat <<EOF
$MARKER (edit the script, not this file)
ClusterName=localcluster
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# container-safe: no cgroup plugins, so no cgroup.conf is needed
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
PropagateResourceLimits=NONE
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
EnforcePartLimits=ALL
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
MinJobAge=3600
KillWait=5
# requeued jobs become eligible again after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
MailProg=/bin/true
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
$ACCT
NodeName=$NODE NodeAddr=127.0.0.1 $HW State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
CONF_CHANGED=0
if [ "$(cat "$CONF" 2>/dev/null)" != "$NEW_CONF" ]; then
  printf '%s\n' "$NEW_CONF" > "$CONF"; chmod 644 "$CONF"; CONF_CHANGED=1
  log "wrote $CONF (node $NODE: CPUs=$CPUS RealMemory=${MEM}MB DefMemPerCPU=$DEFMEM)"
fi
install -d -m 0755 /var/lib/slurm/slurmctld /var/lib/slurm/slurmd

# ---------------------------------------------------------------- 4. accounting (optional)
if [ "$ACCOUNTING" = 1 ]; then
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  if running mariadbd mariadbd; then
    log "mariadbd already running (pid $(cat "$RUN_DIR/mariadbd.pid"))"
  elif mysql_ok; then
    log "a mariadb not started by this script answers on $MYSQL_SOCK; using it"
  else
    if [ ! -d /var/lib/mysql/mysql ]; then
      log "initializing /var/lib/mysql"
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql --auth-root-authentication-method=socket \
        --skip-test-db >> "$LOG_DIR/mariadbd.out" 2>&1
    fi
    # no TCP listener; native AIO off (io_uring/libaio are often blocked by container seccomp)
    launch mariadbd /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket="$MYSQL_SOCK" \
      --pid-file=/run/mysqld/mysqld.pid --skip-networking --innodb-use-native-aio=0 \
      --innodb-lock-wait-timeout=900
    wait_for mariadbd mariadbd "mariadb ping" mysql_ok
    log "mariadbd started (pid $(cat "$RUN_DIR/mariadbd.pid"))"
  fi
  mariadb --socket="$MYSQL_SOCK" -u root -e "CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'localhost';" \
    || die "cannot create the slurm db user (is root@localhost unix_socket auth enabled?)"
  NEW_DBD=$(cat <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
LogFile=$LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
DebugLevel=info
EOF
)
  if [ "$(cat "$DBD_CONF" 2>/dev/null)" != "$NEW_DBD" ]; then
    printf '%s\n' "$NEW_DBD" > "$DBD_CONF"
    stop_ours slurmdbd slurmdbd
  fi
  chmod 600 "$DBD_CONF"
  if running slurmdbd slurmdbd; then
    log "slurmdbd already running (pid $(cat "$RUN_DIR/slurmdbd.pid"))"
  else
    launch slurmdbd /usr/sbin/slurmdbd -D
    wait_for slurmdbd slurmdbd "slurmdbd on 127.0.0.1:6819" dbd_ok
    log "slurmdbd started (pid $(cat "$RUN_DIR/slurmdbd.pid"))"
  fi
fi

# ---------------------------------------------------------------- 5. slurmctld + slurmd
if [ $CONF_CHANGED = 1 ] && { running slurmctld slurmctld || running slurmd slurmd; }; then
  log "slurm.conf changed: restarting the slurmctld/slurmd started by this script"
  stop_ours slurmd slurmd; stop_ours slurmctld slurmctld
fi
if running slurmctld slurmctld; then
  log "slurmctld already running (pid $(cat "$RUN_DIR/slurmctld.pid"))"
else
  ctld_ok && die "a slurmctld not started by this script is answering; stop it first"
  CTLD_ARGS=(-D); [ "$CLEAN_STATE" = 1 ] && CTLD_ARGS+=(-c)
  launch slurmctld /usr/sbin/slurmctld "${CTLD_ARGS[@]}"
  wait_for slurmctld slurmctld "scontrol ping" ctld_ok
  log "slurmctld started (pid $(cat "$RUN_DIR/slurmctld.pid"))"
fi
SLURMD_LAUNCHED=0
if running slurmd slurmd; then
  log "slurmd already running (pid $(cat "$RUN_DIR/slurmd.pid"))"
else
  SLURMD_LAUNCHED=$(( $(date +%s) - 1 ))
  launch slurmd /usr/sbin/slurmd -D -N "$NODE"
  log "slurmd started (pid $(cat "$RUN_DIR/slurmd.pid"))"
fi

# ---------------------------------------------------------------- 6. wait for the node
deadline=$(( $(date +%s) + TIMEOUT )); resumed=0
until slurmd_registered && node_ready; do
  running slurmd slurmd || { tail -n 30 "$LOG_DIR/slurmd.out" >&2; die "slurmd exited"; }
  st=$(node_state)
  # a node left DOWN/DRAIN in saved state (unclean stop) is put back in service once
  if [ $resumed = 0 ] && [[ "$st" == *drain* || "$st" == down* ]] && [ "$(date +%s)" -gt $(( deadline - TIMEOUT + 5 )) ]; then
    log "node $NODE is '$st' ($(sinfo -h -n "$NODE" -o %E)); resuming it"
    scontrol update NodeName="$NODE" State=RESUME || true; resumed=1
  fi
  [ "$(date +%s)" -lt "$deadline" ] || { sinfo -R >&2; die "timeout waiting for node $NODE to become idle (state: $st)"; }
  sleep 0.1
done

# ---------------------------------------------------------------- 7. status
log "cluster up: daemons $(since "$T_DAEMONS")s, total $(since "$T_START")s"
echo "--- $(sinfo -V)   config: $CONF   logs: $LOG_DIR   pid files: $RUN_DIR"
scontrol ping
sinfo
sinfo -h -N -o 'node=%N state=%T cpus=%c memory=%mMB'
[ "$ACCOUNTING" = 1 ] && sacctmgr -n -P show cluster format=Cluster,ControlHost,ControlPort | sed 's/^/slurmdbd cluster: /'
for f in "$RUN_DIR"/*.pid; do [ -e "$f" ] && echo "pid $(basename "$f" .pid)=$(cat "$f")"; done
exit 0
