"""The resolver front-end (in progress, docs/dns.md): DNS for grafted programs, served by the broker.

message.py is the sans-IO half: queries and answers as bytes in and out,
through dnspython, and the TTL cache. The listeners in the containers'
network namespaces and the forwarding to upstreams are not written yet;
docs/dns.md says how they will work.
"""
