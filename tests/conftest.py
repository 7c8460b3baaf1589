"""Shared pytest fixtures."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# --------------------------------------------------------------------------- moto S3 server


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    env: dict[str, str]  # the AWS_* variables pointing clients (and subprocesses) at the server


_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Keep botocore away from any real profile/config on the machine.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 (random port) for the whole session.

    AWS_* variables (dummy credentials, AWS_ENDPOINT_URL) are set in os.environ
    while it runs and restored afterwards.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:  # moto[server] pulls flask/werkzeug
        pytest.skip(f"moto server not importable ({e}); install moto[server] to run S3 tests")

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint_url=endpoint, env=env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


# ------------------------------------------------------- parallel test workers (pytest-xdist)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into node ids
def pytest_collection_modifyitems(config, items):
    """With `--dist loadgroup`: each test file runs on one worker (its module fixtures are built
    once), and every file that starts the local Slurm cluster shares one worker (there is one
    munge and one set of Slurm daemons per machine)."""
    slurm_files = {item.nodeid.split("::")[0] for item in items if "slurm" in getattr(item, "fixturenames", ())}
    for item in items:
        file = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group("slurm" if file in slurm_files else file))
    # xdist hands out groups in collection order: the longest first (the Slurm group is several
    # files on one worker), so that the many short files fill the other workers meanwhile and
    # the run does not end on one worker's long tail
    def rank(item) -> int:
        file = item.nodeid.split("::")[0]
        if file in slurm_files:
            return 0
        return 1 + LONGEST_FIRST.index(file) if file in LONGEST_FIRST else 1 + len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file keeps its own order


# the files that take minutes on the 2-core machine (make test's --durations), longest first
LONGEST_FIRST = [
    "tests/distributed/test_hierarchical.py", "tests/integration/test_elastic.py",
    "tests/integration/test_checkpoint_faults.py", "tests/distributed/test_resume.py",
    "tests/integration/test_misuse.py", "tests/integration/test_hf_roundtrip.py",
    "tests/integration/test_signals.py", "tests/distributed/test_parallel_equivalence.py",
    "tests/distributed/test_autotune_run.py", "tests/integration/test_monitoring.py",
    "tests/integration/test_bad_input.py", "tests/integration/test_dashboard.py",
]


def pytest_collection_finish(session):
    """Refuse to run a worker whose loadgroup marks did not take (pytest and pytest-xdist out of
    step): the suite would still pass, only rebuilding every module fixture per test, slowly."""
    config = session.config
    if hasattr(config, "workerinput") and config.getvalue("loadgroup") and session.items:
        if not any("@" in item.nodeid for item in session.items):
            raise pytest.UsageError("pytest-xdist's --dist loadgroup did not group the tests (pytest "
                                    f"{pytest.__version__}); install the versions pyproject.toml pins: make install")
