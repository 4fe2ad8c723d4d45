"""Shared fixtures, and each test's kind from its folder (tests/README.md).

Helpers live in support/; this file only wires them up. A test in unit/,
broker/, e2e/ or reliability/ gets that marker, so ``pytest -m unit`` runs
the pure tests alone.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from support.harness import BrokerProcess, need_root_and_netns, network_namespace
from support.runtime_env import rootfs, rt, site  # noqa: F401  (fixtures)
from support.seccomp_env import seccomp_broker  # noqa: F401  (a fixture)
from support.static_binaries import go_fetch  # noqa: F401  (a fixture)

KINDS = ("unit", "broker", "e2e", "reliability")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        kind = Path(item.path).relative_to(TESTS).parts[0]
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in one of {', '.join(KINDS)} (tests/README.md)")
        item.add_marker(kind)


@pytest.fixture(autouse=True)
def _unit_tests_open_no_sockets(request, monkeypatch):
    """unit/ is pure: a test there that opens a socket fails, and belongs in broker/ or e2e/.

    A socket object made from an fd that exists already (socket.socketpair,
    which trio's wake-up channel uses) is let through: it opens nothing.
    """
    if request.node.get_closest_marker("unit") is None:
        return
    real = socket.socket

    def no_new_sockets(family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None:
            raise AssertionError("a unit test opened a socket (tests/README.md: unit/ is pure)")
        return real(family, type, proto, fileno)

    monkeypatch.setattr(socket, "socket", no_new_sockets)


@pytest.fixture
def netns():
    """A fresh network namespace with only `lo`: a "container" that cannot reach the host."""
    need_root_and_netns()
    with network_namespace() as name:
        yield name


@pytest.fixture
def short_tmp():
    """A temporary directory with a short path: AF_UNIX paths hold 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="graft-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_broker(short_tmp):
    """Start graft-broker with a policy text; stopped (and checked) at teardown."""
    started: list[BrokerProcess] = []

    def start(policy_text: str, tenant: str = "t", *extra: str, **options) -> BrokerProcess:
        b = BrokerProcess(short_tmp / f"b{len(started)}", policy_text, tenant, **options)
        started.append(b)
        return b.start(*extra)

    yield start
    codes = [(b.stop(), b) for b in started]  # stop every broker before judging any
    for rc, b in codes:
        assert rc == 0, f"broker exited {rc}:\n{b.stderr()}"
