"""The one decision and what carries it out, shared by both front-ends.

A request (request.py) is judged (decisions.py: max_rate, then the pure
rules of verdict.py), audited (audit.py), and carried out by the one
host-socket factory (hostsock.py, sockopts.py, netns.py) and the fast-path
grants (grants.py); tenant.py holds each tenant's state. Nothing here knows
how a request arrived: imports go down to confine/ and io/ only.
"""
