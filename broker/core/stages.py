"""The stages a front-end carries a request through, and the one order they run in.

    front-end (shim | seccomp) → Stages.carry_out: Decisions.judge → HostSockets.make → Decisions.record
                               → Outcome, delivered the front-end's way, and Stages.grant

``Stages`` is what a front-end gets of the broker (server.py makes one):
the decision, the host-socket factory and the grants, nothing else.
``carry_out`` is the one place a bind/connect verdict is carried out, for
either front-end: judged, the host socket made for a graft, and the
decision recorded before it takes effect (on_error = "deny": refused when
the log cannot take it, and the socket closed). The front-end then only
delivers the ``Outcome`` (a shim reply with the socket attached, or the
socket installed on a stopped program's fd) and has the destination
granted in the kernel with ``grant``: the shim before its reply, so that
the app's next connect finds the grant; the seccomp agent once the socket
is installed, so that a failed install grants nothing. GRANT and PREISSUE
have their own steps in grants.py, shared the same way.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from . import request
from .decisions import Decisions
from .grants import Grants
from .hostsock import HostSockets
from .tenant import Peer, TenantState
from .verdict import Verdict


@dataclass(slots=True)
class Outcome:
    """A carried-out verdict: as recorded, with the host socket for a graft (the caller closes it).

    err: the broker's own connect's result (0 or EINPROGRESS), for the shim's reply.
    serial: the grants' serial when it was judged (Grants.serial): a reload since voids its grant.
    """

    verdict: Verdict
    sock: socket.socket | None = None
    err: int = 0
    serial: int = 0

    def close(self) -> None:
        """The broker's copy goes once the socket is delivered (or not): it never keeps one."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass(frozen=True, slots=True)
class Stages:
    decisions: Decisions
    sockets: HostSockets
    grants: Grants

    async def carry_out(
        self,
        tenant: TenantState,
        req: request.Request,
        peer: Peer,
        via: str,
        configure: Callable[[socket.socket], None],
        *,
        connect: bool = True,
    ) -> Outcome:
        """Judge req and carry the verdict out up to its delivery (see the module doc).

        configure sets the fresh host socket up (the shim's recorded options,
        or the app socket's own); connect=False leaves a connect to the
        caller (HostSockets.make).
        """
        verdict = self.decisions.judge(tenant, req, peer)
        serial = self.grants.serial  # a reload from here on voids the grant
        out = Outcome(verdict, serial=serial)
        if verdict.action == "graft":
            made = await self.sockets.make(tenant, req, verdict, configure, connect=connect)
            out = Outcome(made.verdict, made.sock, made.err, serial)
        try:
            if self.decisions.record(tenant, peer, req, out.verdict, via):
                return out
        except BaseException:
            out.close()
            raise
        out.close()
        return Outcome(Verdict("deny", out.verdict.rule, self.decisions.unrecorded_errno(req), None, "not recorded"))

    def grant(self, tenant: TenantState, req: request.Request, out: Outcome) -> None:
        """A delivered graft: the kernel lets the tenant's sockets reach its destination too (Grants.grant)."""
        if out.sock is not None:
            self.grants.grant(tenant, req, out.verdict, out.serial)
