#!/bin/bash
# Tokenize audio corpora into codec-token shards under Slurm (python -m data_pipeline tokenize).
#
#   One task per GPU:
#     CODEC=xcodec2 CODEC_PATH=/models/xcodec2 INPUT="/data/LibriTTS /data/emilia" OUT=s3://bucket/tok/xcodec2 \
#         sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 slurm/tokenize.sh
#   Or a job array of independent tasks (each may run whenever and wherever a GPU is free):
#     ... sbatch --array=0-63 --ntasks=1 --gpus-per-task=1 slurm/tokenize.sh
#
# Worker = array task x tasks of the step + SLURM_PROCID, of (array tasks x tasks) workers; each does
# its work units (one output shard each) that have no report yet, so resubmitting the same command
# after a crash, a kill or a preemption does only what is missing, and never a sample twice. The
# last worker to finish writes index.json. A stop signal (scancel, preemption, --signal=B:USR1@N,
# relayed here) abandons the shard in flight and exits 75: the job requeues itself (--requeue), at
# most MAX_REQUEUES times.
#
# Knobs (environment, exported by sbatch): CODEC, CODEC_PATH, INPUT (space-separated), OUT,
# SETTINGS (key=value words, see `python -m data_pipeline tokenize --help`), MAX_REQUEUES, REPO,
# PYTHON or VENV. Resources: sbatch flags (GPUs are not requested by default: add --gpus-per-task=1).
#
#SBATCH --job-name=tokenize
#SBATCH --ntasks=1
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out

set -uo pipefail
log() { printf '[tokenize.sh %(%F %T)T job %s task %s] %s\n' -1 "${SLURM_JOB_ID:-?}" "${SLURM_ARRAY_TASK_ID:--}" "$*"; }
die() { log "error: $1"; exit "${2:-1}"; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job: submit with sbatch slurm/tokenize.sh" 3
for v in CODEC CODEC_PATH INPUT OUT; do [[ -n ${!v:-} ]] || die "set $v (see the header of slurm/tokenize.sh)" 3; done
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO" || die "cannot cd to REPO=$REPO" 3
PY=${PYTHON:-}
[[ -z $PY && -n ${VENV:-} ]] && PY=$VENV/bin/python
PY=${PY:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}} PYTHONUNBUFFERED=1

# --signal=B:... reaches only this shell: relay it to the tasks.
child=
relay() { log "signal $1: relaying to the tasks"; [[ -n $child ]] && kill -"$1" "$child" 2>/dev/null; }
trap 'relay USR1' USR1
trap 'relay TERM' TERM

log "tokenize ${INPUT} -> ${OUT} with ${CODEC} (${SLURM_NTASKS:-1} tasks, array ${SLURM_ARRAY_TASK_COUNT:-1})"
# shellcheck disable=SC2086  # INPUT and SETTINGS are word lists
srun --kill-on-bad-exit=0 "$PY" -m data_pipeline tokenize --codec "$CODEC" --codec-path "$CODEC_PATH" \
    --input $INPUT --out "$OUT" progress=false ${SETTINGS:-} &
child=$!
while true; do
    wait "$child"; rc=$?
    kill -0 "$child" 2>/dev/null || break  # wait returns early when a trapped signal arrives
done
log "tasks exited $rc"
if [[ $rc -eq 75 || $rc -ge 128 ]]; then
    restarts=${SLURM_RESTART_COUNT:-0}
    if (( restarts < ${MAX_REQUEUES:-20} )); then
        target=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
        log "stopped before the end: requeue ${target:-$SLURM_JOB_ID} (restart $((restarts + 1)))"
        scontrol requeue "${target:-$SLURM_JOB_ID}" && exit 0
    fi
fi
exit "$rc"
