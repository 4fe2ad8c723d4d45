"""Reading a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) from Python, with mmap.

The connect programs leave one record per connect they judge on the fast
path (programs._first_connect), without waking anyone; the broker drains the
ring on a timer (grants.Grants.drain_kernel_audit) into the audit log.

Layout, per the kernel's ringbuf.c: page 0 holds the consumer position
(the only page userspace may write), page 1 the producer position, and the
data area follows, mapped twice in a row so that a record running past its
end reads contiguously. Each record has an 8-byte header (u32 length with a
BUSY and a DISCARD bit, u32 page offset) and is padded to 8 bytes.

Positions are read with plain loads: correct on x86-64, whose stores are
seen in order. A weakly ordered machine would need an acquire load of the
producer position, which Python cannot express.
"""

from __future__ import annotations

import mmap
import struct

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
_POS = struct.Struct("=Q")
_LEN = struct.Struct("=I")


class RingReader:
    """The consumer side of one ring buffer map of ``size`` bytes (a power of two)."""

    def __init__(self, map_fd: int, size: int):
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._producer = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            self._consumer.close()
            raise
        self._data = page  # where the data area starts in the producer mapping
        self._mask = size - 1

    def drain(self) -> list[bytes]:
        """Every committed record not consumed yet, oldest first; they are consumed."""
        cons = _POS.unpack_from(self._consumer, 0)[0]
        prod = _POS.unpack_from(self._producer, 0)[0]
        out = []
        while cons < prod:
            at = self._data + (cons & self._mask)
            (word,) = _LEN.unpack_from(self._producer, at)
            if word & _BUSY:  # reserved, not committed yet: the rest waits for the next drain
                break
            length = word & ~(_BUSY | _DISCARD)
            if not word & _DISCARD:
                out.append(self._producer[at + _HDR : at + _HDR + length])
            cons += (length + _HDR + 7) & ~7
        _POS.pack_into(self._consumer, 0, cons)
        return out

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
