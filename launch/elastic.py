"""torchrun for elastic jobs, with the settings measured to make restarts and stops work
(notes/infra.md):

- TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each round's workers get a store of their own instead of
  the agents' rendezvous store, which keeps dead workers' keys (pytorch#135712, #167288). The
  workers are immune either way (megatron_tts.compat.elastic keys the process group by the
  rendezvous round), so plain torchrun restarts work too; this keeps the agents' store out of
  the workers' path.
- --store-endpoint HOST:PORT: use a store started apart from the agents (launch.rdzv_store),
  so losing the first node does not end the job.
- SIGUSR1 is a stop signal like SIGTERM: the agent forwards it to its workers (which save a
  committed checkpoint at the next step boundary and exit 75), waits up to --shutdown-timeout
  for them, and exits. A default torchrun dies on USR1 and orphans its workers mid-save.

    python -m launch.elastic --nnodes 1:4 --nproc-per-node 8 --store-endpoint head:29400 \
        [--max-restarts 100] [--rdzv-id JOB] [--log-dir DIR] -- --config configs/llasa-1b.yaml key=value ...

Everything after `--` goes to launch.pretrain; restarts resume from the last committed
checkpoint (train.resume=auto is the default). The agent's own exit code is 1 whenever a worker
failed or the agent was signalled: the outcome is in RUN_DIR/exit/ (python -m launch.job_status).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys

# Faster detection of a lost agent than torchrun's defaults (~47 s -> ~8 s measured here).
RDZV_CONF = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3"
# torchrun's defaults plus SIGUSR1 (Slurm's "checkpoint before the time limit" signal).
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def torchrun_argv(a: argparse.Namespace, train_args: list[str]) -> list[str]:
    conf = RDZV_CONF + (",is_host=false" if a.store_endpoint else "")
    endpoint = a.store_endpoint or a.rdzv_endpoint
    argv = ["--nnodes", a.nnodes, "--nproc-per-node", str(a.nproc_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", a.rdzv_id,
            "--rdzv-conf", conf, "--max-restarts", str(a.max_restarts), "--monitor-interval", "1",
            "--signals-to-handle", SIGNALS_TO_HANDLE, "--shutdown-timeout", str(a.shutdown_timeout)]
    if a.local_addr:
        argv += ["--local-addr", slurm_node_addr() if a.local_addr == "slurm" else a.local_addr]
    if a.log_dir:
        # One agent per node may share a log dir on a shared filesystem: {node} tells them apart.
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        argv += ["--log-dir", a.log_dir.replace("{node}", node), "--tee", a.tee]
    return argv + ["-m", "launch.pretrain", *train_args]


def slurm_node_addr() -> str:
    """This node's address as Slurm knows it (NodeAddr): node names need not resolve by DNS."""
    node = os.environ.get("SLURMD_NODENAME")
    if not node:
        raise SystemExit("error: --local-addr slurm needs SLURMD_NODENAME (run the agent under srun)")
    out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, timeout=60)
    m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    if out.returncode != 0 or not m:
        raise SystemExit(f"error: scontrol show node {node} gave no NodeAddr ({out.returncode}): "
                         f"{out.stderr.strip()}")
    return m.group(1)


def _stop_before_workers(signum, frame):
    # torchrun installs its handlers only when it starts the workers: a USR1 during the first
    # rendezvous would otherwise kill the agent by default. Raised like torchrun's own handler,
    # so the agent shuts down the same way; while torch is still importing, there is nothing
    # to shut down (no import here: the signal may land inside that very import).
    sig = signal.Signals(signum)
    api = sys.modules.get("torch.distributed.elastic.multiprocessing.api")
    if api is None or not hasattr(api, "SignalException"):
        raise SystemExit(f"launch.elastic: {sig.name} before the workers started; exiting")
    raise api.SignalException(f"Process {os.getpid()} got signal: {sig}", sigval=sig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m launch.elastic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nnodes", required=True, help="MIN:MAX nodes")
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--store-endpoint", help="HOST:PORT of launch.rdzv_store (recommended)")
    p.add_argument("--rdzv-endpoint", default="127.0.0.1:29400", help="used when no --store-endpoint")
    p.add_argument("--rdzv-id", default=os.environ.get("SLURM_JOB_ID", "megatron-tts"))
    p.add_argument("--max-restarts", type=int, default=100)
    p.add_argument("--shutdown-timeout", type=int,
                   default=int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 240)),
                   help="seconds a stopped worker gets to save its checkpoint before SIGKILL "
                        "(default 240, under Slurm's --signal=B:USR1@300)")
    p.add_argument("--local-addr", help="address the other nodes reach this one at (torchrun --local-addr; "
                                        "the workers' MASTER_ADDR when this node hosts rank 0); 'slurm': "
                                        "this node's NodeAddr from scontrol")
    p.add_argument("--log-dir", help="torchrun's --log-dir; '{node}' becomes the Slurm node name (or host name)")
    p.add_argument("--tee", default="3", help="torchrun --tee with --log-dir: 3 = workers' stdout and stderr "
                                              "to files and to the console")
    a = p.parse_args(argv)
    if not train_args:
        p.error("give the training arguments after --, e.g. -- --config configs/tiny.yaml")
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    signal.signal(signal.SIGUSR1, _stop_before_workers)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # Both end in 1, as torchrun does, without its traceback: the workers' outcome is in
    # RUN_DIR/exit/ (python -m launch.job_status), torchrun's failure table names their codes.
    try:
        torchrun(torchrun_argv(a, train_args))
    except SignalException as e:
        print(f"launch.elastic: stopped by {e.sigval.name}; the workers were asked to save and exit "
              f"(their codes: RUN_DIR/exit/, python -m launch.job_status RUN_DIR)", file=sys.stderr, flush=True)
        return 1
    except ChildFailedError as e:
        print(e.format_msg(), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
