"""graft-broker: the trio daemon that opens grafted sockets in the host stack.

main.py is the command line; server.py the composition root (the task
tree, tenants, reload); shim_front.py and seccomp.py the front-ends, which
share decisions.py (judge, record), hostsock.py (the host socket) and
grants.py (the kernel's grants); wire.py and decide.py the pure codec and
decision; the other modules are the edges (namespaces, confinement, audit,
admin socket).
docs/architecture.md walks through it.
"""
