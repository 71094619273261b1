# slurm/lib.sh - shared by slurm/run_pipeline.sh and the per-stage sbatch scripts (sourced, not run).
#
#   tf_init                   find the repo, cd there, read the pipeline config, pick the Python
#   tf_load_config FILE       export a config file's values (read by tokenfold/config.py; the environment wins)
#   tf_cmd / tf_python        a stage's command line / run it (srun when a job has several tasks)
#   tf_words VAR              split a *_ARGS value into words, quotes respected
#   tf_run_requeueable MAX    run TF_CMD (training) passing SLURM's signals on; requeue the job after USR1
#
# The stage table and the job plan live in tokenfold/pipeline.py; run_pipeline.sh asks it for the plan
# and does the submitting. Nothing here submits jobs.

tf_log() { printf '[tokenfold %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
tf_die() { printf '[tokenfold] error: %s\n' "$*" >&2; exit 1; }

# ----------------------------------------------------------------------------- the repo root
# This file's own path is reliable (it is sourced from the checkout); a batch script's is not (SLURM
# runs a copy from its spool directory), so the sbatch scripts look for lib.sh in $TOKENFOLD_ROOT,
# beside themselves, in the directory sbatch was called from, then where scontrol says the
# submitted script lives.
tf_find_root() { (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); }

# ----------------------------------------------------------------------------- config files
# tf_pick_python: PY = $PYTHON, else the checkout's .venv/bin/python, else python3.
tf_pick_python() {
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    if [ -x "$(tf_find_root)/.venv/bin/python" ]; then PY=$(tf_find_root)/.venv/bin/python; else PY=python3; fi
  fi
}
# tf_load_config FILE: export every KEY of FILE as tokenfold/config.py resolves it (a KEY already in
# the environment keeps its value); a bad line stops here with one line naming FILE:LINE.
tf_load_config() {
  local file=$1 out
  [[ $file == /* ]] || file=$PWD/$file
  [ -n "${PY:-}" ] || tf_pick_python
  out=$(cd "$(tf_find_root)" && "$PY" -m tokenfold.config --config "$file" --export) || exit 1
  eval "$out"
}

# ----------------------------------------------------------------------------- init
# Sets TF_ROOT, TF_CONFIG (absolute), PY; cds to the repo; creates the log directory.
tf_init() {
  TF_ROOT=$(tf_find_root)
  # a relative config path: from the current directory when it is there, else from the repo root
  # (as tokenfold.config.resolve_config_path reads it)
  local cfg=${TOKENFOLD_CONFIG:-slurm/config/demo.env}
  if [ -f "$cfg" ]; then cfg=$(cd "$(dirname "$cfg")" && pwd)/$(basename "$cfg"); fi
  cd "$TF_ROOT" || tf_die "cannot cd to $TF_ROOT"
  export TOKENFOLD_ROOT=$TF_ROOT
  [ -f "$cfg" ] || tf_die "pipeline config not found: $cfg (set TOKENFOLD_CONFIG or pass --config)"
  TF_CONFIG=$(cd "$(dirname "$cfg")" && pwd)/$(basename "$cfg")
  export TOKENFOLD_CONFIG=$TF_CONFIG
  tf_pick_python                 # to read the config
  tf_load_config "$TF_CONFIG"
  tf_pick_python                 # the config's PYTHON, when it names one
  export PYTHON=$PY
  export LOG_DIR=${LOG_DIR:-${TOKENFOLD_DATA:-data}/logs}
  mkdir -p "$LOG_DIR"
}

# tf_cmd SCRIPT ARGS...: the command line of a stage in TF_CMD. Several tasks in one batch job (DDP
# training over --ntasks/--nodes) go through srun, which starts one process per task; inside a job
# step already (srun, submitit) each task runs its own process directly.
tf_cmd() {
  TF_CMD=("$PY" "$@")
  # as many CPU threads as CPUs allocated (without cgroups torch would take every core of the node)
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    TF_CMD=(env "OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" "${TF_CMD[@]}")
  fi
  if [ "${SLURM_NTASKS:-1}" -gt 1 ] && [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${SLURM_STEP_ID:-}" ]; then
    TF_CMD=(srun --kill-on-bad-exit=1 "${TF_CMD[@]}")
  fi
  tf_log "job ${SLURM_JOB_ID:-local}${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID} on $(hostname -s): ${TF_CMD[*]}"
}
# tf_python SCRIPT ARGS...: run a stage script in the foreground, return its status.
tf_python() { tf_cmd "$@"; "${TF_CMD[@]}"; }

# tf_words VAR: split the config value $VAR like a shell would (quotes respected; the same split as
# tokenfold.config.PipelineConfig.words) into the array TF_WORDS. Nothing in it is executed.
tf_words() {
  TF_WORDS=()
  local v=${!1:-}
  [ -n "$v" ] || return 0
  "$PY" -c 'import shlex, sys; shlex.split(sys.argv[1])' "$v" || tf_die "cannot split $1 (unbalanced quotes?): $v"
  mapfile -d '' -t TF_WORDS < <("$PY" -c 'import shlex, sys; sys.stdout.write("".join(w + "\0" for w in shlex.split(sys.argv[1])))' "$v")
}

# tf_run_requeueable MAX_REQUEUES: run TF_CMD (a training command: tokenfold/stop.py) so that it can
# be stopped and requeued. It runs in the background, so that this batch shell can catch SLURM's
# warning signal (--signal=B:USR1@secs) and SIGTERM and pass them on; the command then saves a
# checkpoint and exits 124. After USR1 the job requeues itself (scontrol requeue; at most
# MAX_REQUEUES times, counted by SLURM_RESTART_COUNT) and the next start resumes from that
# checkpoint. A job stopped by SIGTERM is not requeued here: SLURM requeues preempted jobs itself,
# and a cancelled job stays cancelled. Returns the command's status (0 once a requeue is asked for).
TF_EXIT_REQUEUE=124   # tokenfold/stop.py EXIT_REQUEUE: stopped after saving, rerun to resume
tf_forward() {
  TF_TRAPPED=1; if [ "$1" = TERM ]; then TF_GOT_TERM=1; else TF_GOT_USR1=1; fi
  tf_log "got SIG$1: asking training to save a checkpoint and stop"
  kill -s "$1" "$TF_CHILD" 2>/dev/null || true
}
tf_run_requeueable() {
  local max=$1 rc
  "${TF_CMD[@]}" &
  TF_CHILD=$!
  TF_GOT_USR1=0; TF_GOT_TERM=0; TF_TRAPPED=0
  trap 'tf_forward USR1' USR1
  trap 'tf_forward TERM' TERM
  while :; do
    wait "$TF_CHILD"; rc=$?
    # a trapped signal cuts `wait` short (status > 128) while training is still saving: wait again
    if [ "$TF_TRAPPED" = 1 ]; then TF_TRAPPED=0; kill -0 "$TF_CHILD" 2>/dev/null && continue; fi
    break
  done
  # After the warning signal any non-zero status means "stopped; the newest checkpoint is intact":
  # - with several ranks, srun --kill-on-bad-exit terminates the ranks still exiting once the first one
  #   has exited 124 (after the save and its barrier), so srun reports their status, not 124;
  # - USR1 before training installed its handler (still importing torch) kills it (128 + 10): nothing
  #   new was saved, but requeueing resumes from the newest checkpoint just the same.
  if [ "$TF_GOT_USR1" = 1 ] && [ "$rc" != 0 ] && [ "$rc" != "$TF_EXIT_REQUEUE" ]; then
    tf_log "training ended with status $rc after SIGUSR1 (a rank stopped by srun, or still starting up): treated as status $TF_EXIT_REQUEUE"
    rc=$TF_EXIT_REQUEUE
  fi
  if [ "$rc" = "$TF_EXIT_REQUEUE" ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "$TF_GOT_TERM" = 0 ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$max" ]; then
      tf_die "stopped with a checkpoint, but already requeued ${SLURM_RESTART_COUNT} times (max $max); resubmit to continue"
    fi
    tf_log "training stopped (status $rc): requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID" && return 0
    tf_die "scontrol requeue $SLURM_JOB_ID failed; resubmit this script to resume from the checkpoint"
  fi
  [ "$rc" = "$TF_EXIT_REQUEUE" ] && tf_log "training saved a checkpoint and stopped; run the same command again to resume"
  return "$rc"
}
