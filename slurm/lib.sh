# slurm/lib.sh - shared by slurm/run_pipeline.sh and the per-stage sbatch scripts (sourced, not run).
#
#   tf_init                   find the repo, cd there, read the pipeline config, pick the Python
#   tf_load_config FILE       export a config file's values (read by tokenfold/config.py; the environment wins)
#   tf_cmd / tf_python        a stage's command line / run it (srun when a job has several tasks)
#   tf_words VAR              split a *_ARGS value into words, quotes respected
#   TF_STAGES / tf_stage_*    the stage table: script, sharded or not, "complete" test, reports
#   tf_stage_resources NN     a stage's CPUs, memory, time, GPUs, partition from S<NN>_* values
#
# Nothing here submits jobs; run_pipeline.sh does that.

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
  tf_select_stages
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

# ----------------------------------------------------------------------------- the stage table
# In order. Sharded stages (their scripts take --num-shards/--shard-index, defaulting from the SLURM
# array, and --finalize) run as an array of S<NN>_ARRAY tasks followed by a finalize job.
TF_ALL_STAGES=(01 02 03 04 05 06)
# the config's STAGES (e.g. "01 04 05 06": 3Di or geo tokens need no ESM-2) selects some of them
tf_select_stages() {
  TF_STAGES=()
  local s w
  for s in "${TF_ALL_STAGES[@]}"; do
    if [ -z "${STAGES:-}" ]; then TF_STAGES+=("$s"); continue; fi
    for w in $STAGES; do [ "$w" = "$s" ] && TF_STAGES+=("$s"); done
  done
  for w in ${STAGES:-}; do
    [[ " ${TF_ALL_STAGES[*]} " == *" $w "* ]] || tf_die "STAGES: unknown stage '$w' (stages: ${TF_ALL_STAGES[*]})"
  done
}
tf_stage_script() {
  case $1 in
    01) echo slurm/01_prepare_db.sbatch ;;
    02) echo slurm/02_extract_esm_embeddings.sbatch ;;
    03) echo slurm/03_train_codebook.sbatch ;;
    04) echo slurm/04_tokenize.sbatch ;;
    05) echo slurm/05_train_lm.sbatch ;;
    06) echo slurm/06_evaluate.sbatch ;;
    *) tf_die "unknown stage: $1" ;;
  esac
}
tf_stage_name() { local s; s=$(basename "$(tf_stage_script "$1")" .sbatch); echo "${s#??_}"; }
tf_stage_sharded() { case $1 in 01|02|04|06) return 0 ;; *) return 1 ;; esac; }

# The file each stage writes last (atomically): it exists only when the stage is complete.
tf_stage_marker() {
  case $1 in
    01) echo "$DB_DIR/manifest.json" ;;
    02) echo "$EMB_DIR/manifest.json" ;;
    03) echo "$CODEBOOK_DIR/summary_K$CODEBOOK_K.json" ;;
    04) echo "$TOKENS_DIR/manifest.json" ;;
    05) echo "$RUN_DIR/final" ;;
    06) echo "$EVAL_DIR/metrics.json" ;;
  esac
}
tf_stage_done() { [ -e "$(tf_stage_marker "$1")" ]; }

# The reports a person opens after each stage (JSON + PNG).
tf_stage_reports() {
  case $1 in
    01) echo "$DB_DIR/report.json $DB_DIR/report.png" ;;
    02) echo "$EMB_DIR/report.json $EMB_DIR/report.png" ;;
    03) echo "$CODEBOOK_DIR/summary_K$CODEBOOK_K.json $CODEBOOK_DIR/clustering_visualization.png $CODEBOOK_DIR/cluster_sizes_K$CODEBOOK_K.png" ;;
    04) echo "$TOKENS_DIR/report.json $TOKENS_DIR/token_frequency.png $TOKENS_DIR/lengths.png" \
          "$([ "$TOKEN_KIND" = geo ] && echo "$TOKENS_DIR/geo_rmsd_hist.png $TOKENS_DIR/geo_rmsd_vs_length.png")" ;;
    05) echo "$RUN_DIR/report.json $RUN_DIR/metrics.jsonl $RUN_DIR/curves.png" ;;
    06) echo "$EVAL_DIR/metrics.json $EVAL_DIR/per_protein.tsv $EVAL_DIR/accuracy_vs_length.png" \
          "$(case $TOKEN_KIND in
               3di) echo "$EVAL_DIR/confusion_3di.png" ;;
               geo|kanzi) echo "$EVAL_DIR/rmsd_tm_vs_length.png $EVAL_DIR/rmsd_tm_hist.png $EVAL_DIR/ca_traces_3d.png $EVAL_DIR/pdb/" ;;
             esac)" ;;
  esac
}

# tf_res NN FIELD [DEFAULT]: a per-stage config value S<NN>_<FIELD> (e.g. S05_GPUS), else DEFAULT.
tf_res() { local v="S$1_$2"; printf '%s' "${!v:-${3:-}}"; }

# tf_stage_resources NN [finalize]: the resources of stage NN's job(s) (the finalize job of a sharded
# stage reads S<NN>_FIN_<FIELD> first) into R_CPUS R_MEM R_TIME R_GPUS R_PARTITION R_NODES
# R_NTASKS_PER_NODE R_EXTRA. The partition: S<NN>_PARTITION, else GPU_PARTITION for GPU jobs, else
# PARTITION; empty means the cluster's default.
tf_stage_resources() {
  local s=$1 fin=${2:-}
  _tf_get() { local x=""; [ "$fin" = finalize ] && x=$(tf_res "$s" "FIN_$1"); [ -n "$x" ] || x=$(tf_res "$s" "$1" "${2:-}"); printf '%s' "$x"; }
  R_CPUS=$(_tf_get CPUS 1); R_MEM=$(_tf_get MEM); R_TIME=$(_tf_get TIME)
  if [ "$fin" = finalize ]; then
    R_GPUS=$(tf_res "$s" FIN_GPUS 0); R_NODES=""; R_NTASKS_PER_NODE=""
  else
    R_GPUS=$(tf_res "$s" GPUS 0); R_NODES=$(tf_res "$s" NODES); R_NTASKS_PER_NODE=$(tf_res "$s" NTASKS_PER_NODE)
  fi
  R_PARTITION=$(_tf_get PARTITION)
  if [ -z "$R_PARTITION" ] && [ "$R_GPUS" -gt 0 ]; then R_PARTITION=${GPU_PARTITION:-}; fi
  [ -n "$R_PARTITION" ] || R_PARTITION=${PARTITION:-}
  R_EXTRA=$(echo ${SBATCH_EXTRA:-} $(_tf_get SBATCH_EXTRA))
}

# tf_words VAR: split the config value $VAR like a shell would (quotes respected; the same split as
# tokenfold.config.PipelineConfig.words) into the array TF_WORDS. Nothing in it is executed.
tf_words() {
  TF_WORDS=()
  local v=${!1:-}
  [ -n "$v" ] || return 0
  "$PY" -c 'import shlex, sys; shlex.split(sys.argv[1])' "$v" || tf_die "cannot split $1 (unbalanced quotes?): $v"
  mapfile -d '' -t TF_WORDS < <("$PY" -c 'import shlex, sys; sys.stdout.write("".join(w + "\0" for w in shlex.split(sys.argv[1])))' "$v")
}
