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
# On SLURM each stage is one job, chained with --dependency=afterok and --kill-on-invalid-dep=yes
# (a failed stage cancels everything after it). Sharded stages (01, 02, 04, 06) with S<NN>_ARRAY > 1
# are arrays of that many tasks followed by a finalize job. Stages whose final artifact already exists are
# skipped, so re-running after a failure resubmits only what is unfinished. Stage 05 requeues itself
# after a preemption or time-limit signal (see slurm/05_train_lm.sbatch).
#
# Options:
#   --config FILE   pipeline config (default: $TOKENFOLD_CONFIG, else slurm/config/demo.env);
#                   any KEY in it can be overridden from the environment
#   --local         run locally even when SLURM is available
#   --plan          print each stage's status and resources; run nothing
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

# a stage is redone when --from says so, else run when its final artifact is missing
stage_todo() { { [ -n "$FROM" ] && [ "$((10#$1))" -ge "$((10#$FROM))" ]; } || ! tf_stage_done "$1"; }
stage_extra_args() { if [ -n "$FROM" ] && [ "$((10#$1))" -ge "$((10#$FROM))" ]; then echo --overwrite; fi; }
# a sharded stage with S<NN>_ARRAY > 1 runs as an array + finalize job; else as one job that finalizes itself
stage_arrayed() { tf_stage_sharded "$1" && [ "$(tf_res "$1" ARRAY 1)" -gt 1 ]; }
in_range() { [ -z "$UNTIL" ] || [ "$((10#$1))" -le "$((10#$UNTIL))" ]; }

# RES: the sbatch options of stage NN (PHASE "" or "finalize") from its S<NN>_* config values
sbatch_resources() {
  tf_stage_resources "$1" "${2:-}"
  RES=(--cpus-per-task="$R_CPUS")
  [ -n "$R_MEM" ] && RES+=(--mem="$R_MEM")
  [ -n "$R_TIME" ] && RES+=(--time="$R_TIME")
  [ "$R_GPUS" -gt 0 ] && RES+=(--gres="${GPU_GRES:-gpu}:$R_GPUS")
  [ -n "$R_NODES" ] && RES+=(--nodes="$R_NODES")
  [ -n "$R_NTASKS_PER_NODE" ] && RES+=(--ntasks-per-node="$R_NTASKS_PER_NODE")
  [ -n "$R_PARTITION" ] && RES+=(--partition="$R_PARTITION")
  [ -n "${ACCOUNT:-}" ] && RES+=(--account="$ACCOUNT")
  [ -n "${QOS:-}" ] && RES+=(--qos="$QOS")
  [ "$1" = 05 ] && [ -n "${S05_SIGNAL_SECS:-}" ] && RES+=(--signal="B:USR1@$S05_SIGNAL_SECS")
  # shellcheck disable=SC2206
  RES+=($R_EXTRA)
  return 0
}

# ----------------------------------------------------------------------------- --plan
if [ $PLAN = 1 ]; then
  # one line per job, tab-separated key=value (tokenfold/launcher.py reads this)
  echo "# config=$TF_CONFIG data=${TOKENFOLD_DATA:-data} mode=$MODE"
  for s in "${TF_STAGES[@]}"; do
    in_range "$s" || continue
    if stage_todo "$s"; then st=todo; else st=complete; fi
    phases=(job); tasks=1
    if stage_arrayed "$s"; then phases=(array finalize); tasks=$(tf_res "$s" ARRAY 1); fi
    for ph in "${phases[@]}"; do
      [ "$ph" = finalize ] && tasks=1
      sbatch_resources "$s" "$([ "$ph" = finalize ] && echo finalize)"
      printf 'stage=%s\tname=%s\tphase=%s\tstatus=%s\ttasks=%s\tscript=%s\tmarker=%s\treports=%s\targs=%s\tcpus=%s\tmem=%s\ttime=%s\tgpus=%s\tpartition=%s\taccount=%s\tqos=%s\tnodes=%s\tntasks_per_node=%s\textra=%s\tsbatch=%s\n' \
        "$s" "$(tf_stage_name "$s")" "$ph" "$st" "$tasks" "$(tf_stage_script "$s")" "$(tf_stage_marker "$s")" "$(tf_stage_reports "$s")" \
        "$([ "$ph" = finalize ] && echo --finalize) $(stage_extra_args "$s")" "$R_CPUS" "$R_MEM" "$R_TIME" "$R_GPUS" "$R_PARTITION" \
        "${ACCOUNT:-}" "${QOS:-}" "$R_NODES" "$R_NTASKS_PER_NODE" "$R_EXTRA" "${RES[*]}"
    done
  done
  exit 0
fi

# ----------------------------------------------------------------------------- local: in order, here
if [ $MODE = local ]; then
  tf_log "config $TF_CONFIG, artifacts under ${TOKENFOLD_DATA:-data}/, logs in $LOG_DIR/"
  TIMES=$LOG_DIR/local-stage-times.tsv; : > "$TIMES"
  T0=$(date +%s.%N)
  for s in "${TF_STAGES[@]}"; do
    in_range "$s" || continue
    name=$(tf_stage_name "$s")
    if ! stage_todo "$s"; then
      tf_log "stage $s $name: complete ($(tf_stage_marker "$s") exists), skipped"
      printf '%s\t%s\tskipped\t0\n' "$s" "$name" >> "$TIMES"; continue
    fi
    log=$LOG_DIR/$s-$name.log
    tf_log "stage $s $name: running (log: $log)"
    t=$(date +%s.%N)
    # unsharded here: one task does all the work and finalizes (what --num-shards 1 means)
    # shellcheck disable=SC2046
    if ! bash "$(tf_stage_script "$s")" $(stage_extra_args "$s") 2>&1 | tee "$log"; then
      rc=${PIPESTATUS[0]}
      if [ "$rc" = 124 ]; then   # 05 stopped by a signal after saving a checkpoint
        tf_log "stage $s $name stopped after saving a checkpoint; re-run the same command to resume"
      else
        tf_log "stage $s $name FAILED (status $rc) after $(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.0f", b-a}')s; see $log"
        tf_log "fix it and re-run the same command: complete stages are skipped"
      fi
      exit 1
    fi
    dt=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    printf '%s\t%s\tran\t%s\n' "$s" "$name" "$dt" >> "$TIMES"
    tf_log "stage $s $name: done in ${dt}s"
  done
  total=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  echo
  echo "TokenFold pipeline finished in ${total}s (config $TF_CONFIG). Wall time per stage:"
  awk -F'\t' '{printf "  %s %-24s %s\n", $1, $2, ($3=="skipped" ? "skipped (complete)" : $4 "s")}' "$TIMES"
  echo "Reports:"
  for s in "${TF_STAGES[@]}"; do
    in_range "$s" || continue
    for r in $(tf_stage_reports "$s"); do [ -e "$r" ] && echo "  $s  $r"; done
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
prev=""        # the job the next stage waits for
for s in "${TF_STAGES[@]}"; do
  in_range "$s" || continue
  name=$(tf_stage_name "$s"); script=$(tf_stage_script "$s")
  if ! stage_todo "$s"; then
    tf_log "stage $s $name: complete ($(tf_stage_marker "$s") exists), skipped"; continue
  fi
  # shellcheck disable=SC2207
  extra=($(stage_extra_args "$s"))
  common=(--parsable --chdir="$TF_ROOT" --kill-on-invalid-dep=yes)
  [ -n "$prev" ] && common+=(--dependency="afterok:$prev")
  if stage_arrayed "$s"; then
    n=$(tf_res "$s" ARRAY 1)
    sbatch_resources "$s"
    aid=$(sbatch "${common[@]}" "${RES[@]}" --job-name="tf-$s-$name" --array="0-$((n - 1))" \
      --output="$LOG_DIR/%x-%A_%a.out" "$script" "${extra[@]}")
    aid=${aid%%;*}
    sbatch_resources "$s" finalize
    common=(--parsable --chdir="$TF_ROOT" --kill-on-invalid-dep=yes --dependency="afterok:$aid")
    fid=$(sbatch "${common[@]}" "${RES[@]}" --job-name="tf-$s-$name-finalize" \
      --output="$LOG_DIR/%x-%j.out" "$script" --finalize "${extra[@]}")
    fid=${fid%%;*}
    JOBS+=("$aid" "$fid"); LINES+=("$s	array	$aid" "$s	finalize	$fid"); prev=$fid
    tf_log "stage $s $name: array job $aid ($n tasks) -> finalize job $fid"
  else
    sbatch_resources "$s"
    jid=$(sbatch "${common[@]}" "${RES[@]}" --job-name="tf-$s-$name" --output="$LOG_DIR/%x-%j.out" "$script" "${extra[@]}")
    jid=${jid%%;*}
    JOBS+=("$jid"); LINES+=("$s	job	$jid"); prev=$jid
    tf_log "stage $s $name: job $jid"
  fi
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
