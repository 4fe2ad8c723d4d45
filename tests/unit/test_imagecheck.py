"""graft/imagecheck.py: which build of the shim (glibc or musl) can load in an image, from its root filesystem."""

from __future__ import annotations

import os

import pytest

from graft import imagecheck
from graft.imagecheck import GLIBC, MUSL, Image
from graft.shim import LIB_PATH, MUSL_LIB_PATH

BANNER = b"\x00GNU C Library (Debian GLIBC 2.36-9) stable release version 2.36.\n\x00"
OLD_BANNER = b"\x00GNU C Library (GNU libc) stable release version 2.17, by Roland McGrath\x00"


def test_the_shim_needs_a_glibc_version():
    needed = imagecheck.needed_glibc(LIB_PATH.read_bytes())
    assert needed is not None and needed >= (2, 2)
    assert imagecheck.needed_glibc(b"GLIBC_2.2.5\x00GLIBC_2.34\x00GLIBC_2.17\x00") == (2, 34)


def test_glibc_release():
    assert imagecheck.glibc_release(BANNER) == (2, 36)
    assert imagecheck.glibc_release(OLD_BANNER) == (2, 17)
    assert imagecheck.glibc_release(b"musl libc (x86_64)") is None


MUSL_LOADER = ("lib/ld-musl-x86_64.so.1",)


@pytest.mark.parametrize(
    "image, musl_built, libc, why",
    [
        (Image(), True, GLIBC, None),  # nothing to go by (libraries from mounts): no refusal
        (Image(glibc=(2, 36), glibc_path="/lib/libc.so.6"), True, GLIBC, None),
        (Image(glibc=(2, 34)), False, GLIBC, None),
        (Image(musl_loaders=MUSL_LOADER), True, MUSL, None),  # Alpine: the musl build
        (
            Image(musl_loaders=MUSL_LOADER),
            False,
            MUSL,
            "use musl (lib/ld-musl-x86_64.so.1), and the musl build of the shim (libgraft-musl.so) is not installed",
        ),
        (Image(musl_loaders=MUSL_LOADER, glibc=(2, 36)), True, GLIBC, None),  # both: glibc is the system's
        (
            Image(glibc=(2, 17), glibc_path="/lib64/libc.so.6"),
            True,  # the musl build cannot help: the image's programs load glibc
            GLIBC,
            "glibc is 2.17 (/lib64/libc.so.6), and libgraft.so needs 2.34",
        ),
    ],
)
def test_verdict(image, musl_built, libc, why):
    got = imagecheck.verdict(image, (2, 34), musl_built)
    assert got.libc == libc
    assert got.why is None if why is None else why in got.why and "seccomp mode" in got.why


def test_choose_mounts_the_build_that_matches(tmp_path):
    glibc_shim, musl_shim = tmp_path / "libgraft.so", tmp_path / "libgraft-musl.so"
    glibc_shim.write_bytes(b"GLIBC_2.2.5\x00GLIBC_2.34\x00")
    alpine = tmp_path / "alpine"
    (alpine / "lib").mkdir(parents=True)
    (alpine / "lib" / "ld-musl-x86_64.so.1").write_bytes(b"\x7fELF")
    assert imagecheck.choose(str(alpine), str(glibc_shim), str(musl_shim))[0] == str(musl_shim)
    assert "is not installed" in imagecheck.choose(str(alpine), str(glibc_shim), str(musl_shim))[1]
    musl_shim.write_bytes(b"\x7fELF")
    assert imagecheck.choose(str(alpine), str(glibc_shim), str(musl_shim)) == (str(musl_shim), None)
    assert imagecheck.choose(str(tmp_path / "empty"), str(glibc_shim), str(musl_shim)) == (str(glibc_shim), None)


def test_the_musl_build_needs_no_glibc():
    """What the musl build asks of the dynamic loader: no glibc version, no libc.so.6."""
    shim = MUSL_LIB_PATH.read_bytes()
    assert imagecheck.needed_glibc(shim) is None and b"libc.so.6" not in shim


def test_scan_finds_musl_and_the_newest_glibc(tmp_path):
    (tmp_path / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "lib" / "x86_64-linux-gnu" / "libc.so.6").write_bytes(OLD_BANNER)
    (tmp_path / "usr" / "lib64").mkdir(parents=True)
    (tmp_path / "usr" / "lib64" / "libc.so.6").write_bytes(BANNER)
    (tmp_path / "lib" / "ld-musl-x86_64.so.1").write_bytes(b"\x7fELF")
    image = imagecheck.scan(str(tmp_path))
    assert image == Image(("lib/ld-musl-x86_64.so.1",), (2, 36), "/usr/lib64/libc.so.6")


def test_scan_ignores_what_resolves_outside_the_image(tmp_path):
    """An image's absolute symlink names a path in the image, not on the host that scans it."""
    (tmp_path / "lib").mkdir()
    os.symlink("/lib/x86_64-linux-gnu/libc.so.6", tmp_path / "lib" / "libc.so.6")
    os.symlink("/usr/lib", tmp_path / "usr")
    assert imagecheck.scan(str(tmp_path)) == Image()


def test_scan_of_an_empty_or_missing_rootfs(tmp_path):
    assert imagecheck.scan(str(tmp_path)) == Image()
    assert imagecheck.scan(str(tmp_path / "missing")) == Image()
