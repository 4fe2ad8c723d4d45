"""The one-screen summary ``graft policy check`` prints for a valid policy.

It shows the policy as the broker will apply it, defaults filled in, one line per rule with
the same place names (``connect[0]``) the audit log's ``rule`` field and error messages use,
so an operator can read a log line against the summary.
"""

from __future__ import annotations

from .models import BindRule, ConnectRule, PolicyFile, Tenant, format_loc


def _join(items) -> str:
    return ",".join(str(i) for i in items)


def _rule_line(op: str, index: int, rule: ConnectRule | BindRule, width: int) -> str:
    nets = rule.to if isinstance(rule, ConnectRule) else rule.addr
    word = "to" if isinstance(rule, ConnectRule) else "addr"
    names = rule.names if isinstance(rule, ConnectRule) else None
    where = [] if nets is None and names is not None else [f"{word} {'any' if nets is None else _join(nets)}"]
    parts = [
        f"{op}[{index}]".ljust(width),
        rule.action.ljust(9),
        rule.proto.ljust(3),
        *where,
        *([f"names {_join(names)}"] if names is not None else []),
        f"ports {'any' if rule.ports is None else _join(rule.ports)}",
    ]
    host = getattr(rule, "host", None)
    if host is not None:
        parts.append(f"host {host}" if host.port is not None else f"host {host} (app's port)")
    return "    " + "  ".join(parts)


def _rate(rate: int | None) -> str:
    return "none" if rate is None else f"{rate}/s"


def _dns_line(tenant: Tenant) -> str:
    d = tenant.dns
    if d.resolver == "off":
        return "    dns off (names are the container's)"
    upstream = "host's resolv.conf" if d.upstream is None else _join(str(u) for u in d.upstream)
    names = "any" if d.names is None else _join(d.names)
    return (
        f"    dns resolver {d.resolver}:53  upstream {upstream}  names {names}  on_refused {d.on_refused}"
        f"  min_ttl {d.min_ttl}s"
    )


def _tenant_lines(name: str, tenant: Tenant, socket_dir: str) -> list[str]:
    lines = [
        f"  tenant {format_loc((name,))}  socket {socket_dir.rstrip('/')}/{name}.sock",
        f"    mode {tenant.mode}  netns {tenant.netns}  default {tenant.default}  socket_mode {tenant.socket_mode}"
        f"  max_sockets {tenant.max_sockets}  max_rate {_rate(tenant.max_rate)}"
        f"  uids {'any' if tenant.uids is None else _join(tenant.uids)}  socket_uid {tenant.socket_owner(name)}",
        _dns_line(tenant),
    ]
    rules = [("connect", i, r) for i, r in enumerate(tenant.connect)]
    rules += [("bind", i, r) for i, r in enumerate(tenant.bind)]
    width = max((len(f"{op}[{i}]") for op, i, _ in rules), default=0)
    for op, i, rule in rules:
        lines.append(_rule_line(op, i, rule, width))
    for op in ("connect", "bind"):
        if not getattr(tenant, op):
            lines.append(f"    {op}: no rules, every {op} -> {tenant.default}")
        else:
            lines.append(f"    {op}: anything else -> {tenant.default}")
    return lines


def summarize(policy: PolicyFile, source: str) -> str:
    """Text (no trailing newline) describing a validated policy read from ``source``."""
    n = len(policy.tenants)
    b = policy.broker
    lines = [
        f"{source}: OK (policy version {policy.version}, {n} tenant{'' if n == 1 else 's'})",
        f"  broker  socket_dir {b.socket_dir}  audit_log {b.audit_log}  confinement {b.confinement}",
        f"  audit  on_error {policy.audit.on_error}",
    ]
    for name, tenant in policy.tenants.items():
        lines += _tenant_lines(name, tenant, b.socket_dir)
    return "\n".join(lines)
