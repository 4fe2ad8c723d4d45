"""The system calls that seccomp mode stops for the broker to judge.

Two places install a filter for them: the OCI runtime wrapper, as the
``linux.seccomp`` section of a bundle's config.json (the runtime builds the
filter), and ``graft run --seccomp``, which builds one itself. Both take the
list from here so that they cannot drift apart; the broker's seccomp agent
answers exactly these. ``sendmmsg`` is left out on purpose: a datagram it
sends to an address goes out through the container's own stack, which in
seccomp mode has nothing but ``lo``, so it is not an escape, only not grafted.
"""

NOTIFIED_SYSCALLS = ("connect", "bind", "sendto", "sendmsg")
