"""Statically linked programs for the seccomp-mode tests: build them, and prove they are static.

seccomp mode exists for programs that an LD_PRELOAD shim cannot reach
(docs/compatibility.md): a binary with no ELF interpreter never runs the
dynamic loader, so it never reads LD_PRELOAD. The tests check that property
on the binaries they use (``interpreter``) rather than trust a package name,
and build their Go programs here from tests/support/programs/go with the standard
library only, offline.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from .harness import need_program

GO_SOURCES = Path(__file__).resolve().parent / "programs" / "go"
GO_COMMANDS = ("client", "server")
# fetch: an HTTP GET by name with Go's own resolver (e2e/test_names_go.py), built only by the tests that run it.
GO_NAME_COMMANDS = ("fetch",)
_PT_INTERP = 3


def interpreter(path: str | os.PathLike) -> str | None:
    """The ELF interpreter (PT_INTERP) that path asks the kernel to load, None for a static binary."""
    with open(path, "rb") as f:
        ident = f.read(16)
        if ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise ValueError(f"{path} is not an ELF file")
        wide, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
        # e_phoff, then (past e_shoff, e_flags, e_ehsize) e_phentsize and e_phnum
        header = struct.Struct(order + ("16xHHIQQQIHHH" if wide else "16xHHIIIIIHHH"))
        f.seek(0)
        fields = header.unpack(f.read(header.size))
        phoff, phentsize, phnum = fields[4], fields[8], fields[9]
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            if wide:
                p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack(order + "IIQQQQ", f.read(40))
            else:
                p_type, p_offset, _va, _pa, p_filesz = struct.unpack(order + "IIIII", f.read(20))
            if p_type == _PT_INTERP:
                f.seek(p_offset)
                return f.read(p_filesz).rstrip(b"\0").decode()
    return None


def go_env(cache: Path) -> dict[str, str]:
    """The environment for an offline, static, reproducible `go build` with its caches under cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GO", "CGO_"))}
    env.update(
        CGO_ENABLED="0",  # the point: no libc, so no LD_PRELOAD
        GOCACHE=str(cache / "build"),
        GOPATH=str(cache / "path"),
        GOENV="off",  # ignore the user's go env file
        GOFLAGS="-mod=mod",
        GOPROXY="off",  # standard library only: never fetch a module
        GOSUMDB="off",
        GOTOOLCHAIN="local",  # Go >= 1.21 would otherwise try to download the go.mod's toolchain
        GO111MODULE="on",
    )
    return env


def build_go(out: Path, cache: Path, commands: tuple[str, ...] = GO_COMMANDS) -> dict[str, Path]:
    """Build each of commands (default GO_COMMANDS) into out; {name: path}. Raises with go's output on failure."""
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["go", "build", "-trimpath", "-o", f"{out}/", *(f"./{c}" for c in commands)],
        cwd=GO_SOURCES,
        env=go_env(cache),
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    if r.returncode != 0:
        raise RuntimeError(f"go build failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return {c: out / c for c in commands}


@pytest.fixture(scope="session")
def go_fetch(request, tmp_path_factory) -> str:
    """programs/go/fetch (a GET by name with Go's own resolver), built with CGO_ENABLED=0 and checked static."""
    need_program("go")
    cache_provider = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = cache_provider.mkdir("graft-go") if cache_provider else tmp_path_factory.mktemp("go-cache")
    path = build_go(tmp_path_factory.mktemp("go-bin"), cache, GO_NAME_COMMANDS)["fetch"]
    # What its tests rest on: no ELF interpreter, so no libc resolver and no LD_PRELOAD.
    assert interpreter(path) is None, f"fetch is not static: it asks for {interpreter(path)}"
    return str(path)
