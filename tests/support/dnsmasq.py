"""dnsmasq, started as an operator would, as the upstream resolver of a test, the demo or a bench.

Debian's dnsmasq (package dnsmasq-base: the binary, no system service)
answers a few host records on a loopback address of the test's choosing,
port 53, reading no resolv.conf, hosts file or configuration of the host's,
and forwarding nothing: what it does not know is NXDOMAIN. It is ready once
it answers a query (asked here, bounded), and is stopped on exit.

``wildcards`` (domain -> IPv4 address) answers every name under a domain,
so that a bench can ask a distinct name per query (bench/dns_lookup.py:
a resolver's cache misses each time); ``cpus`` pins it, as benches pin
their servers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager

from .dns_server import TYPE_A, encode_query

READY_TIMEOUT = 10.0


def dnsmasq_binary() -> str | None:
    return shutil.which("dnsmasq", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


@contextmanager
def dnsmasq(
    address: str,
    records: dict[str, str],
    ttl: int = 300,
    port: int = 53,
    wildcards: dict[str, str] | None = None,
    cpus: set[int] | None = None,
):
    """dnsmasq answering records (name -> IPv4 address) on address:port, with ttl; yields (address, port).

    wildcards: domain -> IPv4 address, for every name under the domain (and the domain itself).
    cpus: the CPUs it may run on (it is single-threaded).
    """
    binary = dnsmasq_binary()
    if binary is None:
        raise RuntimeError("needs dnsmasq (make deps installs dnsmasq-base)")
    cmd = [
        binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        f"--listen-address={address}",
        f"--port={port}",
        "--pid-file=",  # none: nothing is left behind
        "--user=root",  # it drops no privileges: it runs for the length of one test
        f"--local-ttl={ttl}",
        "--local=/#/",  # every name is local: what it does not know is NXDOMAIN
        "--log-facility=-",
        *(f"--host-record={name},{ip}" for name, ip in records.items()),
        # more specific than --local=/#/, so these domains are answered, not NXDOMAIN
        *(f"--address=/{domain}/{ip}" for domain, ip in (wildcards or {}).items()),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if cpus is not None:
            try:
                os.sched_setaffinity(proc.pid, cpus)  # kept across its exec, if it has not happened yet
            except ProcessLookupError:  # gone already: the wait below says why
                pass
        probe = next(iter(records)) if records or not wildcards else f"ready.{next(iter(wildcards))}"
        _wait_until_answering(proc, address, port, probe)
        yield address, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _wait_until_answering(proc: subprocess.Popen, address: str, port: int, name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
            try:
                s.sendto(encode_query(name, TYPE_A), (address, port))
                s.recvfrom(4096)
                return
            except (TimeoutError, ConnectionRefusedError):
                continue
    raise RuntimeError(f"dnsmasq did not answer on {address}:{port} within {READY_TIMEOUT}s")
