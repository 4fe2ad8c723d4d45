"""graft-broker: the trio daemon that opens grafted sockets in the host stack.

main.py is the command line; server.py the task tree and the one exchange
per request; wire.py and decide.py the pure codec and decision; the other
modules are the edges (namespaces, confinement, audit, admin socket).
docs/architecture.md walks through it.
"""
