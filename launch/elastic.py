"""torchrun for elastic jobs, with the two settings measured to make restarts work
(notes/infra.md):

- TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: by default workers reuse the rendezvous TCP store,
  which keeps dead workers' addresses: restarts after a lost worker fail with gloo
  "Connection refused" or hang (pytorch#135712, #167288).
- --store-endpoint HOST:PORT: use a store started apart from the agents (launch.rdzv_store),
  so losing the first node does not end the job.

    python -m launch.elastic --nnodes 1:4 --nproc-per-node 8 --store-endpoint head:29400 \
        [--max-restarts 100] [--rdzv-id JOB] -- --config configs/llasa-1b.yaml key=value ...

Everything after `--` goes to launch.pretrain; restarts resume from the last committed
checkpoint (train.resume=auto is the default).
"""

from __future__ import annotations

import argparse
import os
import sys

# Faster detection of a lost agent than torchrun's defaults (~47 s -> ~8 s measured here).
RDZV_CONF = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3"


def torchrun_argv(a: argparse.Namespace, train_args: list[str]) -> list[str]:
    conf = RDZV_CONF + (",is_host=false" if a.store_endpoint else "")
    endpoint = a.store_endpoint or a.rdzv_endpoint
    argv = ["--nnodes", a.nnodes, "--nproc-per-node", str(a.nproc_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", a.rdzv_id,
            "--rdzv-conf", conf, "--max-restarts", str(a.max_restarts), "--monitor-interval", "1"]
    if a.log_dir:
        argv += ["--log-dir", a.log_dir]
    return argv + ["-m", "launch.pretrain", *train_args]


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
    p.add_argument("--log-dir")
    a = p.parse_args(argv)
    if not train_args:
        p.error("give the training arguments after --, e.g. -- --config configs/tiny.yaml")
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    from torch.distributed.run import main as torchrun

    torchrun(torchrun_argv(a, train_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
