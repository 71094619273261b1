# slurm/lib.sh - shared by slurm/run_pipeline.sh and the per-stage sbatch scripts (sourced, not run).
#
#   tf_init                   find the repo, cd there, read the pipeline config, pick the Python
#   tf_load_config FILE       export a config file's values (read by tokenfold/config.py; the environment wins)
#   tf_cmd / tf_python        a stage's command line / run it (srun when a job has several tasks)
#   tf_words VAR              split a *_ARGS value into words, quotes respected
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
