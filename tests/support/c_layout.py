"""What the C compiler makes of a header's structs, to hold cffi's reading of it to.

Python reads the layouts C and Python share (the wire format, the maps)
through cffi; a test compiles a tiny program against the same header and
compares every size and offset, so a difference between cffi's parse and
the compiler's padding cannot go unnoticed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def layouts(ffi, header: Path, structs: list[str], workdir: Path) -> tuple[dict, dict]:
    """({struct: (sizeof, {field: offset})} as cc compiles header, the same as cffi reads it)."""
    cc = shutil.which("cc")
    assert cc, "a C compiler is part of the build"
    fields = {s: [name for name, _ in ffi.typeof(s).fields] for s in structs}
    lines = []
    for s, names in fields.items():
        lines.append(f'printf("%zu\\n", sizeof({s}));')
        lines += [f'printf("%zu\\n", offsetof({s}, {n}));' for n in names]
    src = workdir / "layout.c"
    src.write_text(
        f'#include <stddef.h>\n#include <stdio.h>\n#include "{header}"\n'
        f"int main(void) {{ {' '.join(lines)} return 0; }}\n"
    )
    subprocess.run([cc, "-Wall", "-Werror", "-o", str(workdir / "layout"), str(src)], check=True)
    out = iter(
        int(x)
        for x in subprocess.run([str(workdir / "layout")], capture_output=True, text=True, check=True).stdout.split()
    )
    from_c = {s: (next(out), {n: next(out) for n in names}) for s, names in fields.items()}
    from_cffi = {s: (ffi.sizeof(s), {n: ffi.offsetof(s, n) for n in names}) for s, names in fields.items()}
    return from_c, from_cffi
