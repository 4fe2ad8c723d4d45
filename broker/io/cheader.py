"""Reading a C header's declarations into cffi, so that Python and C share one definition.

A header marks the region cffi reads with ``/* NAME-BEGIN */`` and
``/* NAME-END */``: the shim's wire format (wire.py), the seccomp
agent's C loop (seccomp/fast.py) and the fast path's C (confine/fastpath.py)
use it; the last two load their library with ``lazy_library``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cffi


def ffi_of(header: Path, name: str) -> cffi.FFI:
    """A cffi.FFI holding the declarations between header's NAME-BEGIN and NAME-END markers."""
    m = re.search(rf"/\* {name}-BEGIN \*/(.*)/\* {name}-END \*/", header.read_text(), re.S)
    if m is None:
        raise RuntimeError(f"{header}: {name}-BEGIN/{name}-END markers missing")
    ffi = cffi.FFI()
    ffi.cdef(m.group(1))
    return ffi


def lazy_library(ffi: cffi.FFI, path: Path, unavailable: type[Exception]) -> Callable[[], Any]:
    """A function returning the C library at path, loaded through ffi on its first call.

    Raises unavailable with the reason while it cannot be loaded (not built).
    """
    lib = None

    def library() -> Any:
        nonlocal lib
        if lib is None:
            try:
                lib = ffi.dlopen(str(path))
            except OSError as e:
                raise unavailable(f"cannot load {path} (built by `make build`): {e}") from None
        return lib

    return library
