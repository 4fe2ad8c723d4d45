"""Kernel confinement: the cgroup BPF programs that lock every handed-out socket.

lifecycle.py loads, pins, attaches and removes them; programs.py and asm.py
write the programs; maps.py is the layout of the maps they share with the
broker; bpf.py is bpf(2); fastpath.py drives the C (issue.c, kaudit.c) that
makes pre-issued sockets in batches and writes the kernel's audit ring as
audit lines. Nothing
here decides: core/ fills the maps, the kernel enforces them. Imports stay
within confine/ and io/.
"""
