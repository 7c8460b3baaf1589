#!/bin/bash
# Nsight Systems profile of a few training steps, launched exactly as slurm/pretrain.sh launches
# training (docs/slurm.md): each node's agent runs under `nsys profile`, and the workers of
# PROFILE_RANKS open the capture range at step A and close it after step B-1
# (torch.cuda.profiler.start/stop, through profiling.nsys_steps and profiling.ranks).
#
#   cd /path/to/megatron-tts
#   PROFILE_STEPS=20,25 PROFILE_RANKS=0,8 CONFIG=configs/llasa-1b.yaml OVERRIDES="data.paths=[/data/shards] ..." \
#       sbatch --nodes=2 slurm/profile.sh
#
# Reports: RUN_DIR/profile/nsys_job<JOB>_<node>.nsys-rep, one per node (a node without a
# profiled rank captures nothing: its workers never open the range). The run stops after step B
# (train.stop_after, unless OVERRIDES sets it) and is never requeued (MAX_REQUEUES=0).
# Knobs: PROFILE_STEPS=A,B ([A, B), default 10,15), PROFILE_RANKS (default 0), NSYS (the nsys
# binary, default `nsys` on PATH), NSYS_ARGS (extra nsys options), and every pretrain.sh knob.
#
# No --signal/--requeue here: a profiling run is short, and whether nsys passes USR1 on to the
# agent it wraps is not something to rely on. Give it a --time that the run fits in.
#SBATCH --job-name=megatron-tts-profile
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=01:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
log() { printf '[profile.sh %(%F %T)T job %s] %s\n' -1 "${SLURM_JOB_ID:-?}" "$*"; }
die() { log "error: $1"; exit 1; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job: submit with sbatch slurm/profile.sh"
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $REPO/slurm/pretrain.sh ]] || die "REPO=$REPO is not a megatron-tts checkout (submit from it or set REPO)"

# Fail rather than run unprofiled: a job that was meant to profile and silently did not wastes
# the allocation. nsys must be on every node; this checks the batch node.
NSYS=${NSYS:-nsys}
command -v "$NSYS" >/dev/null 2>&1 || die "nsys ($NSYS) not found on $(hostname): load Nsight Systems \
(e.g. \`module load nsight-systems\`) or set NSYS=/path/to/nsys; not running unprofiled"

PROFILE_STEPS=${PROFILE_STEPS:-10,15}
PROFILE_RANKS=${PROFILE_RANKS:-0}
[[ $PROFILE_STEPS =~ ^([0-9]+),([0-9]+)$ ]] && (( BASH_REMATCH[1] < BASH_REMATCH[2] )) \
    || die "PROFILE_STEPS=$PROFILE_STEPS: expected A,B with A < B (steps [A, B))"
STOP=${BASH_REMATCH[2]}
[[ $PROFILE_RANKS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "PROFILE_RANKS=$PROFILE_RANKS: expected global ranks, e.g. 0,8"

# pretrain.sh's default RUN_DIR, needed here for the report paths.
export RUN_DIR=${RUN_DIR:-$REPO/runs/${SLURM_JOB_NAME:-megatron-tts}-$SLURM_JOB_ID}
mkdir -p "$RUN_DIR/profile" || die "cannot create $RUN_DIR/profile"

OVERRIDES="${OVERRIDES:-} profiling.nsys_steps=[$PROFILE_STEPS] profiling.ranks=[$PROFILE_RANKS]"
[[ " $OVERRIDES " == *" train.stop_after="* ]] || OVERRIDES+=" train.stop_after=$STOP"
export OVERRIDES
# nsys follows the agent's worker processes; only those that call cudaProfilerStart are captured.
# %q{SLURMD_NODENAME} is expanded by nsys on each node.
export LAUNCH_PREFIX="$NSYS profile --capture-range=cudaProfilerApi --capture-range-end=stop \
--trace=cuda,nvtx,osrt --sample=none --cpuctxsw=none --force-overwrite=true \
--output=$RUN_DIR/profile/nsys_job${SLURM_JOB_ID}_%q{SLURMD_NODENAME} ${NSYS_ARGS:-}"
export MAX_REQUEUES=${MAX_REQUEUES:-0}
log "nsys: steps [$PROFILE_STEPS) on ranks $PROFILE_RANKS, reports in $RUN_DIR/profile/"
exec bash "$REPO/slurm/pretrain.sh"
