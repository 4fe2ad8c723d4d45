"""The preload front-end: libgraft.so's requests over a tenant's Unix socket.

wire.py is the message codec (graft_wire.h, through cffi), front.py the
listener and the per-connection loop that hands each request to core/.
"""
