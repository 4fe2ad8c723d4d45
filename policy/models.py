"""The policy file, version 1, as pydantic models.

This is the schema of the TOML file an operator writes (docs/policy.md).
The models *parse* rather than merely validate: CIDRs become ``ipaddress`` networks, port
entries become inclusive ``PortRange`` intervals, a bind rule's ``host`` becomes a
``HostTarget``.  ``loader.py`` turns validation errors into operator-facing messages;
``matcher.py`` compiles the parsed rules for the broker's hot path.

Every model forbids unknown keys and runs in strict mode: in a security policy a typo such as
``too = [...]`` or ``max_sockets = "10"`` must be an error, never silently ignored or coerced.
Custom checks raise ``PydanticCustomError`` with finished text (see ``_fail``), so messages
reach the operator without pydantic's "Value error, " decoration.
"""

from __future__ import annotations

import ipaddress
import re
import zlib
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TENANT_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SOCKET_MODE_RE = r"^0?[0-7]{3}$"
_TENANT_NAME = re.compile(TENANT_NAME_RE)
_SOCKET_MODE = re.compile(SOCKET_MODE_RE)
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_PORT_RANGE = re.compile(r"^([0-9]{1,5})-([0-9]{1,5})$")
MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid" to the kernel; it is never a peer's uid
# <socket_dir>/seccomp.sock is the broker's seccomp agent (docs/containers.md), not a tenant's socket.
RESERVED_TENANT_NAMES = ("seccomp",)

EMPTY_LIST_MSG = "matches nothing; omit the key to match any"
# Seconds a lookup's answer lets name rules match at least (dns.min_ttl): programs connect again
# after a short TTL has run out (and many cache answers longer than it), and a floor of 0 would
# refuse them; an answer's own longer TTL is taken as it is.
MIN_TTL_DEFAULT = 30
EMPTY_UIDS_MSG = "allows no uid at all; omit the key to allow any uid"
PORT_MSG = "port must be an integer {lo}-65535 or a range 'a-b'"


def _fail(kind: str, msg: str) -> PydanticCustomError:
    # Without a context pydantic leaves the template as it is, so braces that come from the
    # user's input cannot be mistaken for placeholders.
    return PydanticCustomError(kind, msg)


def show(value: Any) -> str:
    """A value as it would be written in TOML, for messages: ``"sctp"``, ``70000``, ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (int, float)):
        return repr(value)
    return str(value)  # TOML dates and times


def format_loc(loc: tuple[str | int, ...]) -> str:
    """Render a place in the file as an operator reads it: ``tenants.web.connect[2].ports``.

    List indices are 0-based in file order: ``connect[0]`` is the first
    ``[[tenants.web.connect]]`` block of that tenant.  Keys that are not TOML bare keys (a
    tenant named ``a.b``) are quoted as TOML quotes them, so the path stays unambiguous.
    Shared by the loader (error places), the matcher (``Decision.rule``) and the summary.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if not _BARE_KEY.fullmatch(part):
            part = '"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out += "." + part if out else part
    return out


# --------------------------------------------------------------------------- value types


def _require_str(value: Any, what: str, example: str) -> str:
    if not isinstance(value, str):
        raise _fail("graft_type", f"{what} must be a string such as {example} (got {show(value)})")
    return value


def _parse_cidr(value: Any) -> IPNetwork:
    value = _require_str(value, "a network", '"10.0.0.0/8" or "::1/128"')
    if "%" in value:
        # ipaddress keeps "fe80::1%eth0" but the zone plays no part in matching; refuse it
        # rather than let the rule look narrower than it is.
        raise _fail("graft_cidr", f"{show(value)}: zone indexes (%name) are not supported")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise _fail("graft_cidr", f"{show(value)} is not an IPv4 or IPv6 address or network") from None
    # "10.0.0.1/8" may mean 10.0.0.0/8 or the single host 10.0.0.1: refuse rather than guess.
    raise _fail(
        "graft_cidr",
        f'{show(value)} has host bits set; write "{loose}" for the network, or the address alone for one host',
    )


CIDR = Annotated[
    IPNetwork,
    PlainValidator(_parse_cidr),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "description": "IPv4 or IPv6 network (CIDR) with zero host bits; an address alone means /32 or /128",
            "examples": ["127.0.0.1/32", "10.0.0.0/8", "::1/128"],
        }
    ),
]


class PortRange(NamedTuple):
    """An inclusive port interval; a single port is ``PortRange(p, p)``."""

    lo: int
    hi: int

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


def _port_parser(minimum: int):
    # One validator for the whole "integer or 'a-b'" entry instead of a pydantic union, so a
    # bad entry gets one message rather than one per union branch.
    msg = PORT_MSG.format(lo=minimum)

    def parse(value: Any) -> PortRange:
        if isinstance(value, int) and not isinstance(value, bool):
            if minimum <= value <= 65535:
                return PortRange(value, value)
            raise _fail("graft_port", f"{msg} (got {value})")
        if isinstance(value, str):
            m = _PORT_RANGE.match(value.strip())
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if not (minimum <= lo <= 65535 and minimum <= hi <= 65535):
                    raise _fail("graft_port", f"port range {show(value)} is outside {minimum}-65535")
                if lo > hi:
                    raise _fail("graft_port", f'port range {show(value)} is reversed; write "{hi}-{lo}"')
                return PortRange(lo, hi)
        raise _fail("graft_port", f"{msg} (got {show(value)})")

    return parse


def _port_json_schema(minimum: int) -> dict[str, Any]:
    return {
        "anyOf": [
            {"type": "integer", "minimum": minimum, "maximum": 65535},
            {
                "type": "string",
                "pattern": r"^[0-9]{1,5}-[0-9]{1,5}$",
                "description": "inclusive range 'a-b', a <= b",
            },
        ]
    }


def _port_out(p: PortRange) -> int | str:
    return p.lo if p.lo == p.hi else f"{p.lo}-{p.hi}"


ConnectPort = Annotated[
    PortRange, PlainValidator(_port_parser(1)), PlainSerializer(_port_out), WithJsonSchema(_port_json_schema(1))
]
# Port 0 is allowed in bind rules only.  Binding port 0 asks the kernel for an ephemeral port,
# so `ports = [0]` is how a bind rule says "ephemeral binds"; a rule with ports absent matches
# them too.  Nobody connects to port 0, so a connect rule naming it is a mistake.
BindPort = Annotated[
    PortRange, PlainValidator(_port_parser(0)), PlainSerializer(_port_out), WithJsonSchema(_port_json_schema(0))
]


class HostTarget(NamedTuple):
    """What the broker binds on the host instead of the app's address (port publishing).

    ``port`` None means "the port the app asked for" (written ``host = "127.0.0.1"``).
    """

    addr: IPAddress
    port: int | None

    def __str__(self) -> str:
        if self.port is None:
            return str(self.addr)
        return f"[{self.addr}]:{self.port}" if self.addr.version == 6 else f"{self.addr}:{self.port}"


def _parse_host(value: Any) -> HostTarget:
    value = _require_str(value, "host", '"127.0.0.1:8080", "[::1]:8080" or "127.0.0.1"')
    bad = _fail(
        "graft_host",
        f"host {show(value)} must be 'ADDR:PORT' ('[ADDR]:PORT' for IPv6), or an address alone to keep the app's port",
    )
    text, port_text = value.strip(), None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise bad
        text, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise bad
            port_text = rest[1:]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has two colons or more
        text, port_text = text.split(":")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise bad from None
    if "%" in text:
        raise _fail("graft_host", f"host {show(value)}: zone indexes (%name) are not supported")
    if port_text is None:
        return HostTarget(addr, None)
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise _fail("graft_host", f"host port in {show(value)} must be 1-65535; omit it to keep the app's port")
    return HostTarget(addr, int(port_text))


Host = Annotated[
    HostTarget,
    PlainValidator(_parse_host),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "description": "address the broker binds on the host instead: 'ADDR:PORT', '[V6ADDR]:PORT', "
            "or an address alone to keep the app's port",
            "examples": ["127.0.0.1:8080", "[::1]:8080", "127.0.0.1"],
        }
    ),
]


def _non_empty(value: list | None) -> list | None:
    # An empty list would match nothing, which is never what the operator meant; absent = any.
    if value is not None and not value:
        raise _fail("graft_empty", EMPTY_LIST_MSG)
    return value


def _some_uid(value: list | None) -> list | None:
    if value is not None and not value:
        raise _fail("graft_empty", EMPTY_UIDS_MSG)
    return value


def _tenant_name(value: str) -> str:
    if not _TENANT_NAME.fullmatch(value):
        raise _fail(
            "graft_tenant_name",
            f"invalid tenant name {show(value)}: it becomes the socket file <name>.sock, so it must be 1-64 "
            "letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    if value in RESERVED_TENANT_NAMES:
        raise _fail(
            "graft_tenant_name",
            f"tenant name {show(value)} is reserved: {value}.sock in the socket directory is the broker's "
            "seccomp agent socket",
        )
    return value


TenantName = Annotated[str, AfterValidator(_tenant_name), WithJsonSchema({"type": "string", "pattern": TENANT_NAME_RE})]
Proto = Literal["tcp", "udp", "any"]
Action = Literal["graft", "deny", "container"]
Uid = Annotated[int, Field(ge=0, le=MAX_UID)]
# Derived socket owners (Tenant.socket_owner) lie in [SOCKET_UID_BASE, SOCKET_UID_BASE + 2^24): far
# above the uids distributions hand out to users (1000..) and to containers' subordinate ranges
# (100000.., 65,536 at a time), and below 2^31, which some tools mistake for negative.
SOCKET_UID_BASE = 0x7E000000


def _list_field(description: str) -> Any:
    return Field(None, description=description, json_schema_extra={"minItems": 1})


# --------------------------------------------------------------------------- models


class _Strict(BaseModel):
    # frozen: the broker shares one policy object between tasks and swaps it whole on SIGHUP.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


_DNS_NAME = re.compile(
    r"^(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$"
)


def _name_pattern(value: Any) -> str:
    value = _require_str(value, "a name", '"api.example.com" or "*.svc.example"')
    if value != "*" and (len(value) > 253 or not _DNS_NAME.fullmatch(value)):
        raise _fail(
            "graft_dns_name",
            f"name {show(value)} must be a DNS name ('api.example.com'), '*.' and a suffix ('*.svc.example'), or '*'",
        )
    return value.rstrip(".").lower()


NamePattern = Annotated[
    str,
    PlainValidator(_name_pattern),
    WithJsonSchema({"type": "string", "examples": ["api.example.com", "*.svc.example"]}),
]


class ConnectRule(_Strict):
    """One ``[[tenants.<name>.connect]]`` block: which connects it matches, and what happens."""

    to: Annotated[list[CIDR] | None, AfterValidator(_non_empty)] = _list_field(
        "destination networks; absent = any destination"
    )
    ports: Annotated[list[ConnectPort] | None, AfterValidator(_non_empty)] = _list_field(
        "destination ports or 'a-b' ranges; absent = any port"
    )
    # A destination by name (docs/dns.md): an address one of the tenant's own lookups of a matching
    # name returned, while its TTL (at least dns.min_ttl) lasts. With `to` too: either matches.
    names: Annotated[list[NamePattern] | None, AfterValidator(_non_empty)] = _list_field(
        "destinations by name: exact, or '*.suffix'; an address this tenant's lookups of such a name "
        "returned, while the answer's TTL lasts; absent = by address only"
    )
    proto: Proto = Field("any", description="'tcp', 'udp' or 'any'")
    action: Action = Field("graft", description="'graft' (host socket), 'deny' (EPERM), 'container' (container stack)")


class BindRule(_Strict):
    """One ``[[tenants.<name>.bind]]`` block: which binds it matches, and what happens."""

    addr: Annotated[list[CIDR] | None, AfterValidator(_non_empty)] = _list_field(
        "bind addresses; the wildcard is written 0.0.0.0/32 or ::/128; absent = any address"
    )
    ports: Annotated[list[BindPort] | None, AfterValidator(_non_empty)] = _list_field(
        "bind ports or 'a-b' ranges; 0 is an ephemeral-port bind; absent = any port"
    )
    proto: Proto = Field("any", description="'tcp', 'udp' or 'any'")
    action: Action = Field("graft", description="'graft' (host socket), 'deny' (EACCES), 'container' (container stack)")
    # Declared after `action` so that its validator sees the validated action.
    host: Host | None = Field(None, description="publish: the broker binds this host address instead (graft only)")

    @field_validator("host")
    @classmethod
    def _host_needs_graft(cls, value: HostTarget | None, info: ValidationInfo) -> HostTarget | None:
        action = info.data.get("action")  # absent when the action itself was invalid
        if value is not None and action is not None and action != "graft":
            raise _fail(
                "graft_host_action",
                f"host is only allowed with action 'graft' (this rule's action is {show(action)})",
            )
        return value


def _upstream(value: Any) -> HostTarget:
    target = _parse_host(value)
    if target.addr.is_unspecified or target.addr.is_multicast:
        raise _fail("graft_dns_upstream", f"upstream {show(value)} must be a server's address, not {target.addr}")
    return target if target.port is not None else HostTarget(target.addr, 53)


def _resolver(value: Any) -> str:
    value = _require_str(value, "resolver", '"127.0.0.11:53" or "off"')
    if value == "off":
        return value
    text, port = value.split(":") if value.count(":") == 1 else (value, "53")  # IPv4[:PORT]; IPv6 is refused below
    if port != "53":
        raise _fail(
            "graft_dns_resolver",
            f"resolver {show(value)} must be on port 53: resolv.conf names a server's address, never its port",
        )
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise _fail(
            "graft_dns_resolver", f"resolver {show(value)} must be an address ('127.0.0.11:53') or 'off'"
        ) from None
    if addr.version != 4 or not addr.is_loopback:
        raise _fail(
            "graft_dns_resolver",
            f"resolver {show(value)} must be an IPv4 loopback address (127.0.0.0/8): it is served inside the "
            "container's own network",
        )
    return str(addr)


Upstream = Annotated[
    HostTarget,
    PlainValidator(_upstream),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["10.0.0.2", "127.0.0.53:53", "[fd00::53]:53"]}),
]


class DnsSettings(_Strict):
    """[tenants.<name>.dns]: the broker's resolver for this tenant's programs (docs/dns.md)."""

    resolver: Annotated[str, PlainValidator(_resolver), WithJsonSchema({"type": "string"})] = Field(
        "127.0.0.11",
        description="the loopback address the resolver answers on, 'ADDR' or 'ADDR:53', inside the programs' "
        "network; 'off' "
        "to leave names to the container",
    )
    upstream: list[Upstream] | None = Field(
        None,
        description="the servers queries go to, from the tenant's netns; absent = the host's /etc/resolv.conf",
        json_schema_extra={"minItems": 1},
    )
    names: list[NamePattern] | None = Field(
        None,
        description="names the tenant may resolve: exact, or '*.suffix'; absent = any",
        json_schema_extra={"minItems": 1},
    )
    on_refused: Literal["refused", "nxdomain"] = Field(
        "refused", description="the answer to a name outside `names`: REFUSED or NXDOMAIN"
    )
    min_ttl: int = Field(
        MIN_TTL_DEFAULT,
        ge=0,
        le=86400,
        description="seconds a lookup's answer lets name rules match at least, whatever its TTL says",
    )

    @field_validator("upstream", "names")
    @classmethod
    def _not_empty(cls, value: list | None) -> list | None:
        return _non_empty(value)


class Tenant(_Strict):
    """``[tenants.<name>]``: one container, or a group of them, behind one broker socket."""

    netns: str = Field(
        "host", description="where grafted sockets live: 'host', a name in /run/netns, or an absolute path"
    )
    default: Literal["container", "deny"] = Field("container", description="what happens when no rule matches")
    mode: Literal["preload", "seccomp"] = Field(
        "preload",
        description="how the tenant's programs reach the broker: 'preload' (libgraft.so in LD_PRELOAD) or "
        "'seccomp' (the broker's seccomp agent answers their socket calls; static binaries too)",
    )
    socket_mode: str = Field(
        "0666", description="mode of <socket_dir>/<tenant>.sock, an octal string", pattern=SOCKET_MODE_RE
    )
    max_sockets: int = Field(1024, ge=1, description="grafted sockets open at once")
    # Our addition to the v1 keys: requests per second the broker answers for this tenant
    # (a token bucket with a burst of one second's worth), so a flooding tenant cannot take
    # the broker from the others.  Absent = no limit.
    max_rate: int | None = Field(None, ge=1, description="requests per second; absent = no limit")
    # Our addition to the v1 keys: an optional allowlist of the peer uids the broker reads with
    # SO_PEERCRED, i.e. uids as the host sees them (a container's root under user namespaces is
    # its mapped host uid).  Absent = any uid that can reach the socket.
    uids: Annotated[list[Uid] | None, AfterValidator(_some_uid)] = _list_field(
        "peer uids (SO_PEERCRED, host view) allowed to use the tenant socket; absent = any uid"
    )
    # Our addition to the v1 keys: the uid that owns the tenant's host sockets (setfsuid around
    # socket()). The kernel keeps SO_REUSEPORT groups per owner, so tenants never join each other's
    # groups or a host service's; netfilter's owner match sees it too. Absent = one derived from
    # the tenant's name (socket_owner); 0 = root-owned, as host services' sockets are.
    socket_uid: Uid | None = Field(
        None,
        description="owner uid of the tenant's host sockets (SO_REUSEPORT groups, netfilter owner match); "
        f"absent = {SOCKET_UID_BASE:#x} + crc32(tenant name) mod 2^24",
    )
    dns: DnsSettings = Field(default_factory=DnsSettings, description="the broker's resolver for this tenant")
    connect: list[ConnectRule] = Field(default_factory=list, description="connect rules; the first match decides")
    bind: list[BindRule] = Field(default_factory=list, description="bind rules; the first match decides")

    def socket_owner(self, name: str) -> int:
        """The uid owning this tenant's host sockets: socket_uid, or one derived from its name."""
        if self.socket_uid is not None:
            return self.socket_uid
        return SOCKET_UID_BASE + zlib.crc32(name.encode()) % (1 << 24)

    @field_validator("netns", mode="before")
    @classmethod
    def _check_netns(cls, value: Any) -> str:
        value = _require_str(value, "netns", '"host", "blue" or "/proc/1234/ns/net"')
        if "/" in value and not value.startswith("/"):
            raise _fail("graft_netns", f"netns {show(value)}: a path must be absolute")
        if value in ("", ".", ".."):
            raise _fail(
                "graft_netns",
                f"netns must be 'host', a name in /run/netns, or an absolute path (got {show(value)})",
            )
        return value

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _check_mode(cls, value: Any) -> str:
        if not isinstance(value, str):
            # TOML has no leading-zero integers (0666 is a syntax error and 666 is decimal), so
            # an integer here is a misread mode: make the operator quote it.
            raise _fail(
                "graft_socket_mode",
                f'socket_mode must be an octal string in quotes, such as "0660" (got {show(value)})',
            )
        if not _SOCKET_MODE.match(value):
            raise _fail("graft_socket_mode", f'socket_mode {show(value)} is not an octal mode such as "0660"')
        return value

    @property
    def socket_mode_int(self) -> int:
        """The socket file's permission bits, e.g. ``0o666``."""
        return int(self.socket_mode, 8)

    def netns_path(self, netns_dir: str = "/run/netns") -> str | None:
        """The namespace file to enter, or None for the broker's own (host) namespace.

        "host" always means the broker's namespace; a namespace file that happens to be named
        /run/netns/host is reached by its path.
        """
        if self.netns == "host":
            return None
        return self.netns if self.netns.startswith("/") else f"{netns_dir}/{self.netns}"


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise _fail("graft_path", f"must be an absolute path (got {show(value)})")
    return value


def _audit_log(value: str) -> str:
    if value in ("stderr", "off") or value.startswith("/"):
        return value
    raise _fail("graft_audit_log", f"audit_log must be 'stderr', 'off' or an absolute file path (got {show(value)})")


class BrokerSettings(_Strict):
    """``[broker]``: settings of the daemon itself; its command-line flags override them."""

    socket_dir: Annotated[str, AfterValidator(_absolute_path)] = Field(
        "/run/graft", description="directory of the tenant sockets <tenant>.sock (mode 0700)"
    )
    audit_log: Annotated[str, AfterValidator(_audit_log)] = Field(
        "stderr", description="'stderr', 'off', or an absolute file path (JSON lines)"
    )
    confinement: Literal["auto", "required", "off"] = Field(
        "auto", description="cgroup-BPF lock on grafted sockets: 'auto' (when available), 'required', 'off'"
    )


class AuditSettings(_Strict):
    """``[audit]``: what a decision that cannot be recorded costs."""

    on_error: Literal["drop", "deny"] = Field(
        "drop",
        description="a decision the audit log cannot record: 'drop' the record (networking goes on) or 'deny' "
        "the request (EPERM, EACCES for bind); 'deny' also turns the connect fast path off",
    )


def _version_not_bool(value: Any) -> Any:
    # Literal[1] alone accepts `true` (True == 1 in Python); the version is the integer 1.
    if isinstance(value, bool):
        raise _fail("graft_version", f"version must be the integer 1 (got {str(value).lower()})")
    return value


def _some_tenant(value: dict) -> dict:
    if not value:
        raise _fail("graft_no_tenants", "at least one tenant is required: add a [tenants.<name>] table")
    return value


class PolicyFile(_Strict):
    """The whole policy file, version 1."""

    version: Annotated[Literal[1], BeforeValidator(_version_not_bool)] = Field(description="policy format version: 1")
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    tenants: Annotated[dict[TenantName, Tenant], AfterValidator(_some_tenant)] = Field(
        description="tenants by name; each gets the socket <socket_dir>/<name>.sock",
        json_schema_extra={"minProperties": 1, "additionalProperties": False},
    )
