"""Run many `python -m <module> ...` command lines for the price of one interpreter start-up.

Most of a failing CLI call is importing torch and megatron-core; the error itself takes
milliseconds. A driver process imports those once, then forks a fresh child per command line:
each child runs the module as `__main__` exactly as `python -m` would, in its own process, with
its own stdout/stderr and its own exit code (atexit handlers, uncaught exceptions and `os._exit`
behave as in a real process). What the driver printed while importing is prepended to every
child's output, so a test that asserts on the whole output still sees import-time noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from tests.helpers import REPO, env

_DRIVER = r"""
import json, os, runpy, sys
spec = json.load(open(sys.argv[1]))
out_dir = spec["out_dir"]

def redirect(prefix):
    sys.stdout.flush(); sys.stderr.flush()
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(os.path.join(out_dir, f"{prefix}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)

redirect("preload")
for name in spec["setup"]:
    mod, fn = name.rsplit(":", 1)
    getattr(__import__(mod, fromlist=[fn]), fn)()
for mod in spec["preload"]:
    __import__(mod)
sys.stdout.flush(); sys.stderr.flush()

codes = {}
for case, argv in spec["cases"].items():
    pid = os.fork()
    if pid == 0:
        redirect(case)
        sys.argv = [spec["module"], *argv]
        sys.modules.pop(spec["module"], None)  # imported by a setup function: run it afresh, as -m does
        runpy.run_module(spec["module"], run_name="__main__", alter_sys=True)
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    codes[case] = os.waitstatus_to_exitcode(status)
json.dump(codes, open(os.path.join(out_dir, "codes.json"), "w"))
"""


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_many(module: str, cases: dict[str, list[str]], preload: tuple[str, ...] = (),
             setup: tuple[str, ...] = (), timeout: float = 600) -> dict[str, CliResult]:
    """`python -m module *argv` for every case, one at a time, forked from one driver that first
    calls each `setup` ("pkg.mod:function", e.g. the entry point's own warning filters, so that
    preloading prints what the real start-up would) and imports `preload`."""
    with tempfile.TemporaryDirectory(prefix="forkcli-") as out_dir:
        spec_path = os.path.join(out_dir, "spec.json")
        with open(spec_path, "w") as f:
            json.dump({"module": module, "cases": cases, "preload": list(preload), "setup": list(setup),
                       "out_dir": out_dir}, f)
        p = subprocess.run([sys.executable, "-c", _DRIVER, spec_path], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=timeout)

        def read(name: str) -> str:
            path = os.path.join(out_dir, name)
            return open(path, errors="replace").read() if os.path.exists(path) else ""

        codes_path = os.path.join(out_dir, "codes.json")
        if p.returncode != 0 or not os.path.exists(codes_path):
            raise RuntimeError(f"forkcli driver failed ({p.returncode}):\n{read('preload.stderr')[-3000:]}"
                               f"\n{p.stderr[-3000:]}")
        codes = json.load(open(codes_path))
        pre_out, pre_err = read("preload.stdout"), read("preload.stderr")
        return {case: CliResult(codes[case], pre_out + read(f"{case}.stdout"), pre_err + read(f"{case}.stderr"))
                for case in cases}
