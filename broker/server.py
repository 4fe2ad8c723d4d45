"""The broker's composition root: the stages wired together, the tenants, reload and status.

A request goes through the same stages whichever front-end brings it
(shim/front.py, seccomp/agent.py): ``core.stages.Stages.carry_out``, with
grants.py keeping the broker's verdicts in the kernel, which then judges
connects of pre-issued sockets itself and leaves a record of each that
grants.py drains into the audit log. ``Broker`` makes one of each stage,
gives each front-end the stages and what it needs of its own, owns the task
tree (docs/architecture.md draws it, with each task's owner and
cancellation), and keeps the tenants as the policy says.

A reload gives the tenants their new rules in one step, removes and adds
tenants, and revokes the grants of the old rules; grafted sockets belong
to the apps and are never touched.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import trio

from graft.policy import PolicyFile, Tenant, TenantMatcher, compile_policy

from .admin import ADMIN_SOCKET, serve_admin
from .confine import lifecycle
from .confine.lifecycle import Confinement
from .core.audit import AuditLog
from .core.decisions import Decisions
from .core.grants import Grants
from .core.hostsock import HostSockets
from .core.netns import Namespace
from .core.stages import Stages
from .core.tenant import TenantState
from .dns.resolvers import Resolvers
from .io.fdstore import FdStore
from .seccomp.abi import SECCOMP_SOCKET
from .seccomp.agent import SeccompAgent
from .shim.front import ShimFront

log = logging.getLogger("graft.broker")


class Broker:
    def __init__(
        self,
        policy: PolicyFile,
        socket_dir: Path,
        audit: AuditLog,
        confinement: Confinement | None = None,
        fdstore: FdStore | None = None,
    ):
        self.policy = policy
        self.fdstore = fdstore if fdstore is not None else FdStore()
        # Kernel confinement (confine/lifecycle.py): every grafted socket is marked before it is sent.
        # None (tests that build a Broker in-process, confinement "off"/unavailable): not locked.
        self.confinement = confinement
        self.confinement_state = "on" if confinement is not None else "off"
        self.socket_dir = Path(socket_dir)
        self.audit = audit
        self.tenants: dict[str, TenantState] = {}
        self._nursery: trio.Nursery | None = None
        self.generation = 1  # of the policy in force: 1 at start, +1 per reload
        self.loaded_at = time.time()
        # The stages every front-end shares, made once so that both front-ends go through the
        # same ones; then the front-ends, each given those stages and what it needs of its own.
        self.decisions = Decisions(audit, self.confinement_state, policy.audit.on_error)
        self.sockets = HostSockets(confinement)
        self.grants = Grants(confinement, self.tenants, self.decisions, self.sockets)
        stages = Stages(self.decisions, self.sockets, self.grants)
        self.resolvers = Resolvers(self.decisions, self.fdstore)
        self.shim = ShimFront(stages, self.fdstore, self.socket_dir, self.resolvers.serve)
        self.seccomp = SeccompAgent(stages, self.tenants, self.resolvers.serve)

    # ---- lifecycle -------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve every tenant until cancelled; started() once all listen."""
        prepare_socket_dir(self.socket_dir)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            matchers = compile_policy(self.policy)
            self.fdstore.check_capacity(len(self.policy.tenants))
            for name, config in self.policy.tenants.items():
                await self._add_tenant(name, config, matchers[name])
            self.shim.drop_leftover_listeners()
            self.resolvers.drop_leftovers()
            ring = self.grants.open_audit_ring()
            if ring is not None:
                nursery.start_soon(self.grants.drain_kernel_audit, ring)
            await nursery.start(serve_admin, self.status, self.socket_dir / ADMIN_SOCKET)
            await nursery.start(self.seccomp.serve, self.socket_dir / SECCOMP_SOCKET)
            task_status.started()

    async def _add_tenant(self, name: str, config: Tenant, matcher: TenantMatcher) -> None:
        assert self._nursery is not None
        state = TenantState(
            name, config, matcher, Namespace(config.netns, config.socket_owner(name)), self.socket_dir / f"{name}.sock"
        )
        state.configure(config, matcher)
        if self.confinement is not None:
            try:
                state.kid = self.confinement.new_tenant_id()
            except lifecycle.Unavailable as e:
                raise RuntimeError(str(e)) from None
            self.grants.new_id(state)
        try:
            await self._nursery.start(self._serve_tenant, state)
        except BaseException:
            self._forget(state)
            raise
        self.tenants[name] = state  # only once it listens: a failed start leaves no half tenant

    def _forget(self, tenant: TenantState) -> None:
        """A tenant gone: its grants and its close count go (its sockets stay counted nowhere)."""
        self.grants.drop(tenant)
        self.resolvers.forget(tenant)
        if self.confinement is None or not tenant.kid:
            return
        try:
            self.confinement.forget_tenant(tenant.kid)
        except OSError as e:  # a leftover count entry costs one map slot
            log.error("tenant %s: cannot remove its socket count: %s", tenant.name, e)

    async def _serve_tenant(self, tenant: TenantState, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The tenant's task: its socket, and the nursery its front-ends' tasks run in, until cancelled."""
        try:
            async with self.shim.listening(tenant) as listener:
                with tenant.cancel_scope:
                    async with trio.open_nursery() as tasks:
                        tenant.nursery = tasks  # the seccomp agent starts the tenant's notify fds' tasks here
                        # A restart's resolvers are served again before the tenant counts as started (READY=1),
                        # and before any program can ask for one: none is served twice.
                        await self.resolvers.adopt(tenant)
                        task_status.started()
                        log.info("tenant %s listening on %s (netns %s)", tenant.name, tenant.path, tenant.config.netns)
                        await self.shim.accept(tenant, listener)
        finally:
            tenant.done.set()

    async def reload(self, policy: PolicyFile) -> None:
        """Apply a validated policy: new decisions for new requests only.

        Grafted sockets belong to the apps and are not touched. Removed
        tenants stop listening; added tenants start; the rest keep their
        listeners and connections and take the new rules at once. If some
        added tenants cannot start, everything else is applied and then
        RuntimeError names them.
        """
        matchers = compile_policy(policy)
        self.fdstore.check_capacity(len(policy.tenants))
        for key in ("socket_dir", "audit_log", "confinement"):
            if getattr(policy.broker, key) != getattr(self.policy.broker, key):
                log.warning("broker.%s changed in the policy; it takes effect at the next restart", key)
        # One step, with no checkpoint: removed tenants are cancelled, the others
        # take their new rules, and the old rules' grants go (Grants.new_rules).
        # Existing tenants come first, so that a new tenant whose listener cannot
        # start leaves none of them on the old rules.
        removed = [self.tenants.pop(name) for name in list(self.tenants) if name not in policy.tenants]
        for gone in removed:
            gone.removed = True
            gone.cancel_scope.cancel()
        added = [name for name in policy.tenants if name not in self.tenants]
        for name, state in self.tenants.items():
            config = policy.tenants[name]
            # Sockets pre-issued into the old namespace, or to a uid the new list
            # leaves out, must not use the new grants: they get none, ever.
            reissue = (config.netns, config.uids) != (state.config.netns, state.config.uids)
            state.configure(config, matchers[name])
            if reissue and self.confinement is not None and state.gid:
                self.grants.new_id(state)
            try:
                os.chmod(state.path, config.socket_mode_int)
            except OSError as e:
                log.error("tenant %s: cannot set the mode of %s: %s", name, state.path, e)
        self.grants.new_rules()
        for gone in removed:
            await gone.done.wait()  # READY=1 after a reload means the removal is complete
            self._forget(gone)
            log.info("tenant %s removed", gone.name)
        failed = []
        for name in added:
            try:
                await self._add_tenant(name, policy.tenants[name], matchers[name])
                log.info("tenant %s added", name)
            except (OSError, RuntimeError) as e:
                failed.append(f"tenant {name}: {e}")
        self.policy = policy
        self.decisions.on_error = policy.audit.on_error
        self.generation += 1
        self.loaded_at = time.time()
        if failed:
            raise RuntimeError("; ".join(failed))

    async def status(self) -> dict:
        """What `graft status` shows: tenants, live grafted sockets, counters, confinement."""
        tenants = {}
        for name, t in list(self.tenants.items()):
            try:
                live, exact = await self.sockets.live_count(t), True
            except OSError:
                live, exact = len(t.live), False  # an upper bound: not pruned
            tenants[name] = {
                "socket": str(t.path),
                "netns": t.config.netns,
                "mode": t.config.mode,
                "socket_uid": t.namespace.owner,
                "live_sockets": live,
                "live_exact": exact,
                "max_sockets": t.config.max_sockets,
                "max_rate": t.config.max_rate,
                "counts": {a: t.counts[a] for a in ("graft", "container", "deny", "error")},
                "preissued": t.preissued,
                "seccomp_listeners": t.seccomp_listeners,
                "seccomp_calls": t.seccomp_calls(),
                "resolver": t.config.dns.resolver,  # its address, or "off": graft-runtime names it in resolv.conf
                "resolvers": self.resolvers.count(t),
            }
        return {
            "policy": {
                "version": self.policy.version,
                "generation": self.generation,
                "loaded_at": datetime.fromtimestamp(self.loaded_at, UTC).isoformat(),
            },
            "confinement": self.confinement_state,
            "audit": {
                "on_error": self.policy.audit.on_error,
                "lost": self.audit.lost,
                "waiting_bytes": self.audit.waiting,
                "refused": self.decisions.refused,
            },
            "tenants": tenants,
        }


def prepare_socket_dir(path: Path) -> None:
    """Create the socket directory, mode 0700: host users must not reach tenants' sockets."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
