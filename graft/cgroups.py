"""Will crun run a container on this host? It refuses every one on a hybrid cgroup layout.

crun (1.x, 1.8.1 in Debian 12 included) decides the layout as
libcrun/cgroup.c's detect_cgroup_mode does: statfs(2) of the fixed path
/sys/fs/cgroup (cgroup2: unified; tmpfs: v1 or hybrid), then of
/sys/fs/cgroup/unified (cgroup2 there: hybrid). In hybrid mode,
libcrun_cgroup_enter fails every create, whatever the cgroup manager
(even ``disabled``), when /sys/fs/cgroup/unified/cgroup.controllers is not
empty: "cgroups in hybrid mode not supported, drop all controllers from
cgroupv2". runc has no such check.

The paths are crun's own, hard-coded in crun, so they are hard-coded here
too: where the host happens to mount its cgroup2 (graft's confinement finds
it from the mount table) does not matter to crun. ``crun_refuses`` is the
decision, pure, over /proc/self/mountinfo's text and the controllers file's;
``crun_refuses_host`` reads them. graft-runtime uses it to pass crun over
(graft/runtime.py), and the tests to wrap crun (tests/support/rootfs.py).
"""

from __future__ import annotations

CGROUP_ROOT = "/sys/fs/cgroup"
CRUN_UNIFIED = "/sys/fs/cgroup/unified"  # where crun looks for a hybrid layout's cgroup2
MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    r"""A mountinfo path: the kernel writes space, tab, newline and backslash as \040, \011, \012, \134."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, file system type) of each line of a mountinfo text, in its order."""
    out = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue  # not a mountinfo line
        sep = fields.index("-", 6)  # optional fields (shared:N ...) come before the separator
        if len(fields) > sep + 1:
            out.append((_unescape(fields[4]), fields[sep + 1]))
    return out


def fstype_at(mountinfo: str, path: str) -> str | None:
    """The type of the file system statfs(path) reports: of the deepest mount point above path, the last one mounted."""
    found: tuple[int, str] | None = None
    for point, fstype in mounts(mountinfo):
        above = path == point or path.startswith(point.rstrip("/") + "/")
        if above and (found is None or len(point) >= found[0]):  # >=: one mounted later over the same point shows
            found = (len(point), fstype)
    return found[1] if found else None


def crun_hybrid(mountinfo: str) -> bool:
    """crun's CGROUP_MODE_HYBRID: a tmpfs at /sys/fs/cgroup, and a cgroup2 at /sys/fs/cgroup/unified."""
    return fstype_at(mountinfo, CGROUP_ROOT) == "tmpfs" and fstype_at(mountinfo, CRUN_UNIFIED) == "cgroup2"


def crun_refuses(mountinfo: str, unified_controllers: str | None) -> bool:
    """Whether crun refuses to create any container, given the mount table and the unified hierarchy's controllers.

    unified_controllers: the text of /sys/fs/cgroup/unified/cgroup.controllers,
    None if it cannot be read (crun fails on that too).
    """
    if not crun_hybrid(mountinfo):
        return False
    return unified_controllers is None or len(unified_controllers) > 0


def crun_refuses_host() -> bool:
    """crun_refuses for the mount namespace this process is in (the engine's, where crun would run)."""
    try:
        with open(MOUNTINFO) as f:
            mountinfo = f.read()
    except OSError:
        return False  # no /proc: nothing to go by, and crun reports its own errors
    controllers = None
    if crun_hybrid(mountinfo):  # the controllers file matters only then
        try:
            with open(f"{CRUN_UNIFIED}/cgroup.controllers") as f:
                controllers = f.read()
        except OSError:
            pass
    return crun_refuses(mountinfo, controllers)
