"""Which build of the shim can load in this container image? graft-runtime asks before mounting one.

There are two builds of libgraft.so from the same sources: one against the
host's glibc, one against musl (libgraft-musl.so, for Alpine and other musl
images). graft-runtime mounts the one that matches the image's C library at
the same path in the container, so LD_PRELOAD does not change. A build that
does not match does not degrade: glibc's ld.so refuses to start a program
when a preloaded library needs newer symbol versions than the image's glibc
has, and musl's loader takes the glibc build's libc.so.6 for itself and then
fails on symbols it lacks (__register_atfork), so every program in the
container would die. So before graft-runtime adds LD_PRELOAD (preload mode),
it looks in the bundle's root filesystem for evidence, and refuses what
neither build can load with one line that points to seccomp mode, which
needs no library in the image:

- glibc's libc.so.6 found: the glibc build, if that glibc is at least the
  newest GLIBC_x.y version the build needs (read from the build itself);
  else refused: the musl build cannot help, the image's programs load glibc.
  An image with both (a Debian image with musl added, say) gets the glibc
  build: there, glibc is the system's C library;
- only a musl loader (/lib/ld-musl-*.so.1): the musl build, refused if it
  is not installed (the host had no musl-gcc when graft was built);
- nothing found (libraries from mounts, as in the tests, or an unreadable
  root filesystem): the glibc build, given the benefit of the doubt.

The decision is ``verdict``, pure; ``scan`` and ``choose`` are the I/O.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_NEEDS = re.compile(rb"GLIBC_(\d+)\.(\d+)")  # version needs in the shim's .dynstr
_RELEASE = re.compile(rb"release version (\d+)\.(\d+)")  # libc.so.6's banner
# Where images keep the C library: Debian multiarch, Red Hat lib64, plain lib.
_LIBC_GLOBS = ("lib*/libc.so.6", "lib*/*-linux-gnu*/libc.so.6", "usr/lib*/libc.so.6", "usr/lib*/*-linux-gnu*/libc.so.6")
_MUSL_GLOBS = ("lib/ld-musl-*.so.1", "usr/lib/ld-musl-*.so.1")


@dataclass(frozen=True)
class Image:
    """What a root filesystem shows of its C library."""

    musl_loaders: tuple[str, ...] = ()
    glibc: tuple[int, int] | None = None  # the newest libc.so.6 found
    glibc_path: str | None = None


def needed_glibc(shim: bytes) -> tuple[int, int] | None:
    """The newest GLIBC_x.y symbol version the shim needs."""
    found = [(int(a), int(b)) for a, b in _NEEDS.findall(shim)]
    return max(found) if found else None


def glibc_release(libc: bytes) -> tuple[int, int] | None:
    match = _RELEASE.search(libc)
    return (int(match[1]), int(match[2])) if match else None


GLIBC, MUSL = "glibc", "musl"


@dataclass(frozen=True)
class Choice:
    """The build to mount (GLIBC or MUSL), and why it cannot load (None: nothing says it cannot)."""

    libc: str
    why: str | None = None


def verdict(image: Image, needed: tuple[int, int] | None, musl_built: bool) -> Choice:
    """Which build of the shim suits image.

    needed: the newest GLIBC_x.y the glibc build needs; musl_built: whether the musl build is installed.
    """
    if image.glibc is None and image.musl_loaders:
        if musl_built:
            return Choice(MUSL)
        return Choice(
            MUSL,
            f"the image's programs use musl ({image.musl_loaders[0]}), and the musl build of the shim "
            "(libgraft-musl.so) is not installed; build it (make build, with musl-gcc from musl-tools), "
            "or put the tenant in seccomp mode",
        )
    if image.glibc is not None and needed is not None and image.glibc < needed:
        have, want = ".".join(map(str, image.glibc)), ".".join(map(str, needed))
        return Choice(
            GLIBC,
            f"the image's glibc is {have} ({image.glibc_path}), and libgraft.so needs {want}; "
            "put the tenant in seccomp mode, or build the shim in the image",
        )
    return Choice(GLIBC)


def scan(rootfs: str) -> Image:
    """What rootfs holds, looking only at files that resolve inside it (an image's absolute symlinks do not)."""
    root = Path(rootfs)
    real_root = os.path.realpath(rootfs)

    def inside(pattern: str) -> list[Path]:
        try:
            return [
                p
                for p in sorted(root.glob(pattern))
                if os.path.realpath(p).startswith(real_root + os.sep) and os.path.isfile(p)
            ]
        except OSError:
            return []

    musl = tuple(str(p.relative_to(root)) for g in _MUSL_GLOBS for p in inside(g))
    best: tuple[tuple[int, int], str] | None = None
    for pattern in _LIBC_GLOBS:
        for path in inside(pattern):
            try:
                version = glibc_release(path.read_bytes())
            except OSError:
                continue
            if version and (best is None or version > best[0]):
                best = (version, "/" + str(path.relative_to(root)))
    return Image(musl, best[0] if best else None, best[1] if best else None)


def choose(rootfs: str, glibc_shim: str, musl_shim: str) -> tuple[str, str | None]:
    """(the host path of the build to mount in the image at rootfs, why it cannot load there or None)."""
    with open(glibc_shim, "rb") as f:
        needed = needed_glibc(f.read())
    choice = verdict(scan(rootfs), needed, os.path.isfile(musl_shim))
    return (musl_shim if choice.libc == MUSL else glibc_shim), choice.why
