"""Expect-style helpers for a byte stream: wait for a pattern, send a line, log in, run a command.

    console = await client.console("web1")            # vproxy.api: an AsyncExpect
    await console.login("root", prompt=b"root@web1:~# ")
    assert await console.run("echo $((6*7))") == "42"

The sync API (`vproxy.api.Client.console()`) offers the same methods without ``await``.

Rules this module keeps:
- Matching is on bytes. A pattern is ``bytes`` or ``str`` (matched literally; a str is
  encoded, UTF-8 by default) or a compiled regular expression (``re.compile(rb"...")``;
  a str regex is recompiled on its encoding). A list of patterns matches whichever
  occurs first in the output (on a tie, the earlier in the list); `match_index` says which.
- `expect` consumes the output up to the end of the match: `before` is what came between
  the previous match and this one, `after` the matched bytes; what follows stays for the
  next call. `read` returns that leftover first.
- A timeout raises `ExpectTimeout` (also a builtin TimeoutError) whose message names the
  stream and the pattern and shows the last output seen, escaped line by line, so a CI log
  says what the guest printed instead. End of stream raises `ExpectEOF` the same way.
- Everything received is kept in `transcript` (the newest `TRANSCRIPT_LIMIT` bytes) and,
  with ``log=``, copied to a binary file object as it arrives.
- `Expecter` is the core and does no I/O (like vproxy.mux); `AsyncExpect` drives it from
  an async stream (anything with ``async read(n)``, ``async write(data)``).
"""

import asyncio
import re
import time
from typing import Any, BinaryIO, List, Optional, Pattern, Sequence, Union

from vproxy.errors import VproxyError

__all__ = [
    "ExpectError",
    "ExpectTimeout",
    "ExpectEOF",
    "LoginFailed",
    "Expecter",
    "AsyncExpect",
    "compile_pattern",
    "printable",
    "DEFAULT_PROMPT",
    "DEFAULT_LOGIN_PROMPT",
    "DEFAULT_PASSWORD_PROMPT",
]

#: Bytes of output kept in `transcript` (older output is dropped, and counted).
TRANSCRIPT_LIMIT = 4 << 20
#: Bytes of unmatched output kept for matching (older ones are dropped from the search).
SEARCH_LIMIT = 1 << 20
#: How often `login` sends the user name when the login prompt comes straight back.
LOGIN_ATTEMPTS = 5
#: How much of the last output an error message shows.
ERROR_TAIL = 1024

#: A shell prompt at the end of the output: "... $ " or "... # " (pass the real one if you can).
DEFAULT_PROMPT = re.compile(rb"[#$] $")
#: A getty-style login prompt at the end of the output.
DEFAULT_LOGIN_PROMPT = re.compile(rb"login: *$")
#: A password prompt at the end of the output.
DEFAULT_PASSWORD_PROMPT = re.compile(rb"[Pp]assword: *$")

PatternLike = Union[bytes, bytearray, str, Pattern]
Patterns = Union[PatternLike, Sequence[PatternLike]]


class ExpectError(VproxyError):
    """Base of this module's errors; `output` holds the last output seen."""

    def __init__(self, message: str, output: bytes = b""):
        super().__init__(message)
        self.message = message
        self.output = output


class ExpectTimeout(ExpectError, TimeoutError):
    """The pattern did not appear in time."""


class ExpectEOF(ExpectError, EOFError):
    """The stream ended before the pattern appeared."""


class LoginFailed(ExpectError):
    """`login` saw the login prompt again, or was asked for a password it was not given."""


def compile_pattern(pattern: PatternLike, encoding: str = "utf-8") -> Pattern:
    """A bytes regex for *pattern*: literal for bytes/str, as is for a compiled regex."""
    if isinstance(pattern, (bytes, bytearray, memoryview)):
        return re.compile(re.escape(bytes(pattern)))
    if isinstance(pattern, str):
        return re.compile(re.escape(pattern.encode(encoding)))
    if isinstance(pattern, re.Pattern):
        if isinstance(pattern.pattern, bytes):
            return pattern
        return re.compile(pattern.pattern.encode(encoding), pattern.flags & ~re.UNICODE)
    raise TypeError("a pattern is bytes, str or a compiled regex, not %s" % type(pattern).__name__)


def _as_list(patterns: Patterns) -> List[PatternLike]:
    if isinstance(patterns, (list, tuple)):
        if not patterns:
            raise ValueError("expect() needs at least one pattern")
        return list(patterns)
    return [patterns]  # type: ignore[list-item]


_ESCAPES = {0x09: "\\t", 0x0D: "\\r", 0x1B: "\\e", 0x5C: "\\\\"}


def printable(data: bytes) -> str:
    """*data* as readable text: UTF-8 where it decodes; undecodable bytes and control
    characters other than newline escaped (\\r, \\t, \\e, \\\\, \\xNN)."""
    out = []
    for ch in data.decode("utf-8", "surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append("\\x%02x" % (code - 0xDC00))
        elif code in _ESCAPES:
            out.append(_ESCAPES[code])
        elif ch == "\n" or (code >= 0x20 and code != 0x7F):
            out.append(ch)
        else:
            out.append("\\x%02x" % code)
    return "".join(out)


def describe_output(data: bytes, limit: int = ERROR_TAIL) -> str:
    """The last *limit* bytes of *data*, one indented escaped line per output line."""
    if not data:
        return "  (nothing)"
    tail = data[-limit:]
    head = "  (last %d of %d bytes)\n" % (len(tail), len(data)) if len(data) > limit else ""
    lines = printable(tail).split("\n")
    return head + "\n".join("  | " + line for line in lines)


# What may follow a prompt that is "at the end of the output": terminal control
# sequences (busybox's shell asks for the cursor position, ESC [ 6 n, after its prompt).
_TRAILER = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


class Expecter:
    """The I/O-free core: feed it received bytes, ask it to find patterns."""

    def __init__(self, name: str = "stream", encoding: str = "utf-8",
                 log: Optional[BinaryIO] = None):
        self.name = name
        self.encoding = encoding
        self.log = log
        self.buffer = bytearray()      # received, not consumed by a match or a read yet
        self._transcript = bytearray()  # everything received (the newest TRANSCRIPT_LIMIT)
        self.transcript_dropped = 0
        self.received = 0
        self.eof = False
        self.before = b""
        self.after = b""
        self.match: Optional[Any] = None
        self.match_index = -1

    @property
    def transcript(self) -> bytes:
        return bytes(self._transcript)

    def compile(self, patterns: Patterns) -> List[Pattern]:
        return [compile_pattern(p, self.encoding) for p in _as_list(patterns)]

    def feed(self, data: bytes) -> None:
        if not data:
            self.eof = True
            return
        self.received += len(data)
        self.buffer += data
        if len(self.buffer) > SEARCH_LIMIT:
            del self.buffer[: len(self.buffer) - SEARCH_LIMIT]
        self._transcript += data
        if len(self._transcript) > TRANSCRIPT_LIMIT:
            cut = len(self._transcript) - TRANSCRIPT_LIMIT
            del self._transcript[:cut]
            self.transcript_dropped += cut
        if self.log is not None:
            self.log.write(data)
            self.log.flush()

    def search(self, compiled: Sequence[Pattern]) -> Optional[Any]:
        """The earliest match in the buffer; consumes through its end and sets
        before/after/match/match_index. None if nothing matches yet."""
        data = bytes(self.buffer)  # a match must not see the buffer change under it
        best = None
        best_index = -1
        for i, regex in enumerate(compiled):
            m = regex.search(data)
            if m is not None and (best is None or m.start() < best.start()):
                best, best_index = m, i
        if best is None:
            return None
        self._consume(best, best_index)
        return best

    def search_last(self, compiled: Sequence[Pattern], window: int = 4096) -> Optional[Any]:
        """The match that ends latest in the last *window* bytes, if nothing but
        whitespace and terminal control sequences follow it ("the output now ends
        with this prompt"). Consumes through it."""
        base = max(0, len(self.buffer) - window)
        view = bytes(self.buffer[base:])
        best = None
        best_index = -1
        for i, regex in enumerate(compiled):
            for m in regex.finditer(view):
                if best is None or m.end() > best.end():
                    best, best_index = m, i
        if best is None or _TRAILER.sub(b"", view[best.end():]).strip():
            return None
        found = compiled[best_index].search(bytes(self.buffer), base + best.start())
        assert found is not None  # finditer just found it in this very buffer
        self._consume(found, best_index)
        return found

    def _consume(self, m: Any, index: int) -> None:
        self.before = m.string[: m.start()]
        self.after = m.group(0)
        self.match = m
        self.match_index = index
        del self.buffer[: m.end()]

    def take(self, max_bytes: int) -> bytes:
        """Up to max_bytes of the unconsumed buffer."""
        out = bytes(self.buffer[:max_bytes])
        del self.buffer[:max_bytes]
        return out

    def discard(self) -> bytes:
        return self.take(len(self.buffer))

    def failure(self, kind: type, compiled: Sequence[Pattern], why: str) -> ExpectError:
        wanted = " or ".join(_show(r) for r in compiled)
        seen = self.transcript
        message = "%s: %s %s; the last output seen:\n%s" % (
            self.name, why, wanted, describe_output(seen))
        return kind(message, seen[-ERROR_TAIL:])


def _show(regex: Pattern) -> str:
    literal = re.sub(rb"\\(.)", rb"\1", regex.pattern)
    if re.escape(literal) == regex.pattern:
        return repr(literal)
    return "re.compile(%r)" % (regex.pattern,)


def _encode(data: Union[str, bytes, bytearray], encoding: str) -> bytes:
    return data.encode(encoding) if isinstance(data, str) else bytes(data)


class AsyncExpect:
    """Expect methods over an async byte stream (a vproxy.net.session.Stream or alike).

    *newline* is what `sendline` appends: ``"\\r"`` for a console (what the Enter key
    sends to a terminal), ``"\\n"`` for a guest channel. *timeout* is the default for
    every wait.
    """

    def __init__(self, stream: Any, *, name: str = "stream", newline: str = "\n",
                 encoding: str = "utf-8", timeout: float = 30.0,
                 log: Optional[BinaryIO] = None):
        self.stream = stream
        self.newline = newline
        self.timeout = timeout
        self.prompt: Optional[Patterns] = None  # set by login(); run()'s default
        self._x = Expecter(name, encoding, log)

    # -- what was seen ----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._x.name

    @property
    def transcript(self) -> bytes:
        """Everything received so far (the newest TRANSCRIPT_LIMIT bytes)."""
        return self._x.transcript

    @property
    def before(self) -> bytes:
        return self._x.before

    @property
    def after(self) -> bytes:
        return self._x.after

    @property
    def match(self) -> Optional[Any]:
        return self._x.match

    @property
    def match_index(self) -> int:
        return self._x.match_index

    @property
    def eof(self) -> bool:
        return self._x.eof and not self._x.buffer

    # -- raw I/O ----------------------------------------------------------------------

    async def _check_input(self) -> None:
        """Hook: wait until input can be sent, or raise (a read-only console)."""

    def _on_data(self) -> None:
        """Hook: called after each read from the stream (notices, offsets)."""

    async def _fill(self, timeout: Optional[float]) -> bool:
        """Read one chunk into the buffer; False on timeout. Feeds b"" at EOF."""
        if self._x.eof:
            return True
        try:
            if timeout is None:
                data = await self.stream.read()
            else:
                data = await asyncio.wait_for(self.stream.read(), max(timeout, 0))
        except asyncio.TimeoutError:
            return False
        self._x.feed(data)
        self._on_data()
        return True

    async def read(self, max_bytes: int = 65536, timeout: Optional[float] = None) -> bytes:
        """Up to max_bytes: what expect() left over first, else the next chunk.
        b"" at end of stream; ExpectTimeout after *timeout* seconds (None: no limit)."""
        if not self._x.buffer and not self._x.eof:
            if not await self._fill(timeout):
                raise ExpectTimeout("%s: nothing received within %.1f s" % (self.name, timeout or 0))
        return self._x.take(max_bytes)

    async def write(self, data: Union[bytes, bytearray, str]) -> None:
        await self._check_input()
        await self.stream.write(_encode(data, self._x.encoding))

    send = write

    async def sendline(self, line: Union[str, bytes] = "") -> None:
        """Send *line* and the newline (see the class doc) in one write."""
        await self.write(_encode(line, self._x.encoding) + self.newline.encode())

    # -- expect -----------------------------------------------------------------------

    async def expect(self, patterns: Patterns, timeout: Optional[float] = None) -> Any:
        """Wait for the first of *patterns*; returns the match (a bytes re.Match)."""
        compiled = self._x.compile(patterns)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            m = self._x.search(compiled)
            if m is not None:
                return m
            if self._x.eof:
                raise self._x.failure(ExpectEOF, compiled, "the stream ended before")
            left = deadline - time.monotonic()
            if left <= 0 or not await self._fill(left):
                raise self._x.failure(ExpectTimeout, compiled, "waited %.1f s for" % timeout)

    async def read_until(self, pattern: PatternLike, timeout: Optional[float] = None) -> bytes:
        """Everything up to and including *pattern*."""
        await self.expect(pattern, timeout)
        return self.before + self.after

    def discard(self) -> bytes:
        """Drop (and return) output received but not consumed yet."""
        return self._x.discard()

    # -- shell conveniences -----------------------------------------------------------

    async def _wait_for_prompt(self, compiled: Sequence[Pattern], deadline: float,
                               nudge: float) -> Any:
        """Until the output ends with one of *compiled*; send a newline whenever the
        stream has been quiet for *nudge* seconds without that."""
        while True:
            m = self._x.search_last(compiled)
            if m is not None:
                return m
            if self._x.eof:
                raise self._x.failure(ExpectEOF, compiled, "the stream ended before")
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._x.failure(ExpectTimeout, compiled, "waited for")
            if not await self._fill(min(nudge, left)):
                if time.monotonic() < deadline:
                    await self.sendline()  # a fresh prompt, please
                    nudge = min(nudge * 2, 10.0)  # each press may queue up in a booting guest

    async def login(self, user: str = "root", password: Optional[str] = None, *,
                    prompt: Patterns = DEFAULT_PROMPT,
                    login_prompt: Patterns = DEFAULT_LOGIN_PROMPT,
                    password_prompt: Patterns = DEFAULT_PASSWORD_PROMPT,
                    timeout: Optional[float] = None, nudge: float = 1.0) -> None:
        """Log in on a console: wait until the output ends with the login prompt (or
        already with the shell prompt: then nothing to do), pressing Enter whenever it
        stays quiet for *nudge* seconds (doubling each time, up to 10 s); send *user*,
        the *password* if asked, and wait for the shell *prompt*. Remembers *prompt*
        for `run`.

        Raises LoginFailed if the login prompt keeps coming back (LOGIN_ATTEMPTS times:
        Enter pressed while a guest boots can queue up and answer a prompt with an empty
        name), comes back after the password, or a password is asked for and none was
        given; ExpectTimeout after *timeout* (default: the stream's)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        shell = self._x.compile(prompt)
        login = self._x.compile(login_prompt)
        secret = self._x.compile(password_prompt)
        self.prompt = prompt
        await self._wait_for_prompt(shell + login, deadline, nudge)
        if self._x.match_index < len(shell):
            return  # already logged in
        for attempt in range(1, LOGIN_ATTEMPTS + 1):
            await self.sendline(user)
            await self.expect(shell + secret + login, max(0.0, deadline - time.monotonic()))
            index = self._x.match_index
            if index < len(shell):
                return
            if index < len(shell) + len(secret):
                break  # a password prompt
            # The login prompt came straight back: Enter pressed while the guest was not
            # listening yet may have answered it with an empty name. Try again.
            if attempt == LOGIN_ATTEMPTS:
                raise self._x.failure(LoginFailed, login, "login as %r failed %d times: saw again"
                                      % (user, attempt))
        if password is None:
            raise self._x.failure(LoginFailed, secret, "login as %r wants a password (none given):"
                                  " saw" % user)
        await self.sendline(password)
        await self.expect(shell + login, max(0.0, deadline - time.monotonic()))
        if self._x.match_index >= len(shell):
            raise self._x.failure(LoginFailed, login, "login as %r failed (wrong password?): "
                                  "saw again" % user)

    async def run(self, command: str, *, prompt: Optional[Patterns] = None,
                  timeout: Optional[float] = None) -> str:
        """Run a shell command: drop unread output, send *command*, wait for the
        *prompt* (default: the one given to `login`) and return the output between
        the echoed command line and the prompt as text (CRLF turned into LF, without
        the final newline)."""
        prompt = prompt if prompt is not None else self.prompt
        if prompt is None:
            raise ValueError("run() needs the shell prompt: pass prompt=..., or call login() first")
        self._x.discard()
        await self.sendline(command)
        await self.expect(prompt, timeout)
        out = self._x.before
        echo = out.find(_encode(command, self._x.encoding))
        start = out.find(b"\n", echo if echo >= 0 else 0)
        out = out[start + 1:] if start >= 0 else b""
        text = out.decode(self._x.encoding, "replace").replace("\r\n", "\n").replace("\r", "")
        return text[:-1] if text.endswith("\n") else text
