"""The resolver front-end: DNS for grafted programs, served by the broker (docs/dns.md).

message.py is the sans-IO half: queries and answers as bytes in and out,
through dnspython, and the TTL cache. resolver.py is the I/O of one
resolver: listeners in a program's network namespace, forwarding from the
tenant's netns, and the audit record of every query. resolvers.py keeps
the tenants' resolvers: which namespaces are served, for whom, and across
a restart (the fd store).
"""
