"""graft: container sockets grafted onto the host network stack, under policy.

The package namespace joins the components: ``graft.shim`` (libgraft.so),
``graft.broker`` (graft-broker), ``graft.policy`` (policy files) and the
``graft`` command line in ``graft.cli``.
"""
