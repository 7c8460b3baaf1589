#!/bin/bash
# Multi-node megatron-tts pretraining under Slurm (docs/slurm.md).
#
#   cd /path/to/megatron-tts
#   CONFIG=configs/llasa-1b.yaml OVERRIDES="data.paths=[/data/shards] data.tokenizer.path=/models/tokenizer.json" \
#       sbatch --nodes=4 --time=12:00:00 slurm/pretrain.sh
#
# One torchrun agent per node (launch.elastic, c10d rendezvous) against a rendezvous store that
# this batch shell runs on the head node, so no agent is a single point of failure. Before the
# time limit Slurm sends USR1 here (--signal=B:USR1@300); it is relayed to the agents and the
# workers, which save a committed checkpoint at the next step boundary and exit 75. The outcome
# comes from the workers' exit records (python -m launch.job_status): requeue => this job
# requeues itself (at most MAX_REQUEUES times) and resumes (train.resume=auto); done => exit 0;
# fatal => exit 3; crash => exit 1 (requeued only with REQUEUE_ON_CRASH=1).
#
# Knobs (environment, exported by sbatch): CONFIG, OVERRIDES, RUN_DIR, NPROC_PER_NODE, MIN_NODES,
# MAX_REQUEUES, REQUEUE_ON_CRASH, MAX_RESTARTS, STORE_PORT, PREFLIGHT, PREFLIGHT_ARGS, REPO,
# PYTHON or VENV, LAUNCH_PREFIX. Resources: sbatch flags, which override the defaults below.
#
#SBATCH --job-name=megatron-tts
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# No `set -e`: every path must reach a verdict; failures are handled where they happen.
set -uo pipefail

# printf's own clock: a `date` child would die with the rest of the step when Slurm signals it.
log() { printf '[pretrain.sh %(%F %T)T job %s.%s] %s\n' -1 "${SLURM_JOB_ID:-?}" "${RESTART:-?}" "$*"; }
die() { log "error: $1"; exit "${2:-1}"; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job: submit with sbatch slurm/pretrain.sh"
RESTART=${SLURM_RESTART_COUNT:-0}

# ---------------------------------------------------------------------------- signals
# First thing: a USR1 that finds no trap kills bash (its default action), and with it the job.
# Slurm's B:USR1 reaches only this shell (up to 60 s early). Once training runs it is relayed to
# srun, which forwards it to the step's tasks, the agents: launch.elastic relays USR1 to its
# workers and waits for them (the workers' first stop signal counts; a duplicate, should Slurm
# also signal them directly, is ignored). Before that it is remembered and no training starts.
STOP_SIGNAL=
REQUEUED=0
SRUN_PID=
on_usr1() {
    STOP_SIGNAL=USR1
    if [[ -n $SRUN_PID ]]; then
        log "USR1: the workers save a checkpoint at the next step boundary and exit 75 (requeue)"
        kill -USR1 "$SRUN_PID" 2>/dev/null
    else
        log "USR1 before training started: it will not be started; requeueing"
    fi
}
# scancel, preemption, the time limit: Slurm signals every step itself (the workers save and
# exit 75); this shell stays up to report the outcome but does not requeue (Slurm decides).
on_term() {
    [[ $REQUEUED == 1 ]] && return  # our own `scontrol requeue` ends this incarnation with TERM
    STOP_SIGNAL=TERM
    log "TERM: the job is being cancelled, preempted or hit its time limit; not requeueing it myself"
}
trap on_usr1 USR1
trap on_term TERM

# ---------------------------------------------------------------------------- configuration
# sbatch runs a spooled copy of this script: the repository is where sbatch was called.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO" || die "REPO=$REPO is not a directory"
[[ -f launch/pretrain.py ]] || die "REPO=$REPO is not a megatron-tts checkout (submit from it or set REPO)"
if [[ -n ${PYTHON:-} ]]; then :
elif [[ -n ${VENV:-} ]]; then PYTHON=$VENV/bin/python
elif [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python
else PYTHON=python3
fi
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found (set PYTHON or VENV)"

CONFIG=${CONFIG:-configs/tiny.yaml}
[[ -f $CONFIG ]] || die "CONFIG=$CONFIG not found under $REPO" 3
OVERRIDES=${OVERRIDES:-}
# Split on blanks and newlines, never globbed: data.paths=[a,b] stays as is.
read -d "" -ra OVERRIDE_ARGS <<< "$OVERRIDES"
for o in "${OVERRIDE_ARGS[@]}"; do
    [[ $o == train.run_dir=* ]] && die "set RUN_DIR instead of train.run_dir in OVERRIDES" 3
done
# The job id survives requeues: the same RUN_DIR, so train.resume=auto continues the run.
RUN_DIR=${RUN_DIR:-$REPO/runs/${SLURM_JOB_NAME:-megatron-tts}-$SLURM_JOB_ID}
NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}  # one worker per GPU; 1 without GPUs
# Rigid by default: the world size (and DP) never changes, and a lost node ends the job, which
# Slurm requeues (--requeue). MIN_NODES below the node count lets the agents go on with fewer
# nodes (DP shrinks, the global batch stays); submit with --no-kill too, or Slurm ends the job
# when a node fails.
MIN_NODES=${MIN_NODES:-$NNODES}
MAX_REQUEUES=${MAX_REQUEUES:-10}
REQUEUE_ON_CRASH=${REQUEUE_ON_CRASH:-0}
MAX_RESTARTS=${MAX_RESTARTS:-3}  # torchrun's in-job restarts: a crashed or hung worker, a lost node
# Below the usual ephemeral range (32768+) and different for jobs that share a head node.
STORE_PORT=${STORE_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
PREFLIGHT=${PREFLIGHT:-1}
read -d "" -ra PREFLIGHT_EXTRA <<< "${PREFLIGHT_ARGS:-}"
read -d "" -ra LAUNCH_PREFIX_ARGS <<< "${LAUNCH_PREFIX:-}"  # a wrapper for each agent: slurm/profile.sh's nsys

LOG_DIR=$RUN_DIR/logs/job_${SLURM_JOB_ID}_${RESTART}
mkdir -p "$LOG_DIR" || die "cannot create $LOG_DIR"

# ---------------------------------------------------------------------------- environment
# Defaults only: values set at submission win.
export PYTHONUNBUFFERED=1
# A failed or timed-out NCCL collective ends the process instead of hanging it (3 = tear down
# without cleaning up communicators: torch's default, set because an inherited 0 would let a rank
# hang forever). NCCL_ASYNC_ERROR_HANDLING is the deprecated alias: left unset (torch warns).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Megatron's TP/sequence-parallel communication overlap needs kernels to start in the order they
# are issued, which one hardware work queue per device guarantees (Megatron-LM sets it too).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# The node's CPUs split among its workers (torchrun would force 1).
CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / NPROC_PER_NODE > 0 ? CPUS / NPROC_PER_NODE : 1 ))}
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is set by launch.elastic itself.

log "REPO=$REPO PYTHON=$PYTHON CONFIG=$CONFIG RUN_DIR=$RUN_DIR"
log "nodes=$NNODES (min $MIN_NODES) nproc_per_node=$NPROC_PER_NODE requeues=$RESTART/$MAX_REQUEUES"
log "overrides: $OVERRIDES"

# ---------------------------------------------------------------------------- head node
# Asked from Slurm: node names need not resolve by DNS; NodeAddr is where slurmd reaches a node.
node_addr() { scontrol show node "$1" | grep -oE 'NodeAddr=[^ ]+' | head -n 1 | cut -d= -f2; }
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
[[ -n $HEAD_NODE ]] || die "cannot list the nodes of $SLURM_JOB_NODELIST"
# The store runs in this shell, which Slurm starts on the allocation's first node.
if [[ -n ${SLURMD_NODENAME:-} && $SLURMD_NODENAME != "$HEAD_NODE" ]]; then
    log "the batch shell runs on $SLURMD_NODENAME, not on $HEAD_NODE: the store goes where it runs"
    HEAD_NODE=$SLURMD_NODENAME
fi
HEAD_ADDR=$(node_addr "$HEAD_NODE")
[[ -n $HEAD_ADDR ]] || die "scontrol show node $HEAD_NODE has no NodeAddr"

# ---------------------------------------------------------------------------- rendezvous store
# Apart from the agents: losing any agent (the first node's included) does not end the others.
# Its clients (preflight, the agents) retry connecting until it listens, so nothing waits for
# its start-up here; store_up checks it came up.
STORE_READY=$LOG_DIR/store.port
rm -f "$STORE_READY"
"$PYTHON" -m launch.rdzv_store --host 0.0.0.0 --port "$STORE_PORT" --ready-file "$STORE_READY" \
    > "$LOG_DIR/rdzv_store.log" 2>&1 &
STORE_PID=$!
cleanup() {
    [[ -n $SRUN_PID ]] && kill -TERM "$SRUN_PID" 2>/dev/null
    kill -TERM "$STORE_PID" 2>/dev/null
}
trap cleanup EXIT
store_up() {
    local i
    for i in $(seq 600); do
        if [[ -s $STORE_READY ]]; then
            [[ ${STORE_LOGGED:-} ]] || log "rendezvous store up"
            STORE_LOGGED=1
            return 0
        fi
        kill -0 "$STORE_PID" 2>/dev/null || die "the rendezvous store exited (port $STORE_PORT taken? \
set STORE_PORT): $(tail -n 3 "$LOG_DIR/rdzv_store.log")"
        sleep 0.1
    done
    die "the rendezvous store did not start in 60 s (see $LOG_DIR/rdzv_store.log)"
}
log "rendezvous store starting on $HEAD_NODE ($HEAD_ADDR:$STORE_PORT)"

# ---------------------------------------------------------------------------- preflight
if [[ $PREFLIGHT == 1 ]]; then
    if "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("launch.preflight") is None)'; then
        log "preflight: python -m launch.preflight on every node"
        # It meets through the job's store. PREFLIGHT_ARGS come last and win (e.g. --ckpt-dir when
        # checkpoint.dir is elsewhere, --expect-gpus 8, --min-busbw-gbps).
        # The free-space floor follows the recipe's checkpoint size (--config, --set).
        SET_ARGS=()
        for o in "${OVERRIDE_ARGS[@]}"; do SET_ARGS+=(--set "$o"); done
        srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0 --label \
            "$PYTHON" -m launch.preflight --ckpt-dir "$RUN_DIR/checkpoints" --config "$CONFIG" "${SET_ARGS[@]}" \
            --store-endpoint "$HEAD_ADDR:$STORE_PORT" --json "$LOG_DIR/preflight.json" "${PREFLIGHT_EXTRA[@]}"
        rc=$?
        # Bad hardware does not heal by requeueing onto it: stop, naming the nodes (its table
        # above). Its codes: 2 a node failed a check, 4 another node or the fabric, 1 it broke.
        store_up
        (( rc == 0 )) || die "preflight failed ($rc): resubmit with the --exclude= it printed above"
        log "preflight: passed"
    else
        log "preflight: skipped, launch.preflight does not exist in $REPO (PREFLIGHT=0 turns this off)"
    fi
fi

# ---------------------------------------------------------------------------- verdict helpers
requeue() {
    if [[ $STOP_SIGNAL == TERM ]]; then
        log "not requeueing: the job was terminated by Slurm"
    elif (( RESTART >= MAX_REQUEUES )); then
        log "not requeueing: requeued $RESTART times already (MAX_REQUEUES=$MAX_REQUEUES)"
    else
        REQUEUED=1
        if scontrol requeue "$SLURM_JOB_ID"; then
            log "requeued (requeue $((RESTART + 1)) of at most $MAX_REQUEUES); it resumes from $RUN_DIR"
        else
            REQUEUED=0
            log "scontrol requeue $SLURM_JOB_ID failed"
        fi
    fi
}

if [[ $STOP_SIGNAL == USR1 ]]; then
    requeue
    exit 75
fi

# ---------------------------------------------------------------------------- launch
LAUNCH_TIME=$(date +%s.%N)  # exit records older than this belong to an earlier incarnation
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0 --label \
    "${LAUNCH_PREFIX_ARGS[@]}" "$PYTHON" -m launch.elastic \
    --nnodes "$MIN_NODES:$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --store-endpoint "$HEAD_ADDR:$STORE_PORT" --rdzv-id "$SLURM_JOB_ID.$RESTART" \
    --max-restarts "$MAX_RESTARTS" --log-dir "$LOG_DIR/{node}" --local-addr slurm \
    -- --config "$CONFIG" "train.run_dir=$RUN_DIR" "${OVERRIDE_ARGS[@]}" &
SRUN_PID=$!
# A USR1 that came between the check above and here: relay it now.
if [[ $STOP_SIGNAL == USR1 ]]; then
    log "USR1 arrived while training was being launched: relayed to it"
    kill -USR1 "$SRUN_PID" 2>/dev/null
fi
store_up  # dies (killing srun through the EXIT trap) if the store never came up
# `wait` returns early (>128) whenever a trapped signal arrives: wait again until srun is gone.
while :; do
    wait "$SRUN_PID"
    SRUN_RC=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
SRUN_PID=
log "agents exited ($SRUN_RC; an agent exits 1 whenever a worker did not exit 0: the workers' records decide)"

# ---------------------------------------------------------------------------- verdict
"$PYTHON" -m launch.job_status "$RUN_DIR" --since "$LAUNCH_TIME"
VERDICT=$?
case $VERDICT in
    0) log "done"; exit 0 ;;
    3) log "fatal: not requeueing (see the errors above)"; exit 3 ;;
    75) requeue; exit 75 ;;
    *) if [[ $REQUEUE_ON_CRASH == 1 ]]; then requeue; else log "crash: not requeueing (REQUEUE_ON_CRASH=1 would)"; fi
       exit 1 ;;
esac
