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


def pytest_collection_finish(session):
    """Refuse to run a worker whose loadgroup marks did not take (pytest and pytest-xdist out of
    step): the suite would still pass, only rebuilding every module fixture per test, slowly."""
    config = session.config
    if hasattr(config, "workerinput") and config.getvalue("loadgroup") and session.items:
        if not any("@" in item.nodeid for item in session.items):
            raise pytest.UsageError("pytest-xdist's --dist loadgroup did not group the tests (pytest "
                                    f"{pytest.__version__}); install the versions pyproject.toml pins: make install")
