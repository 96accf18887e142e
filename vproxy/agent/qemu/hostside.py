"""The agent's end of a chardev (its "host side"), whatever it is: what a console reads
QEMU's output from and writes the guest's input to.

    SocketSide   a non-blocking socket: the agent's end of a socketpair it gave QEMU
                 (takeover), or its connection to a socket server chardev (adopted socket)
    FdSide       a non-blocking file descriptor that is not a socket: the slave side of a
                 pty chardev (adopted pty), read with loop.add_reader and os.read

Both offer the same four things: ``chunks()`` (what QEMU writes, a frame's worth at a
time, until EOF; an error is an EOF too), ``send(data)`` (waits while QEMU does not
read), ``read_nowait()`` (what is already there, for the last words of a dying QEMU)
and ``close()``. ``how`` says how the agent holds the chardev, for `vproxy ls`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import termios
from typing import AsyncIterator, Optional, Protocol

from ._streams import FRAME_CHUNK, socket_chunks

#: How a console's or a held guest channel's chardev is held (their describe()["held"]).
TAKEN_OVER = "taken over"
ADOPTED_PTY = "adopted pty"
ADOPTED_SOCKET = "adopted socket"


class HostSide(Protocol):
    how: str  # TAKEN_OVER, ADOPTED_PTY or ADOPTED_SOCKET
    where: str  # the pty or socket adopted, "" for a takeover

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def send(self, data: bytes) -> None: ...

    def read_nowait(self) -> Optional[bytes]: ...

    def close(self) -> None: ...


class SocketSide:
    """A non-blocking socket to QEMU."""

    def __init__(self, sock: socket.socket, how: str = TAKEN_OVER, where: str = ""):
        self.sock = sock
        self.how = how
        self.where = where  # the path or address adopted ("" for a takeover)

    def chunks(self) -> AsyncIterator[bytes]:
        return socket_chunks(self.sock)

    async def send(self, data: bytes) -> None:
        await asyncio.get_event_loop().sock_sendall(self.sock, data)

    def read_nowait(self) -> Optional[bytes]:
        """Bytes already received; None when there are none for now, or at EOF."""
        try:
            data = self.sock.recv(FRAME_CHUNK)
        except OSError:  # BlockingIOError: nothing more for now
            return None
        return data or None

    def close(self) -> None:
        self.sock.close()


class FdSide:
    """A non-blocking file descriptor to QEMU (a pty's slave side), owned by this object."""

    def __init__(self, fd: int, how: str = ADOPTED_PTY, where: str = ""):
        self.fd = fd
        self.how = how
        self.where = where
        self._closed = False
        self._eof = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            data = self.read_nowait()
            if data is None:
                if self._closed or self._eof:
                    return
                await self._wait(readable=True)
                continue
            yield data

    def read_nowait(self) -> Optional[bytes]:
        if self._closed or self._eof:
            return None
        try:
            data = os.read(self.fd, FRAME_CHUNK)
        except BlockingIOError:
            return None
        except OSError:  # EIO: the pty's master side (QEMU) is gone
            self._eof = True
            return None
        if not data:
            self._eof = True
            return None
        return data

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._closed:
                raise OSError("closed")
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                await self._wait(readable=False)
                continue
            view = view[n:]

    async def _wait(self, readable: bool) -> None:
        loop = asyncio.get_event_loop()
        done = loop.create_future()
        add, remove = ((loop.add_reader, loop.remove_reader) if readable
                       else (loop.add_writer, loop.remove_writer))

        def ready() -> None:
            if not done.done():
                done.set_result(None)

        add(self.fd, ready)
        try:
            await done
        finally:
            if not self._closed:
                remove(self.fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_event_loop()
        loop.remove_reader(self.fd)
        loop.remove_writer(self.fd)
        os.close(self.fd)


def open_pty(path: str) -> FdSide:
    """Open the pty *path* (the slave side QEMU's pty chardev made) the way a terminal
    program would, but raw: no echo, no line editing, no CR/LF translation, 8 bits;
    non-blocking and not our controlling terminal. Raises OSError."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        make_raw(fd)
    except BaseException:
        os.close(fd)
        raise
    return FdSide(fd, ADOPTED_PTY, path)


def make_raw(fd: int) -> None:
    """cfmakeraw(3) on *fd* (QEMU sets its side raw too, but someone may have changed it)."""
    attrs = termios.tcgetattr(fd)
    attrs[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                  | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    attrs[1] &= ~termios.OPOST
    attrs[2] &= ~(termios.CSIZE | termios.PARENB)
    attrs[2] |= termios.CS8
    attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
