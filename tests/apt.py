"""Debian packages the integration tests need (Slurm, Chromium, espeak-ng), installed with apt-get
when missing, one installer at a time across parallel test workers (dpkg takes one)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time

APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-q"]  # other jobs may hold the dpkg lock for a while
LOCK = "/tmp/megatron-tts-apt.lock"


class CannotInstall(Exception):
    """Not root or no apt-get: the caller skips with this reason."""


def install(packages: list[str], present, timeout: float = 1200) -> float:
    """apt-get install ``packages`` unless ``present()`` already holds; returns the seconds it took
    (0 when nothing was installed). Raises CannotInstall, or RuntimeError when apt-get fails."""
    if present():
        return 0.0
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise CannotInstall(f"{' '.join(packages)} missing, and installing needs root and apt-get "
                            f"(apt-get install --no-install-recommends {' '.join(packages)})")
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if present():  # another worker installed it meanwhile
            return 0.0
        t0 = time.monotonic()
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = APT + ["install", "-y", "--no-install-recommends", *packages]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:  # stale package lists: refresh them once
            subprocess.run(APT + ["update"], env=env, capture_output=True, text=True, timeout=600)
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0 or not present():
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        return time.monotonic() - t0
