"""A tiny eBPF assembler: the few instructions confinement's programs use, with labels.

There is no compiler at run time, so the programs (programs.py) are written
here instruction by instruction. Encodings follow <linux/bpf.h>.
"""

from __future__ import annotations

import struct


class Asm:
    """A few eBPF instructions, with labels for forward jumps."""

    def __init__(self):
        self.insns: list[list] = []  # [code, dst, src, off, imm, label-or-None]
        self.labels: dict[str, int] = {}

    def _emit(self, code, dst=0, src=0, off=0, imm=0, target=None):
        self.insns.append([code, dst, src, off, imm, target])

    def label(self, name):
        self.labels[name] = len(self.insns)

    def mov_reg(self, dst, src):
        self._emit(0xBF, dst, src)  # BPF_ALU64 | BPF_MOV | BPF_X

    def mov_imm(self, dst, imm):
        self._emit(0xB7, dst, 0, 0, imm)  # BPF_ALU64 | BPF_MOV | BPF_K

    def and_imm(self, dst, imm):
        self._emit(0x57, dst, 0, 0, imm)  # BPF_ALU64 | BPF_AND | BPF_K

    def ldx_w(self, dst, src, off):
        self._emit(0x61, dst, src, off)  # BPF_LDX | BPF_MEM | BPF_W

    def ldx_dw(self, dst, src, off):
        self._emit(0x79, dst, src, off)  # BPF_LDX | BPF_MEM | BPF_DW

    def add_imm(self, dst, imm):
        self._emit(0x07, dst, 0, 0, imm)  # BPF_ALU64 | BPF_ADD | BPF_K

    def rsh_imm(self, dst, imm):
        self._emit(0x77, dst, 0, 0, imm)  # BPF_ALU64 | BPF_RSH | BPF_K

    def div_imm(self, dst, imm):
        self._emit(0x37, dst, 0, 0, imm)  # BPF_ALU64 | BPF_DIV | BPF_K (unsigned)

    def stx_w(self, dst, off, src):
        self._emit(0x63, dst, src, off)  # BPF_STX | BPF_MEM | BPF_W

    def stx_dw(self, dst, off, src):
        self._emit(0x7B, dst, src, off)  # BPF_STX | BPF_MEM | BPF_DW

    def st_w(self, dst, off, imm):
        self._emit(0x62, dst, 0, off, imm)  # BPF_ST | BPF_MEM | BPF_W

    def atomic_add_dw(self, dst, off, src):
        self._emit(0xDB, dst, src, off, 0)  # BPF_STX | BPF_ATOMIC | BPF_DW, imm BPF_ADD

    def stack_ptr(self, dst, off):
        self.mov_reg(dst, 10)
        self.add_imm(dst, off)

    def ja(self, target):
        self._emit(0x05, 0, 0, 0, 0, target)

    def ld_abs_b(self, off):
        self._emit(0x30, 0, 0, 0, off)  # BPF_LD | BPF_ABS | BPF_B: r0 = packet byte (skb in r6)

    def ld_map_fd(self, dst, fd):
        self._emit(0x18, dst, 1, 0, fd)  # BPF_LD | BPF_IMM | BPF_DW, src = BPF_PSEUDO_MAP_FD
        self._emit(0x00)

    def call(self, helper):
        self._emit(0x85, 0, 0, 0, helper)

    def jeq_imm(self, dst, imm, target):
        self._emit(0x15, dst, 0, 0, imm, target)

    def jne_imm(self, dst, imm, target):
        self._emit(0x55, dst, 0, 0, imm, target)

    def jne_reg(self, dst, src, target):
        self._emit(0x5D, dst, src, 0, 0, target)

    def jge_reg(self, dst, src, target):
        self._emit(0x3D, dst, src, 0, 0, target)  # BPF_JMP | BPF_JGE | BPF_X (unsigned, 64-bit)

    def unique(self, name: str) -> str:
        """A label name not used yet: for code a program emits more than once."""
        n = sum(1 for label in self.labels if label.startswith(name))
        return f"{name}#{n}"

    def exit(self):
        self._emit(0x95)

    def assemble(self) -> bytes:
        out = b""
        for i, (code, dst, src, off, imm, target) in enumerate(self.insns):
            if target is not None:
                off = self.labels[target] - (i + 1)
            out += struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
        return out
