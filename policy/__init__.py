"""graft's access policy: the TOML policy file (version 1), its loader, and the matcher.

``load_policy`` / ``parse_policy`` give a validated ``PolicyFile`` or a ``PolicyError`` naming
every problem by its place in the file; ``compile_policy`` turns a policy into per-tenant
``TenantMatcher`` objects whose ``decide`` the broker calls for each bind and connect;
``summarize`` and ``json_schema`` serve ``graft policy check`` and ``graft policy schema``.
Example policies live in ``examples/``.
"""

from .loader import PolicyError, PolicyIssue, check_environment, load_policy, parse_policy
from .matcher import Decision, TenantMatcher, compile_policy
from .models import BindRule, BrokerSettings, ConnectRule, HostTarget, PolicyFile, PortRange, Tenant
from .schema import json_schema
from .summary import summarize

__all__ = [
    "BindRule",
    "BrokerSettings",
    "ConnectRule",
    "Decision",
    "HostTarget",
    "PolicyError",
    "PolicyFile",
    "PolicyIssue",
    "PortRange",
    "Tenant",
    "TenantMatcher",
    "check_environment",
    "compile_policy",
    "json_schema",
    "load_policy",
    "parse_policy",
    "summarize",
]
