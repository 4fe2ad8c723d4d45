"""Can libgraft.so load in this container image? graft-runtime asks before preloading it.

The shim is built against the host's glibc. Preloaded into an image whose
programs use musl (Alpine) or an older glibc than the symbol versions it
needs, it does not degrade: ld.so refuses to start every program in the
container. So before graft-runtime adds LD_PRELOAD (preload mode), it looks
in the bundle's root filesystem for evidence, and refuses with one line
that points to seccomp mode, which needs no library in the image.

Only positive evidence refuses: a root filesystem whose libraries come from
mounts (as in the tests) or that cannot be read is given the benefit of the
doubt. The decision is ``verdict``, pure; ``scan`` is the I/O.
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


def verdict(image: Image, needed: tuple[int, int] | None) -> str | None:
    """Why the shim cannot load in image, or None if nothing says it cannot."""
    if image.glibc is None and image.musl_loaders:
        return (
            f"the image's programs use musl ({image.musl_loaders[0]}), and libgraft.so is built for glibc; "
            "put the tenant in seccomp mode"
        )
    if image.glibc is not None and needed is not None and image.glibc < needed:
        have, want = ".".join(map(str, image.glibc)), ".".join(map(str, needed))
        return (
            f"the image's glibc is {have} ({image.glibc_path}), and libgraft.so needs {want}; "
            "put the tenant in seccomp mode, or build the shim in the image"
        )
    return None


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


def check(rootfs: str, shim_path: str) -> str | None:
    """Why the shim at shim_path cannot load in the image at rootfs, or None."""
    with open(shim_path, "rb") as f:
        needed = needed_glibc(f.read())
    return verdict(scan(rootfs), needed)
