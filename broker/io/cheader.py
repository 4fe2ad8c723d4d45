"""Reading a C header's declarations into cffi, so that Python and C share one definition.

A header marks the region cffi reads with ``/* NAME-BEGIN */`` and
``/* NAME-END */``: the shim's wire format (wire.py) and the seccomp
agent's C loop (seccomp/fast.py) use it.
"""

from __future__ import annotations

import re
from pathlib import Path

import cffi


def ffi_of(header: Path, name: str) -> cffi.FFI:
    """A cffi.FFI holding the declarations between header's NAME-BEGIN and NAME-END markers."""
    m = re.search(rf"/\* {name}-BEGIN \*/(.*)/\* {name}-END \*/", header.read_text(), re.S)
    if m is None:
        raise RuntimeError(f"{header}: {name}-BEGIN/{name}-END markers missing")
    ffi = cffi.FFI()
    ffi.cdef(m.group(1))
    return ffi
