"""Read a policy file and report what is wrong with it, all at once, by place.

This is what ``graft policy check`` and the broker (at start and on SIGHUP) call.  A file
either becomes a ``PolicyFile`` or raises ``PolicyError`` listing *every* problem, each at its
place in the file (``tenants.web.connect[2].ports``), so an operator fixes a file in one pass
and the broker can fail closed with a useful log.  ``check_environment`` adds the checks that
depend on the machine rather than the file (does the netns exist?).
"""

from __future__ import annotations

import difflib
import errno
import fcntl
import os
import tomllib
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .models import BindRule, BrokerSettings, ConnectRule, PolicyFile, Tenant, format_loc, show

NETNS_DIR = "/run/netns"
_NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file: returns its CLONE_NEW* type (Linux 4.11+)
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem: where (``tenants.web.connect[2].ports``, or ``<toml>``/``<file>``) and what."""

    loc: str
    msg: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.msg}"


class PolicyError(Exception):
    """A policy that must not be used; ``errors`` holds every issue found."""

    def __init__(self, source: str, errors: list[PolicyIssue]):
        self.source = str(source)
        self.errors = list(errors)
        super().__init__(self.source, self.errors)

    def __str__(self) -> str:
        n = len(self.errors)
        lines = [f"{self.source}: {n} error{'' if n == 1 else 's'}"]
        lines += [f"  {issue}" for issue in self.errors]
        return "\n".join(lines)


def parse_policy(text: str, source: str = "<string>") -> PolicyFile:
    """Parse and validate policy TOML text; ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib stops at the first syntax error; its message carries line and column.
        raise PolicyError(source, [PolicyIssue("<toml>", str(exc))]) from None
    try:
        policy = PolicyFile.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(source, issues_from_validation(exc)) from None
    issues = cross_tenant_issues(policy) + name_rule_issues(policy)
    if issues:
        raise PolicyError(source, issues)
    return policy


def name_rule_issues(policy: PolicyFile) -> list[PolicyIssue]:
    """Connect rules with ``names`` in a tenant whose resolver is off: they could never match."""
    return [
        PolicyIssue(
            format_loc(("tenants", name, "connect", i, "names")),
            "names match what the tenant's resolver answered, and its dns.resolver is 'off': this rule would "
            "never match by name",
        )
        for name, tenant in policy.tenants.items()
        if tenant.dns.resolver == "off"
        for i, rule in enumerate(tenant.connect)
        if rule.names is not None
    ]


def cross_tenant_issues(policy: PolicyFile) -> list[PolicyIssue]:
    """What no single tenant's table shows: two tenants whose host sockets would have one owner.

    The kernel keeps SO_REUSEPORT groups per owner uid; tenants sharing one
    could join each other's groups and take each other's connections.
    """
    issues, owners = [], {}
    for name, tenant in policy.tenants.items():
        uid = tenant.socket_owner(name)
        if uid in owners:
            other = owners[uid]
            issues.append(
                PolicyIssue(
                    format_loc(("tenants", name, "socket_uid")),
                    f"tenant {other!r} already owns its host sockets as uid {uid}; tenants with one owner share "
                    f"SO_REUSEPORT groups: give one of them a socket_uid of its own",
                )
            )
        else:
            owners[uid] = name
    return issues


def load_policy(path: str | os.PathLike[str], *, check_env: bool = False) -> PolicyFile:
    """Read, parse and validate a policy file.

    With ``check_env=True`` the machine-dependent checks of ``check_environment`` run too, and
    their issues are reported in the same ``PolicyError``.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise PolicyError(source, [PolicyIssue("<file>", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # TOML is UTF-8 by definition.
        raise PolicyError(source, [PolicyIssue("<file>", f"not UTF-8 text (byte offset {exc.start})")]) from None
    policy = parse_policy(text, source)
    if check_env:
        issues = check_environment(policy)
        if issues:
            raise PolicyError(source, issues)
    return policy


def check_environment(policy: PolicyFile, *, netns_dir: str = NETNS_DIR) -> list[PolicyIssue]:
    """Check what the file refers to on this machine: each tenant's network namespace.

    A named netns must be ``<netns_dir>/<name>`` (as ``ip netns add`` makes it); a path must be
    a network namespace file (``/proc/<pid>/ns/net``, a bind mount of one).  ``netns_dir`` is a
    parameter only so tests need not touch /run/netns.
    """
    issues = []
    for name, tenant in policy.tenants.items():
        path = tenant.netns_path(netns_dir)
        if path is None:
            continue
        problem = _netns_problem(path)
        if problem:
            issues.append(PolicyIssue(format_loc(("tenants", name, "netns")), problem))
    return issues


def _netns_problem(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return f"network namespace {path} does not exist"
        return f"cannot open network namespace {path}: {exc.strerror}"
    try:
        kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        return f"{path} is not a namespace file"
    finally:
        os.close(fd)
    if kind != _CLONE_NEWNET:
        return f"{path} is a namespace file, but not a network namespace"
    return None


# --------------------------------------------------------------------------- error messages

# Keys allowed at each kind of place, for "did you mean" on unknown keys.
_KEYS_AT = {
    "file": list(PolicyFile.model_fields),
    "broker": list(BrokerSettings.model_fields),
    "tenant": list(Tenant.model_fields),
    "connect": list(ConnectRule.model_fields),
    "bind": list(BindRule.model_fields),
}


def _table_kind(loc: tuple[Any, ...]) -> str | None:
    """Which table a loc (ending in a key of that table) points into."""
    parent = loc[:-1]
    if not parent:
        return "file"
    if parent == ("broker",):
        return "broker"
    if len(parent) == 2 and parent[0] == "tenants":
        return "tenant"
    if len(parent) == 4 and parent[0] == "tenants" and parent[2] in ("connect", "bind"):
        return parent[2]  # parent[3] is the rule's index
    return None


# pydantic's type errors in TOML's words ("a valid dictionary or instance of Tenant" is a table).
_TYPE_WORDS = {
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dict_type": "a table",
    "list_type": "an array",
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
}


def _message(err: dict[str, Any], loc: tuple[Any, ...]) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        allowed = _KEYS_AT.get(_table_kind(loc) or "", [])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        if close:
            return f"unknown key (did you mean '{close[0]}'?)"
        return "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if kind.startswith("graft_"):
        return msg  # our own validators: already final text
    if kind == "list_type" and loc and loc[-1] in ("connect", "bind") and isinstance(value, dict):
        # [tenants.web.connect] (one bracket) makes a table; rules are an array of tables.
        return f"must be an array of tables: write [[{format_loc(loc)}]] with double brackets"
    if kind in _TYPE_WORDS:
        msg = "must be " + _TYPE_WORDS[kind]
    for noise in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(noise)
    if msg.startswith("Input should be "):
        msg = "must be " + msg.removeprefix("Input should be ")
    return f"{msg} (got {show(value)})" if "input" in err else msg


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic marks an error in a dict key (a bad tenant name) with a trailing '[key]'; the
    # place in the file is the key itself.  (The models avoid unions, whose branch names would
    # otherwise appear in locs too.)
    return loc[:-1] if loc and loc[-1] == "[key]" else loc


def issues_from_validation(exc: ValidationError) -> list[PolicyIssue]:
    """Every pydantic error as a ``PolicyIssue``, in pydantic's (file structure) order."""
    issues: list[PolicyIssue] = []
    for err in exc.errors(include_url=False):
        loc = _clean_loc(tuple(err["loc"]))
        issue = PolicyIssue(format_loc(loc) or "<file>", _message(err, loc))
        if issue not in issues:
            issues.append(issue)
    return issues
