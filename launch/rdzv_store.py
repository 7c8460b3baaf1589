"""A rendezvous store that runs apart from the torchrun agents.

With c10d rendezvous, the agent whose host matches --rdzv-endpoint hosts the TCP store; when
that agent (or its node) dies, every other agent loses the rendezvous and the job ends
(notes/infra.md: RendezvousConnectionError). Run this on the head node instead, before the
agents, and point the agents at it with `--rdzv-conf is_host=false` (launch.elastic does):

    python -m launch.rdzv_store --host 0.0.0.0 --port 29400 [--ready-file PATH]

It serves until SIGTERM/SIGINT. The store holds only rendezvous state; losing it ends the
current rendezvous, so run it where the batch script runs (the Slurm head node).
"""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.rdzv_store")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=29400)
    p.add_argument("--ready-file", help="written with the port once the store listens")
    a = p.parse_args(argv)

    from torch.distributed import TCPStore

    store = TCPStore(a.host, a.port, is_master=True, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=60), multi_tenant=True)
    if a.ready_file:
        with open(a.ready_file, "w") as f:
            f.write(f"{store.port}\n")
    print(f"rendezvous store listening on {a.host}:{store.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
