"""The bottom layer: Unix sockets, SCM_RIGHTS, the non-blocking outlet, sd_notify,
and reading C headers into cffi. Nothing here imports from the rest of the broker.
"""
