#!/bin/bash
#SBATCH --job-name=tf-pipeline
#SBATCH --cpus-per-task=1
#SBATCH --mem=1G
#SBATCH --time=00:15:00
#SBATCH --output=tf-pipeline-%j.out
# slurm/run_pipeline.sh - run the whole TokenFold pipeline (stages 01-06).
#
#   sbatch slurm/run_pipeline.sh [OPTIONS]   a light driver job: submits one job per stage, exits
#   bash   slurm/run_pipeline.sh [OPTIONS]   the same from a login node
#   bash   slurm/run_pipeline.sh --local     every stage in order on this machine (also what happens
#                                            when sbatch is not on PATH)
#
# The jobs come from tokenfold/pipeline.py (`python -m tokenfold.pipeline plan`, the one stage table);
# this script only submits them. On SLURM each job waits for the one before it (--dependency=afterok,
# --kill-on-invalid-dep=yes: a failed stage cancels everything after it). Sharded stages (01, 02, 04,
# 06) with S<NN>_ARRAY > 1 are arrays of that many tasks followed by a finalize job; with
# TOKEN_KIND=geo a job fitting the geo codebook runs before stage 04's. Stages whose final artifact
# already exists are skipped, so re-running after a failure resubmits only what is unfinished. Stage
# 05 requeues itself after a preemption or time-limit signal (see slurm/05_train_lm.sbatch).
#
# Options:
#   --config FILE   pipeline config (default: $TOKENFOLD_CONFIG, else slurm/config/demo.env);
#                   any KEY in it can be overridden from the environment
#   --local         run locally even when SLURM is available
#   --plan          print the jobs (status, arguments, sbatch options, reports); run nothing
#   --from NN       redo stage NN and everything after it, even if complete (passes --overwrite)
#   --until NN      stop after stage NN
#   --wait          (SLURM, with bash on a login node) wait until the submitted jobs end, print
#                   their states, exit 1 if one of them did not complete
set -euo pipefail

usage() { sed -n '/^# slurm\/run_pipeline.sh/,/^set -euo/p' "$0" | sed '$d;s/^# \{0,1\}//'; }
LOCAL=0; PLAN=0; WAIT=0; FROM=""; UNTIL=""
while [ $# -gt 0 ]; do
  case $1 in
    --config) export TOKENFOLD_CONFIG=$2; shift 2 ;;
    --config=*) export TOKENFOLD_CONFIG=${1#*=}; shift ;;
    --local) LOCAL=1; shift ;;
    --plan) PLAN=1; shift ;;
    --wait) WAIT=1; shift ;;
    --from) FROM=$2; shift 2 ;;
    --until) UNTIL=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_pipeline.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

# find slurm/lib.sh: beside this script when run with bash, else (as a batch job, which SLURM runs
# from a copy) in $TOKENFOLD_ROOT, the directory sbatch was called from, or where the submitted
# script lives (scontrol's Command=)
for TF_ROOT in "${TOKENFOLD_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-}" "$PWD" \
  ${SLURM_JOB_ID:+"$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's|^ *Command=\([^ ]*\)/slurm/[^/ ]*.*|\1|p')"}; do
  [ -f "$TF_ROOT/slurm/lib.sh" ] && break
done
# shellcheck source=slurm/lib.sh
source "$TF_ROOT/slurm/lib.sh" || { echo "cannot find slurm/lib.sh: run from the repo root or set TOKENFOLD_ROOT" >&2; exit 1; }
tf_init

MODE=slurm
if [ $LOCAL = 1 ] || ! command -v sbatch > /dev/null 2>&1; then MODE=local; fi
[ $LOCAL = 0 ] && [ $MODE = local ] && tf_log "sbatch not found on PATH: running every stage locally"

# JOB_LINES: the jobs in order, one line of shell assignments each (stage name label job_name phase
# status tasks script marker, arrays args sbatch reports; see tokenfold/pipeline.py)
plan_args=(--config "$TF_CONFIG")
[ -n "$FROM" ] && plan_args+=(--from "$FROM")
[ -n "$UNTIL" ] && plan_args+=(--until "$UNTIL")
[ $MODE = local ] && plan_args+=(--local)
PLAN_TEXT=$("$PY" -m tokenfold.pipeline plan "${plan_args[@]}") || exit 1
JOB_LINES=()
[ -z "$PLAN_TEXT" ] || mapfile -t JOB_LINES <<< "$PLAN_TEXT"
skipped=""     # the stage whose "complete, skipped" line was logged last (one line per stage)
log_skip() {
  [ "$skipped" = "$stage" ] || tf_log "stage $stage $name: complete ($marker exists), skipped"
  skipped=$stage
}

# ----------------------------------------------------------------------------- --plan
if [ $PLAN = 1 ]; then
  echo "# config=$TF_CONFIG data=${TOKENFOLD_DATA:-data} mode=$MODE"
  printf '%s\n' "${JOB_LINES[@]}"
  exit 0
fi

# ----------------------------------------------------------------------------- local: in order, here
if [ $MODE = local ]; then
  tf_log "config $TF_CONFIG, artifacts under ${TOKENFOLD_DATA:-data}/, logs in $LOG_DIR/"
  TIMES=$LOG_DIR/local-stage-times.tsv; : > "$TIMES"
  T0=$(date +%s.%N)
  for line in "${JOB_LINES[@]}"; do
    eval "$line"
    if [ "$status" = complete ]; then
      log_skip; printf '%s\t%s\tskipped\t0\n' "$stage" "$label" >> "$TIMES"; continue
    fi
    log=$LOG_DIR/$stage-$label.log
    tf_log "stage $stage $label: running (log: $log)"
    t=$(date +%s.%N)
    # unsharded here: one task does all the work and finalizes (what --num-shards 1 means)
    if ! bash "$script" "${args[@]}" 2>&1 | tee "$log"; then
      rc=${PIPESTATUS[0]}
      if [ "$rc" = 124 ]; then   # 05 stopped by a signal after saving a checkpoint
        tf_log "stage $stage $label stopped after saving a checkpoint; re-run the same command to resume"
      else
        tf_log "stage $stage $label FAILED (status $rc) after $(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.0f", b-a}')s; see $log"
        tf_log "fix it and re-run the same command: complete stages are skipped"
      fi
      exit 1
    fi
    dt=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    printf '%s\t%s\tran\t%s\n' "$stage" "$label" "$dt" >> "$TIMES"
    tf_log "stage $stage $label: done in ${dt}s"
  done
  total=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  echo
  echo "TokenFold pipeline finished in ${total}s (config $TF_CONFIG). Wall time per stage:"
  awk -F'\t' '{printf "  %s %-24s %s\n", $1, $2, ($3=="skipped" ? "skipped (complete)" : $4 "s")}' "$TIMES"
  echo "Reports:"
  listed=""
  for line in "${JOB_LINES[@]}"; do
    eval "$line"
    [ "$listed" = "$stage" ] && continue
    listed=$stage
    for r in "${reports[@]}"; do [ -e "$r" ] && echo "  $stage  $r"; done
  done
  exit 0
fi

# ----------------------------------------------------------------------------- SLURM: submit the chain
if [ $WAIT = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  tf_die "--wait inside a job would hold this job's CPUs while the stages wait for them; use it with bash on a login node"
fi
# As a driver job our own SLURM_* variables would leak into every stage job (--export=ALL): drop them.
for v in "${!SLURM_@}"; do case $v in SLURM_CONF) ;; *) unset "$v" ;; esac; done

JOBS=()        # every submitted job id, in order
LINES=()       # stage<TAB>phase<TAB>job id
prev=""        # the job the next one waits for
for line in "${JOB_LINES[@]}"; do
  eval "$line"
  if [ "$status" = complete ]; then log_skip; continue; fi
  opts=(--parsable --chdir="$TF_ROOT" --kill-on-invalid-dep=yes)
  [ -n "$prev" ] && opts+=(--dependency="afterok:$prev")
  opts+=("${sbatch[@]}" --job-name="$job_name")
  if [ "$phase" = array ]; then
    opts+=(--array="0-$((tasks - 1))" --output="$LOG_DIR/%x-%A_%a.out")
  else
    opts+=(--output="$LOG_DIR/%x-%j.out")
  fi
  jid=$(sbatch "${opts[@]}" "$script" "${args[@]}")
  jid=${jid%%;*}
  JOBS+=("$jid"); LINES+=("$stage	$phase	$jid"); prev=$jid
  tf_log "stage $stage $label: $([ "$phase" = array ] && echo "array job $jid ($tasks tasks)" || echo "job $jid")"
done
if [ ${#JOBS[@]} -eq 0 ]; then
  echo "Every stage is complete; nothing submitted (use --from NN to redo from stage NN)."
  exit 0
fi
ids=$(IFS=,; echo "${JOBS[*]}")
record=$LOG_DIR/submitted-$(date +%Y%m%d-%H%M%S)-${JOBS[0]}.tsv
printf '%s\n' "${LINES[@]}" > "$record.tmp" && mv "$record.tmp" "$record"
echo "Submitted jobs: ${JOBS[*]}   (stage/phase/job id: $record; logs: $LOG_DIR/)"
echo "Watch them:     squeue -j $ids"
echo "When done:      sacct -X -j $ids -o JobID%-14,JobName%-26,State,ExitCode,Elapsed"

if [ $WAIT = 1 ]; then
  while [ -n "$(squeue -h -j "$ids" 2>/dev/null)" ]; do sleep 5; done
  sleep 2
  sacct -X -j "$ids" -o JobID%-14,JobName%-26,State,ExitCode,Elapsed
  bad=$(sacct -X -n -P -j "$ids" -o State | grep -vc '^COMPLETED$' || true)
  [ "$bad" = 0 ] || { echo "$bad job(s) did not complete" >&2; exit 1; }
fi
