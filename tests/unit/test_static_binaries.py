"""tests/support/static_binaries.py: telling static binaries from dynamic ones by their ELF headers."""

from __future__ import annotations

import os
import sys

import pytest

from support.static_binaries import interpreter


def test_a_dynamic_program_names_its_loader():
    loader = interpreter(os.path.realpath(sys.executable))
    assert loader is not None and os.path.basename(loader).startswith("ld-linux"), loader


def test_a_static_program_names_none(tmp_path):
    # The smallest static ELF there is: a 64-bit header with no program headers at all.
    elf = tmp_path / "static"
    elf.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(57))
    assert interpreter(elf) is None


def test_not_elf_is_an_error(tmp_path):
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(ValueError, match="not an ELF file"):
        interpreter(script)
