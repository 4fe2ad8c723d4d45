"""Lines out to stderr, a pipe or a file, without ever blocking the event loop.

The broker's audit log and its own log go to stderr under systemd (the
journal) and often to a pipe elsewhere. A reader that stalls (a log shipper
that hangs, a terminal on pause) fills the pipe, and a blocking write(2)
would then stop the whole broker, every tenant with it. So an Outlet writes
without blocking:

* a line is written at once when the pipe has room (one write(2) of the
  whole line: up to PIPE_BUF bytes that is atomic, so lines from other
  writers never cut into it);
* otherwise it waits in memory, in order, up to ``limit`` bytes, and
  ``run()``, a task of the broker's nursery, writes the waiting lines as
  the reader makes room;
* beyond that the line is lost, and counted: ``offer()`` says so, and the
  caller decides what a lost line costs (the audit log's ``on_error``).

The flag that makes writes non-blocking belongs to the open file
description, which a dup() shares: setting it on fd 2 itself would make
every other writer of the inherited stderr fail with EAGAIN. The Outlet
therefore opens its target anew, through /proc/self/fd for an inherited
descriptor, which gives a pipe, a FIFO or a terminal a description of its
own. A socket (journald's stream under systemd) cannot be opened that way;
it is written with MSG_DONTWAIT instead, which is non-blocking per call. A
regular file is never "full" and never waits here.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import stat
import threading

import trio

DEFAULT_LIMIT = 1 << 20  # about 4,000 audit records


def reopen(fd: int) -> int:
    """A new open file description of what fd refers to, non-blocking, appending like stderr would."""
    return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)


def _left(data: bytes, written: int, lines: int) -> int:
    """Of the lines in data, those not written whole once its first ``written`` bytes are (one at least)."""
    return max(1, lines - data.count(b"\n", 0, written))


class Outlet:
    """Non-blocking, ordered, bounded writes of whole lines to one fd (which it owns).

    offer() may be called from any thread (the log handler runs wherever a
    log call is made, trio's worker threads included); run() is a trio task.
    A lock keeps the queue whole; a line queued from another thread wakes
    run() through the trio token, as trio requires of foreign threads.
    """

    def __init__(self, fd: int, limit: int = DEFAULT_LIMIT):
        self.fd = fd
        self.limit = limit
        mode = os.fstat(fd).st_mode
        if stat.S_ISSOCK(mode):
            self._sock: socket.socket | None = socket.socket(fileno=fd)
            self._write = lambda data: self._sock.send(data, socket.MSG_DONTWAIT)
        else:
            self._sock = None
            self._write = lambda data: os.write(fd, data)
        self.lost = 0  # lines offered and never written
        self._lock = threading.Lock()
        self._waiting: collections.deque[tuple[bytes, int]] = collections.deque()  # (bytes, lines in them)
        self._waiting_bytes = 0
        # A regular file is never full, and epoll cannot wait on one: nothing ever waits for it.
        self._pollable = not stat.S_ISREG(mode)
        self._ready = trio.Event()  # set while lines wait
        self._token: trio.lowlevel.TrioToken | None = None  # run()'s, once it runs
        self._loop_thread: int | None = None

    @classmethod
    def open_path(cls, path: str, limit: int = DEFAULT_LIMIT) -> Outlet:
        return cls(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o640), limit)

    @classmethod
    def inherited(cls, fd: int, limit: int = DEFAULT_LIMIT) -> Outlet:
        """An outlet to what an inherited fd (stderr) refers to, leaving that fd's own flags alone."""
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            return cls(os.dup(fd), limit)
        return cls(reopen(fd), limit)

    @property
    def waiting(self) -> int:
        """Bytes waiting for the reader."""
        return self._waiting_bytes

    def offer(self, line: bytes, lines: int = 1) -> bool:
        """Write line (``lines`` whole lines) now, or queue it: True. Lost (no room, or the fd failed): False,
        with OSError raised for a failure other than a full pipe; lost counts ``lines``."""
        with self._lock:
            if not self._waiting:  # else behind what already waits: order is kept
                try:
                    n = self._write(line)
                except BlockingIOError:
                    n = 0
                except OSError:
                    self.lost += lines
                    raise
                if n == len(line):
                    return True
                # Nothing written (full), or a line longer than PIPE_BUF written in part: the rest goes first.
                if n == 0 and not self._room_for(line):
                    self.lost += lines
                    return False
                line, lines = line[n:], _left(line, n, lines)
            elif not self._room_for(line):
                self.lost += lines
                return False
            self._waiting.append((line, lines))
            self._waiting_bytes += len(line)
        self._wake()
        return True

    def _room_for(self, line: bytes) -> bool:
        return self._pollable and self._waiting_bytes + len(line) <= self.limit

    def _wake(self) -> None:
        """Tell run() lines wait: directly on trio's thread (or before trio runs), else through its token."""
        if self._token is None or threading.get_ident() == self._loop_thread:
            self._ready.set()
            return
        try:
            self._token.run_sync_soon(self._set_ready)
        except trio.RunFinishedError:
            pass  # the broker is stopping: close() gives the lines their last chance

    def _set_ready(self) -> None:
        self._ready.set()

    def flush(self) -> None:
        """Write what waits, as far as the reader has made room (never blocks)."""
        with self._lock:
            while self._waiting:
                line, lines = self._waiting[0]
                try:
                    n = self._write(line)
                except BlockingIOError:
                    return
                except OSError:
                    self.lost += self._lines_waiting()
                    self._waiting.clear()
                    self._waiting_bytes = 0
                    raise
                self._waiting_bytes -= n
                if n < len(line):
                    self._waiting[0] = (line[n:], _left(line, n, lines))
                    return
                self._waiting.popleft()

    def _lines_waiting(self) -> int:
        return sum(lines for _, lines in self._waiting)

    async def run(self) -> None:
        """Write waiting lines as the reader makes room; runs until cancelled."""
        self._token, self._loop_thread = trio.lowlevel.current_trio_token(), threading.get_ident()
        if not self._pollable:
            await trio.sleep_forever()
        while True:
            await self._ready.wait()
            await trio.lowlevel.wait_writable(self.fd)
            try:
                self.flush()
            except OSError:
                pass  # counted in lost; the next offer() reports the error to its caller
            with self._lock:
                if not self._waiting:
                    self._ready = trio.Event()

    def close(self) -> None:
        """Last chance for waiting lines (one try each, without blocking), then close."""
        try:
            self.flush()
        except OSError:
            pass
        self.lost += self._lines_waiting()
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self.fd)


class LogHandler(logging.Handler):
    """A logging handler writing through an Outlet: a stalled stderr costs log lines, never the event loop."""

    def __init__(self, outlet: Outlet):
        super().__init__()
        self.outlet = outlet

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.outlet.offer((self.format(record) + "\n").encode(errors="replace"))
        except OSError:
            pass  # stderr is gone: there is nowhere left to say so
