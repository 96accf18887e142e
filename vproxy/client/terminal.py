"""The local terminal of the interactive console: raw mode, the escape character,
status lines, and reading stdin / writing stdout from asyncio. No click here.

Rules this module keeps:
- `RawMode` saves the terminal's attributes before changing them and puts them back
  on every way out it is given (its context manager's exit, `restore()` from a signal
  handler); restoring twice is harmless. `reapply()` is for SIGCONT: a shell may have
  reset the terminal while the process was stopped.
- `EscapeParser` is pure: bytes in, a list of plain bytes and commands out. The escape
  character is recognised anywhere (as in virsh console and telnet, not only at the
  start of a line as in ssh); the byte after it picks a command. Typed twice it sends
  one escape character; followed by anything else both bytes are sent unchanged.
- `Output` writes the console's bytes to stdout and status lines to stderr, each
  status on a line of its own ("vproxy: ..."), with CR LF while the terminal is raw.
- stdin is never switched to non-blocking mode (the open file is shared with the
  shell): `StdinReader` reads once per readiness callback, and reads files and
  /dev/null, which cannot be polled, directly.
"""

import asyncio
import os
import stat
import termios
from typing import Any, List, Optional, Union

DEFAULT_ESCAPE = "^]"

# Commands the byte after the escape character selects.
QUIT = "quit"
HELP = "help"
FORCE = "force"
_COMMANDS = {ord("."): QUIT, ord("?"): HELP, ord("f"): FORCE}


def parse_escape(text: str) -> Optional[int]:
    """"^]" / "^A" / "^?" (caret notation), one ASCII character, or "none" -> the byte
    (None for "none"). Raises ValueError with a sentence saying what is accepted."""
    if text.lower() == "none":
        return None
    if len(text) == 2 and text[0] == "^":
        c = text[1].upper()
        if c == "?":
            return 0x7F
        if "@" <= c <= "_":
            return ord(c) - 0x40
    elif len(text) == 1 and ord(text) < 0x80:
        if text in ".?f":
            raise ValueError("%r is an escape command itself; choose another escape "
                             "character" % text)
        return ord(text)
    raise ValueError("%r is not an escape character: give ^X (caret notation, e.g. ^] or "
                     "^A), a single ASCII character, or none" % text)


def describe_escape(byte: Optional[int]) -> str:
    """The byte in caret notation (^]) or as itself; "none" for None."""
    if byte is None:
        return "none"
    if byte < 0x20:
        return "^" + chr(byte + 0x40)
    if byte == 0x7F:
        return "^?"
    return chr(byte)


def help_text(escape: Optional[int]) -> List[str]:
    """The short help shown after the escape character and ?."""
    e = describe_escape(escape)
    return [
        "escape commands (type %s, then):" % e,
        "  .   disconnect and quit",
        "  f   force: take the writer role from whoever holds it",
        "  ?   this help",
        "  %-3s send %s itself" % (e, e),
    ]


class EscapeParser:
    """Splits typed bytes into bytes for the console and escape commands."""

    def __init__(self, escape: Optional[int]):
        self.escape = escape
        self.pending = False  # the escape character was the last byte seen

    def feed(self, data: bytes) -> List[Union[bytes, str]]:
        """-> a list of bytes objects (to send) and command names (QUIT, HELP, FORCE)."""
        if self.escape is None:
            return [data] if data else []
        out: List[Union[bytes, str]] = []
        buf = bytearray()
        for b in data:
            if self.pending:
                self.pending = False
                if b == self.escape:
                    buf.append(b)
                elif b in _COMMANDS:
                    if buf:
                        out.append(bytes(buf))
                        buf = bytearray()
                    out.append(_COMMANDS[b])
                else:
                    buf.append(self.escape)
                    buf.append(b)
            elif b == self.escape:
                self.pending = True
            else:
                buf.append(b)
        if buf:
            out.append(bytes(buf))
        return out


# termios attribute list indices
_IFLAG, _OFLAG, _CFLAG, _LFLAG, _CC = 0, 1, 2, 3, 6


def raw_attributes(attrs: list) -> list:
    """What cfmakeraw(3) makes of *attrs*: no echo, no line editing, no signals from
    keys, no CR/NL translation either way, 8-bit characters, read returns each byte."""
    new: List[Any] = [list(a) if isinstance(a, list) else a for a in attrs]
    new[_IFLAG] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                     | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    new[_OFLAG] &= ~termios.OPOST
    new[_LFLAG] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG
                     | termios.IEXTEN)
    new[_CFLAG] &= ~(termios.CSIZE | termios.PARENB)
    new[_CFLAG] |= termios.CS8
    new[_CC][termios.VMIN] = 1
    new[_CC][termios.VTIME] = 0
    return new


class RawMode:
    """The terminal on *fd* in raw mode for the duration of a ``with`` block."""

    def __init__(self, fd: int):
        self.fd = fd
        self.saved: Optional[list] = None
        self.active = False

    def enter(self) -> None:
        self.saved = termios.tcgetattr(self.fd)
        self.reapply()

    def reapply(self) -> None:
        if self.saved is None:
            return
        termios.tcsetattr(self.fd, termios.TCSANOW, raw_attributes(self.saved))
        self.active = True

    def restore(self) -> None:
        """Put the saved attributes back (idempotent; never raises)."""
        if self.saved is None or not self.active:
            return
        self.active = False
        try:
            termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)
        except (termios.error, OSError):
            pass  # the terminal is gone (hangup): nothing to restore

    def __enter__(self) -> "RawMode":
        self.enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


class Output:
    """Console bytes to *out_fd*, status lines to *err_fd*.

    raw: the terminal is in raw mode (no output processing), so lines end in CR LF.
    A status line starts on a fresh line when the console's output stopped mid-line
    on the same terminal.
    """

    def __init__(self, out_fd: int = 1, err_fd: int = 2):
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.raw = False
        self.at_line_start = True
        self.out_is_tty = is_terminal(out_fd)
        self.shared = self.out_is_tty and is_terminal(err_fd)

    async def write(self, data: bytes) -> None:
        """Write console output; to a pipe or file without blocking the event loop."""
        if not data:
            return
        if self.out_is_tty:
            _write_all(self.out_fd, data)
        else:
            await asyncio.get_event_loop().run_in_executor(None, _write_all, self.out_fd, data)
        self.at_line_start = data.endswith(b"\n")

    def status(self, message: str) -> None:
        """One line "vproxy: MESSAGE" on stderr, on a line of its own."""
        self.lines(["vproxy: " + message])

    def lines(self, lines: List[str]) -> None:
        end = "\r\n" if self.raw else "\n"
        text = end.join(lines) + end
        if self.shared and not self.at_line_start:
            text = end + text
        try:
            _write_all(self.err_fd, text.encode("utf-8", "replace"))
        except OSError:
            return  # stderr is gone (hangup): nobody to tell
        if self.shared:
            self.at_line_start = True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:  # someone made the file non-blocking: wait a moment
            import select  # lazy: only on this rare path

            select.select([], [fd], [], 1.0)
            continue
        view = view[n:]


class StdinReader:
    """Reads *fd* from asyncio without making it non-blocking.

    The fd is watched only while a read() waits, so input nobody asked for yet stays
    in the kernel (and a level-triggered readiness callback cannot spin)."""

    def __init__(self, fd: int = 0, size: int = 4096):
        self.fd = fd
        self.size = size
        self._pollable = not _is_file(fd)
        self._loop = asyncio.get_event_loop()

    async def read(self) -> bytes:
        """Some bytes, b"" at end of input."""
        if self._pollable:
            waiter = self._loop.create_future()

            def ready() -> None:
                if not waiter.done():
                    waiter.set_result(None)

            try:
                self._loop.add_reader(self.fd, ready)
            except (OSError, ValueError):  # e.g. /dev/null, which epoll refuses
                self._pollable = False
            else:
                try:
                    await waiter
                finally:
                    self._loop.remove_reader(self.fd)
        try:
            return os.read(self.fd, self.size)
        except OSError:  # EIO after a hangup: no more input
            return b""


def _is_file(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return True
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def stdio_interactive() -> bool:
    """Both stdin and stdout are terminals: the console is interactive."""
    return is_terminal(0) and is_terminal(1)
