"""The seccomp front-end: stopped system calls of static binaries.

agent.py receives a tenant's notify fds and answers each stopped call
through core/; abi.py and syscalls.py are the kernel's seccomp interfaces,
procfs.py what /proc says of a caller, calls.py which calls are stopped
(read by the OCI runtime wrapper too), and fast.py with seccomp_fast.c the
C loop that answers calls the kernel's grant map already allows.
"""
