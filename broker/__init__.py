"""graft-broker: the trio daemon that opens grafted sockets in the host stack.

The folders are its layers, and imports point down (tests/unit/test_layers.py
keeps it so):

    main.py, server.py, admin.py, fdstore.py   the service: command line, composition root
    shim/, seccomp/, dns/                       the front-ends (dns/: the resolver for names)
    core/                                       the one decision and the host-socket factory
    confine/                                    kernel confinement (cgroup BPF)
    io/                                         Unix sockets, SCM_RIGHTS, outlet, sd_notify

docs/architecture.md walks through it.
"""
