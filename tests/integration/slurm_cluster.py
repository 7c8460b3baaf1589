"""A real Slurm cluster on localhost for tests: munged, slurmctld and two slurmd faking nodes n1
and n2 (Debian's slurm-wlm 22.05 is built with MULTIPLE_SLURMD), all state under one temp dir,
private ports, every daemon started here and stopped by its pid at teardown.

    with SlurmCluster.start() as cluster:
        job = cluster.sbatch(["slurm/pretrain.sh"], env=...)
        cluster.wait_for_state(job, {"COMPLETED"}, timeout=120)

or, in tests, the session fixture `slurm` (import it into the test module).

The nodes declare 8 fake GPUs each (gres whose device files are links to /dev/null) so that the job scripts run as
written, `--gpus-per-node=8` included; nothing here has CUDA, training runs on CPU (gloo).
n1/n2 do not resolve by DNS: job scripts must ask Slurm for a node's address (NodeAddr).

Installing needs root and apt-get (`apt-get install slurmctld slurmd slurm-client munge`, ~14 MB);
`ensure_installed` returns why it cannot instead of raising, so callers skip only then. Any other
failure (a daemon that does not start, a node that never turns idle) raises with the daemon logs.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import pytest

from tests import apt

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel"]
NODES = ("n1", "n2")
GPUS_PER_NODE = 8


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def ensure_installed() -> str | None:
    """Install Slurm and munge if needed. Returns None when ready, or why it cannot be installed
    (not root, no apt-get). An apt-get that runs and fails raises: that is a setup failure."""
    try:
        apt.install(PACKAGES, lambda: not _missing(), timeout=600)
    except apt.CannotInstall:
        return f"Slurm is not installed ({', '.join(_missing())} missing) and installing it needs root and apt-get"
    return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(_missing())} missing) and installing it needs root"
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(_missing())} missing) and there is no apt-get to install it"
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    if _missing():
        raise RuntimeError(f"{' '.join(cmd)} succeeded but {_missing()} are still missing")
    return None


def _free_ports(n: int) -> list[int]:
    """n ports free on every address, below the ephemeral range: a port taken from that range can
    be grabbed meanwhile as the local end of some outgoing connection (other tests' gloo traffic)."""
    lo, _ = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(max(1024, lo - 12000), lo)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


SLURM_CONF = """\
ClusterName=mttstest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=600
KillWait=30
InactiveLimit=0
{nodes}
PartitionName=test Nodes={nodelist} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

NODE_LINE = ("NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
             "RealMemory=4000 Gres=gpu:{gpus} State=UNKNOWN")


@dataclass
class SlurmCluster:
    root: str
    conf: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ------------------------------------------------------------------ start / stop
    @classmethod
    def start(cls, root: str | None = None, timeout: float = 60) -> "SlurmCluster":
        # Not under pytest's 0700 tmp dirs: munged runs as the munge user and must reach its dir.
        root = root or tempfile.mkdtemp(prefix="mtts-slurm-")
        os.chmod(root, 0o755)
        for d in ("state", "log", "munge", *(f"spool/{n}" for n in NODES)):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        munge_dir = os.path.join(root, "munge")
        cpus = os.cpu_count() or 1
        nodes = "\n".join(NODE_LINE.format(name=n, port=p, cpus=cpus, gpus=GPUS_PER_NODE)
                          for n, p in zip(NODES, node_ports))
        conf = os.path.join(root, "slurm.conf")
        with open(conf, "w") as f:
            f.write(SLURM_CONF.format(ctld_port=ctld_port, root=root, nodes=nodes, nodelist=",".join(NODES),
                                      munge_socket=os.path.join(munge_dir, "munge.socket")))
        # Fake GPUs so that --gpus-per-node works without hardware. Slurm drops file-less GPUs and
        # wants character devices: each one is a link to /dev/null.
        os.makedirs(os.path.join(root, "dev"), exist_ok=True)
        for i in range(GPUS_PER_NODE):
            os.symlink("/dev/null", os.path.join(root, "dev", f"gpu{i}"))
        with open(os.path.join(root, "gres.conf"), "w") as f:
            f.write("AutoDetect=off\n")
            for n in NODES:
                f.write(f"NodeName={n} Name=gpu File={root}/dev/gpu[0-{GPUS_PER_NODE - 1}]\n")
        cluster = cls(root=root, conf=conf)
        try:
            cluster._start_munge(munge_dir)
            cluster._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-c", "-f", conf])
            for n in NODES:
                cluster._spawn(f"slurmd-{n}", [_sbin("slurmd"), "-D", "-N", n, "-f", conf])
            cluster._wait_idle(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_munge(self, munge_dir: str) -> None:
        munge = pwd.getpwnam("munge")
        key = os.path.join(munge_dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        for path in (munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(munge_dir, 0o711)
        os.chmod(key, 0o400)
        sock = os.path.join(munge_dir, "munge.socket")
        cmd = ["runuser", "-u", "munge", "--", _sbin("munged"), "--foreground", "--force",
               f"--socket={sock}", f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid",
               f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"]
        self._spawn("munged", cmd)
        self._wait(lambda: os.path.exists(sock), 20, "munged's socket")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(os.path.join(self.root, "log", f"{name}.out"), "ab")
        try:
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                                start_new_session=True)
        finally:
            log.close()

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"Slurm test cluster: {dead} exited while waiting for {what}\n{self.logs()}")
            if cond():
                return
            time.sleep(0.2)
        raise RuntimeError(f"Slurm test cluster: no {what} after {timeout} s\n{self.logs()}")

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            p = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
            states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
            return p.returncode == 0 and all(states.get(n) == "idle" for n in NODES)

        self._wait(idle, timeout, f"idle nodes {NODES}")

    def stop(self) -> None:
        """Cancel every job and wait for it to end (Slurm SIGKILLs after KillWait=30 s), then stop
        the daemons: slurmd first, munged last."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--partition=test"], check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                p = self.run(["squeue", "-h", "-t", "pending,running,completing,requeued,suspended"], check=False)
                if p.returncode != 0 or not p.stdout.strip():
                    break
                time.sleep(0.5)
        for name in sorted(self.procs, key=lambda n: (n == "munged", n == "slurmctld")):
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients
    def env(self, extra: dict | None = None) -> dict:
        return {**os.environ, "SLURM_CONF": self.conf, **(extra or {})}

    def run(self, cmd: list[str], check: bool = True, env: dict | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, env=self.env(env), capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout}{p.stderr}")
        return p

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> int:
        p = subprocess.run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd, capture_output=True,
                           text=True, timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}")
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+(?:/\w+)?)=(\S*)", out))

    def wait_for(self, job_id: int, cond, timeout: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if cond(info):
                return info
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id}: no {what} after {timeout} s; last: {info}")

    def wait_for_state(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        return self.wait_for(job_id, lambda j: j.get("JobState") in states, timeout, f"state in {states}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for d in ("log", "munge"):
            d = os.path.join(self.root, d)
            for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                if name.endswith((".log", ".out")):
                    try:
                        with open(os.path.join(d, name), errors="replace") as f:
                            out.append(f"--- {name}\n{f.read()[-tail:]}")
                    except OSError:
                        pass
        return "\n".join(out)


@pytest.fixture(scope="session")
def slurm():
    """The cluster for a whole test session. Skips only where Slurm cannot be installed."""
    why = ensure_installed()
    if why:
        pytest.skip(why)
    t0 = time.monotonic()
    cluster = SlurmCluster.start()
    print(f"\nSlurm test cluster (munged, slurmctld, slurmd {' '.join(NODES)}) up in {time.monotonic() - t0:.1f} s")
    try:
        yield cluster
    finally:
        cluster.stop()
