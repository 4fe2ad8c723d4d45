"""Locations of the shim's build products, for the CLI and the broker.

libgraft.so itself is C (libgraft.c); this module only tells Python where the
installed library and the wire header are. libgraft-musl.so is the same
shim built against musl, for musl images (graft/imagecheck.py); it is
missing where graft was built without musl-gcc.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
LIB_PATH = _HERE / "libgraft.so"
MUSL_LIB_PATH = _HERE / "libgraft-musl.so"
WIRE_HEADER = _HERE / "graft_wire.h"
