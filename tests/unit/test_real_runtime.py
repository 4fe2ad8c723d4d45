"""Which real runtime graft-runtime execs: crun's hybrid-cgroup refusal (graft/cgroups.py), and the defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from graft import cgroups, runtime

# Mount tables as /proc/self/mountinfo writes them (the fields crun's statfs calls depend on).
ROOT = "22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw,lowerdir=/l\n"
SYS = "23 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw\n"
V1_TMPFS = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
V1_CPU = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
UNIFIED = "44 31 0:40 / /sys/fs/cgroup/unified rw,nosuid master:7 - cgroup2 cgroup2 rw,nsdelegate\n"
UNIFIED_ONLY = "31 23 0:28 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
HYBRID = ROOT + SYS + V1_TMPFS + V1_CPU + UNIFIED
LEGACY = ROOT + SYS + V1_TMPFS + V1_CPU
CGROUP2_ELSEWHERE = LEGACY + "45 22 0:41 / /mnt/cg2 rw - cgroup2 cgroup2 rw\n"  # not where crun looks


@pytest.mark.parametrize(
    "mountinfo, controllers, refuses",
    [
        (HYBRID, "hugetlb\n", True),  # this machine kind
        (HYBRID, "cpu memory pids\n", True),
        (HYBRID, "", False),  # hybrid with no controllers in cgroup2 (systemd's default): crun runs
        (HYBRID, None, True),  # the controllers file unreadable: crun fails on that as well
        (LEGACY, None, False),
        (ROOT + SYS + UNIFIED_ONLY, "cpu memory\n", False),  # cgroup2 only
        (CGROUP2_ELSEWHERE, "cpu\n", False),  # crun's paths are fixed: a cgroup2 elsewhere is no hybrid to it
        # a tmpfs mounted later over the unified hierarchy is what statfs sees there
        (HYBRID + UNIFIED.replace("44 31", "50 44").replace("cgroup2 cgroup2", "tmpfs tmpfs"), "cpu\n", False),
        (ROOT + SYS, None, False),  # /sys/fs/cgroup not mounted: crun's own error, not this one
    ],
)
def test_crun_refuses(mountinfo, controllers, refuses):
    assert cgroups.crun_refuses(mountinfo, controllers) is refuses


def test_mountinfo_paths_are_unescaped_and_odd_lines_skipped():
    text = "garbage\n" + r"40 22 0:50 / /mnt/with\040space rw - tmpfs tmpfs rw" + "\n"
    assert cgroups.mounts(text) == [("/mnt/with space", "tmpfs")]
    assert cgroups.fstype_at(text, "/mnt/with space/sub") == "tmpfs"
    assert cgroups.fstype_at(text, "/mnt/with") is None  # a prefix of the name is no parent


def test_the_host_as_crun_sees_it():
    """The reader agrees with the pure decision over this host's own files."""
    with open(cgroups.MOUNTINFO) as f:
        mountinfo = f.read()
    controllers = None
    if os.path.exists(f"{cgroups.CRUN_UNIFIED}/cgroup.controllers"):
        with open(f"{cgroups.CRUN_UNIFIED}/cgroup.controllers") as f:
            controllers = f.read()
    assert cgroups.crun_refuses_host() is cgroups.crun_refuses(mountinfo, controllers)


@pytest.mark.parametrize(
    "parent, shim",
    [
        ("containerd-shim-runc-v2", True),
        ("containerd-shim-runc-v2 (deleted)", True),  # upgraded under a running shim
        ("containerd-shim", True),  # containerd's v1 shim, or a v2 shim's comm (cut to 15 bytes)
        ("containerd", False),
        ("podman", False),
        ("conmon", False),
        ("sh", False),
    ],
)
def test_called_by_containerd_shim(parent, shim):
    assert runtime.called_by_containerd_shim(parent) is shim
    assert runtime.default_runtimes(shim) == (("runc",) if shim else ("crun", "runc"))


@pytest.fixture
def path_with(tmp_path, monkeypatch):
    """PATH = a directory holding fake executables of the names given; no $GRAFT_RUNTIME."""
    monkeypatch.delenv(runtime.ENV_RUNTIME, raising=False)

    def make(*names: str) -> str:
        for name in names:
            (tmp_path / name).write_text("#!/bin/sh\n")
            (tmp_path / name).chmod(0o755)
        monkeypatch.setenv("PATH", str(tmp_path))
        return str(tmp_path)

    return make


@pytest.mark.parametrize(
    "on_path, refuses, shim, chosen",
    [
        (("crun", "runc"), False, False, "crun"),
        (("crun", "runc"), True, False, "runc"),  # crun passed over on a hybrid host
        (("crun", "runc"), False, True, "runc"),  # containerd's runc shim: runc
        (("crun",), False, False, "crun"),
        (("runc",), True, False, "runc"),
    ],
)
def test_the_default_real_runtime(path_with, monkeypatch, on_path, refuses, shim, chosen):
    directory = path_with(*on_path)
    monkeypatch.setattr(cgroups, "crun_refuses_host", lambda: refuses)
    monkeypatch.setattr(runtime, "parent_program", lambda: "containerd-shim-runc-v2" if shim else "podman")
    assert runtime.real_runtime(None) == os.path.join(directory, chosen)


@pytest.mark.parametrize(
    "on_path, refuses, shim, message",
    [
        (("crun",), True, False, "no real runtime: crun refuses every container on this host's hybrid cgroup"),
        (("crun",), True, False, "(a cgroup2 with controllers at /sys/fs/cgroup/unified), and runc is not on PATH"),
        ((), False, False, "no real runtime: none of crun, runc is on PATH; name one with --graft-runtime PATH"),
        (("crun",), False, True, "called by containerd-shim-runc-v2 as its runc binary, and runc is not on PATH"),
    ],
)
def test_no_default_real_runtime_is_one_line_naming_the_flag(path_with, monkeypatch, on_path, refuses, shim, message):
    path_with(*on_path)
    monkeypatch.setattr(cgroups, "crun_refuses_host", lambda: refuses)
    monkeypatch.setattr(runtime, "parent_program", lambda: "containerd-shim-runc-v2" if shim else "podman")
    with pytest.raises(runtime.UsageError) as e:
        runtime.real_runtime(None)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).endswith("; name one with --graft-runtime PATH or $GRAFT_RUNTIME")


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_a_named_crun_is_kept_on_a_hybrid_host(path_with, monkeypatch, how):
    """The operator's choice stands: their crun may be a wrapper that copes (as the tests' is)."""
    directory = path_with("crun", "runc")
    monkeypatch.setattr(cgroups, "crun_refuses_host", lambda: True)
    monkeypatch.setattr(runtime, "parent_program", lambda: "containerd-shim-runc-v2")
    if how == "environment":
        monkeypatch.setenv(runtime.ENV_RUNTIME, "crun")
    assert runtime.real_runtime("crun" if how == "flag" else None) == os.path.join(directory, "crun")


def test_the_parent_program_is_the_parents_executable():
    child = subprocess.run(
        [sys.executable, "-c", "from graft import runtime; print(runtime.parent_program())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == os.path.basename(os.readlink("/proc/self/exe"))  # this process's, symlinks resolved
