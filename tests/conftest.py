"""Shared fixtures. Helpers live in harness.py; this file only wires them up."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from harness import BrokerProcess, need_root_and_netns, network_namespace


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

    def start(policy_text: str, tenant: str = "t", *extra: str) -> BrokerProcess:
        b = BrokerProcess(short_tmp / f"b{len(started)}", policy_text, tenant)
        started.append(b)
        return b.start(*extra)

    yield start
    codes = [(b.stop(), b) for b in started]  # stop every broker before judging any
    for rc, b in codes:
        assert rc == 0, f"broker exited {rc}:\n{b.stderr()}"
