"""`vproxy console` without click: one attachment to a VM's serial console that
survives dropped connections and VM restarts.

What it does:
- Connects (vproxy.client.connect) and opens ``console`` or ``console:ID`` in mode ro,
  rw or force, with ``replay=N`` on the first attach. A refusal becomes a UserError
  carrying the agent's message (who holds the console, or the ACL's reason): exit 2.
- Interactive when stdin and stdout are terminals: raw mode (vproxy.client.terminal.RawMode),
  restored on every way out (return, exception, SIGTERM, SIGHUP, SIGINT), and escape
  commands (quit, help, force). Otherwise a plain pipe: stdin to the console, at
  EOF a half-close, then the console's output until the agent closes the stream (it
  lingers until the console has been quiet), exit 0.
- Keeps the offset of the next byte it has not printed: ACCEPT info ``start``, plus
  every byte printed (or deliberately skipped), plus the bytes a "lost" NOTICE jumped
  over. When the stream is reset (CHANNEL_GONE: the VM went away) or the session
  ends, it reopens with ``offset=`` that offset: no byte is printed twice or missed.
  If the console's ``epoch`` changed (a new agent: offsets began anew) it reopens with
  ``replay=all`` instead and says so. Retries back off from RETRY_FIRST to RETRY_MAX
  seconds: forever when interactive (the escape command quits), for at most
  PIPE_GIVE_UP seconds in a pipe (then exit 3).
- Status lines go to stderr, one line each: attached, writer changed, bytes lost,
  input dropped on a read-only console, connection lost, reconnected.
- Input typed while disconnected is dropped (and the user told once); in a pipe,
  stdin is not read while disconnected, so piped input waits instead.
"""

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Dict, List, Optional, Tuple

from . import terminal
from .connection import AgentClient, connect
from vproxy.errors import ChannelRefused, SessionClosed, StreamResetError, UserError
from vproxy.mux import RefuseCode, ResetCode
from vproxy.net.session import Stream
from vproxy.net.tasks import Nursery

log = logging.getLogger("vproxy.console")

#: Bytes of history shown on attaching at a terminal (about two screens of text);
#: in a pipe the default is 0, so that the output is only the answer to the input.
DEFAULT_REPLAY_TTY = 4096
RETRY_FIRST = 0.25
RETRY_MAX = 2.0
PIPE_GIVE_UP = 60.0
EXIT_GAVE_UP = 3

#: Refusals that retrying will not cure: give up at once.
FATAL_REFUSALS = (RefuseCode.FORBIDDEN, RefuseCode.BAD_REQUEST)
_STREAM_ERRORS = (StreamResetError, SessionClosed, ConnectionError)
_EOF = object()  # end of stdin, queued for the stream's half-close


def parse_replay(text: Optional[str]) -> Optional[str]:
    """None, "all" or a non-negative integer (as text); else UserError."""
    if text is None:
        return None
    value = text.strip().lower()
    if value == "all" or value.isdigit():
        return value if value == "all" else str(int(value))
    raise UserError("--replay %r: expected a number of bytes or all" % text,
                    hint="e.g. --replay 0 (no history), --replay 65536, --replay all")


@dataclass
class ConsoleSettings:
    address: str
    vm: str
    console: Optional[str] = None  # chardev id or serialN; None: the VM's first console
    tls: Dict[str, Optional[str]] = field(default_factory=dict)  # cert, key, ca, crl
    mode: str = "rw"  # ro, rw or force
    replay: Optional[str] = None  # N or "all"; None: DEFAULT_REPLAY_TTY, or 0 in a pipe
    escape: Optional[int] = 0x1D  # ^]; None: no escape character
    interactive: Optional[bool] = None  # None: stdin and stdout are both terminals
    server_name: Optional[str] = None  # TLS name of the agent; None: the host of address
    #: makes a new session (for each reconnection); None: connect(address, **tls)
    connector: Optional[Callable[[], Awaitable[AgentClient]]] = None

    @property
    def channel(self) -> str:
        return "console:%s" % self.console if self.console else "console"


class ConsoleClient:
    """One `vproxy console` run: `await ConsoleClient(settings).run()` -> exit code.
    Make it inside the running event loop (it creates asyncio queues and events)."""

    def __init__(self, settings: ConsoleSettings, stdin_fd: int = 0,
                 output: Optional[terminal.Output] = None):
        self.settings = settings
        self.stdin_fd = stdin_fd
        self.out = output or terminal.Output()
        self.interactive = (terminal.stdio_interactive() if settings.interactive is None
                            else settings.interactive)
        replay = settings.replay
        if replay is None:
            replay = str(DEFAULT_REPLAY_TTY) if self.interactive else "0"
        self.replay = replay
        self.escape = settings.escape if self.interactive else None
        self._client: Optional[AgentClient] = None
        self._stream: Optional[Stream] = None
        self._pos = 0  # offset of the next byte not printed yet
        self._start = 0  # ACCEPT info start of the current stream
        self._epoch: Optional[str] = None
        self._mode = ""  # our role now: "rw" (the writer) or "ro"
        self._writer = ""  # who writes (an identity), "" for nobody
        self._forced = False  # we hold the writer role by force (reclaim it on reconnect)
        self._force_pending = False  # ^]f while away or not yet carried out
        self._trim = 0  # history bytes still to hold back before cutting to a line start
        self._held = bytearray()
        self._stdin_eof = False
        self._told_dropped = False
        self._queue: "asyncio.Queue[object]" = asyncio.Queue(0 if self.interactive else 64)
        self._connected = asyncio.Event()
        self._force_event = asyncio.Event()
        self._done: "Optional[asyncio.Future[int]]" = None
        self._error: Optional[UserError] = None
        self._farewell = ""
        self._crash: Optional[BaseException] = None

    # ------------------------------------------------------------------ the whole run

    async def run(self) -> int:
        loop = asyncio.get_event_loop()
        self._done = loop.create_future()
        try:
            stream, _ = await self._attach(resume=False)
        except BaseException as e:
            await self._close_client()
            if isinstance(e, ChannelRefused):
                hint = ""
                if e.code == RefuseCode.FORBIDDEN and self.settings.mode != "ro":
                    hint = "if you may only watch, try --read-only"
                raise UserError(e.message, hint=hint) from None
            if isinstance(e, SessionClosed):
                raise UserError("the session to %s ended: %s" % (self.settings.address, e.reason),
                                exit_code=EXIT_GAVE_UP) from None
            raise
        self._adopt(stream, first=True)
        raw = terminal.RawMode(self.stdin_fd) if self.interactive else None
        handled = self._install_signals(loop, raw)
        tasks: List["asyncio.Task[None]"] = []
        try:
            if raw is not None:
                raw.enter()
                self.out.raw = True
            if self.interactive:
                esc = terminal.describe_escape(self.escape)
                self.out.status("connected to %s (%s); %s" % (
                    self._what(), self._role(),
                    "escape character is %s (%s? for help)" % (esc, esc)
                    if self.escape is not None else "no escape character"))
            tasks = [loop.create_task(self._stdin_loop()),
                     loop.create_task(self._connection_loop())]
            for task in tasks:
                task.add_done_callback(self._task_ended)
            code = await self._done
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if raw is not None:
                raw.restore()
                self.out.raw = False
            for sig in handled:
                loop.remove_signal_handler(sig)
            await self._close_client()
        if self._farewell:
            self.out.status(self._farewell)
        if self._crash is not None:
            raise self._crash
        if self._error is not None:
            raise self._error
        return code

    def _task_ended(self, task: "asyncio.Task[None]") -> None:
        if not task.cancelled() and task.exception() is not None:
            self._crash = task.exception()  # a bug: re-raised once the terminal is restored
            self._finish(1)

    def _finish(self, code: int, farewell: str = "", error: Optional[UserError] = None) -> None:
        if self._done is not None and not self._done.done():
            self._farewell = farewell
            self._error = error
            self._done.set_result(code)

    def _install_signals(self, loop: asyncio.AbstractEventLoop,
                         raw: Optional[terminal.RawMode]) -> List[int]:
        handled: List[int] = []
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                handled.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        if raw is not None:
            try:  # a shell may reset the terminal while we were stopped
                loop.add_signal_handler(signal.SIGCONT, raw.reapply)
                handled.append(signal.SIGCONT)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        return handled

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        farewell = "interrupted" if sig == signal.SIGINT else "%s received; disconnected" % name
        self._finish(128 + sig, farewell)

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.close(), 2.0)
            except Exception:  # closing is best effort: we are leaving anyway
                pass

    # ------------------------------------------------------------------ attaching

    async def _ensure_client(self) -> AgentClient:
        client = self._client
        if client is not None and not client.session.closed.done():
            return client
        self._client = None
        s = self.settings
        if s.connector is not None:
            self._client = await s.connector()
        else:
            self._client = await connect(s.address, s.tls.get("cert") or "",
                                         s.tls.get("key") or "", s.tls.get("ca") or "",
                                         s.tls.get("crl"), server_name=s.server_name)
        return self._client

    def _open_mode(self, first: bool) -> str:
        wanted = self.settings.mode
        if wanted == "ro":
            return "ro"
        if self._force_pending or (first and wanted == "force"):
            return "force"
        if self._forced and self._mode == "rw":
            return "force"  # we held the role by force when the connection dropped
        return "rw"

    async def _attach(self, resume: bool, mode: Optional[str] = None) -> Tuple[Stream, bool]:
        """Open the console; -> (stream, history_restarted). resume: from self._pos."""
        client = await self._ensure_client()
        s = self.settings
        mode = mode or self._open_mode(first=not resume)
        if resume:
            options = {"offset": str(self._pos)}
        else:
            options = {"replay": self.replay} if self.replay != "0" else {}
        try:
            stream = await client.open(s.vm, s.channel, mode, options)
        except ChannelRefused as e:
            if not (resume and e.code == RefuseCode.BAD_REQUEST):
                raise
            # offset beyond the console's end: its offsets began anew (a new agent)
            stream = await client.open(s.vm, s.channel, mode, {"replay": "all"})
            return stream, True
        if resume and stream.info.get("epoch") != self._epoch:
            stream.reset(ResetCode.CANCEL, "the console's offsets began anew")
            stream = await client.open(s.vm, s.channel, mode, {"replay": "all"})
            return stream, True
        return stream, False

    def _adopt(self, stream: Stream, first: bool = False) -> None:
        info = stream.info
        self._stream = stream
        self._start = self._pos = _int(info.get("start"))
        self._epoch = info.get("epoch")
        self._mode = info.get("mode", "ro")
        self._writer = info.get("writer", "")
        if stream.request.mode == "force":
            self._force_pending = False
            self._forced = self._mode == "rw"
        self._held = bytearray()
        self._trim = 0
        end = _int(info.get("offset"), self._start)
        if first and self.replay != "all" and self._start > 0 and end > self._start:
            self._trim = end - self._start  # cut the history to a line start
        if self._stdin_eof:
            self._queue.put_nowait(_EOF)  # the new stream must be half-closed too
        self._told_dropped = False
        self._connected.set()

    def _what(self) -> str:
        s = self.settings
        cid = (self._stream.info.get("console") if self._stream is not None else None) or s.console
        return "console %s of %s at %s" % (cid or "?", s.vm, s.address)

    def _role(self) -> str:
        if self._mode == "rw":
            return "the writer, by force" if self._forced else "the writer"
        if self.settings.mode == "ro":
            return "read-only: %s is writing" % self._writer if self._writer else "read-only"
        if self._writer:
            return "read-only: %s is writing%s" % (self._writer, self._force_hint())
        return "read-only"

    def _force_hint(self, what: str = "takes over") -> str:
        if self.escape is None:
            return ""
        return "; %sf %s" % (terminal.describe_escape(self.escape), what)

    # ------------------------------------------------------------------ the stream

    async def _connection_loop(self) -> None:
        while True:
            stream = self._stream
            assert stream is not None
            async with Nursery() as children:
                pump = children.start(self._pump(stream))
                children.start(self._force_event.wait())
                await children.wait_any()
            if pump.cancelled():  # ^]f: reopen this console in mode force
                self._force_event.clear()
                await self._take_over(stream)
                continue
            outcome, error = pump.result()
            if outcome == "eof":
                self._finish(0, "the agent closed the console" if self.interactive else "")
                return
            if outcome == "output":
                self._finish(0)  # stdout is gone (e.g. `| head`): nobody to print for
                return
            if not await self._reconnect(error):
                return

    async def _pump(self, stream: Stream) -> Tuple[str, Optional[Exception]]:
        """Print the stream's output until it ends: ("eof"|"error"|"output", error)."""
        try:
            async with Nursery() as children:
                children.start(self._notice_loop(stream))
                children.start(self._input_loop(stream))
                return await self._print_all(stream)
        finally:
            for fields in stream.pending_notices():
                self._on_notice(fields)

    async def _print_all(self, stream: Stream) -> Tuple[str, Optional[Exception]]:
        """The pump's own loop, beside the notice and input loops."""
        try:
            while True:
                data = await stream.read()
                if not data:
                    return "eof", None
                try:
                    await self._print(data)
                except OSError as e:
                    return "output", e
        except _STREAM_ERRORS as e:
            return "error", e

    async def _print(self, data: bytes) -> None:
        if self._trim:
            self._held += data
            if len(self._held) < self._trim:
                return
            history, rest = bytes(self._held[:self._trim]), bytes(self._held[self._trim:])
            cut = history.find(b"\n") + 1
            self._held, self._trim = bytearray(), 0
            await self.out.write(history[cut:] + rest)
            self._pos += len(history) + len(rest)
            return
        await self.out.write(data)
        self._pos += len(data)

    async def _notice_loop(self, stream: Stream) -> None:
        try:
            while True:
                self._on_notice(await stream.next_notice())
        except _STREAM_ERRORS:
            return

    def _on_notice(self, fields: Dict[str, str]) -> None:
        event = fields.get("event")
        if event == "writer-changed":
            was, self._mode = self._mode, fields.get("mode", "ro")
            self._writer = fields.get("writer", "")
            if self._mode == "rw":
                if was != "rw":
                    self.out.status("you are now the writer")
                return
            self._forced = False  # taken from us: do not take it back by ourselves
            if self._stdin_eof:
                return  # we let go of the role ourselves (half-close): nothing to report
            if was == "rw" and not self._writer:
                self.out.status("you are no longer the writer; nobody is writing now")
            elif was == "rw":
                self.out.status("%s took over the console; you are read-only now%s" % (
                    self._writer, self._force_hint("takes it back")))
            elif self._writer:
                self.out.status("%s is now the writer" % self._writer)
            else:
                self.out.status("nobody is writing now")
        elif event == "lost":
            lost, offset = _int(fields.get("bytes")), _int(fields.get("offset"))
            if offset <= self._start:
                return  # at open: already in `start`, and said when reconnecting
            self._pos += lost  # a jump inside this stream: this viewer fell behind
            self.out.status("%d bytes of console output were lost: this viewer fell behind "
                            "the agent's history" % lost)
        elif event == "read-only":
            writer = fields.get("writer", "")
            if self.settings.mode == "ro":
                self.out.status("read-only (--read-only): your input was dropped")
            else:
                self.out.status("read-only: your input was dropped (%s%s)" % (
                    "%s is writing" % writer if writer else "nobody is writing",
                    self._force_hint()))
        else:
            log.debug("console notice %r ignored", fields)

    # ------------------------------------------------------------------ input

    async def _stdin_loop(self) -> None:
        reader = terminal.StdinReader(self.stdin_fd)
        parser = terminal.EscapeParser(self.escape)
        while True:
            if not self.interactive:
                await self._connected.wait()  # in a pipe, input waits while we are away
            data = await reader.read()
            if not data:
                if self.interactive:
                    self._finish(0, "the terminal closed")
                else:
                    self._stdin_eof = True
                    await self._queue.put(_EOF)
                return
            for item in parser.feed(data):
                if item == terminal.QUIT:
                    self._finish(0, "disconnected from %s" % self._what())
                    return
                if item == terminal.HELP:
                    self._show_help()
                elif item == terminal.FORCE:
                    self._request_force()
                elif isinstance(item, bytes):
                    await self._send(item)

    async def _send(self, data: bytes) -> None:
        if not self.interactive:
            await self._queue.put(data)
        elif self._stream is None:
            if not self._told_dropped:
                self._told_dropped = True
                self.out.status("not connected: input dropped")
        else:
            self._queue.put_nowait(data)

    async def _input_loop(self, stream: Stream) -> None:
        try:
            while True:
                item = await self._queue.get()
                if item is _EOF:
                    await stream.close()
                    return
                await stream.write(item)  # type: ignore[arg-type]
        except _STREAM_ERRORS:
            return

    def _show_help(self) -> None:
        if self._stream is None:
            state = "not connected to %s: reconnecting" % self._what()
        else:
            state = "connected to %s (%s)" % (self._what(), self._role())
        help_lines = ["  " + line for line in terminal.help_text(self.escape)]
        self.out.lines(["vproxy: " + state] + help_lines)

    def _request_force(self) -> None:
        if self.settings.mode == "ro":
            self.out.status("read-only (--read-only): cannot take the writer role")
        elif self._stream is None:
            self._force_pending = True
            self.out.status("will take the writer role once reconnected")
        elif self._mode == "rw":
            self.out.status("you are already the writer")
        else:
            self._force_pending = True
            self._force_event.set()

    async def _take_over(self, old: Stream) -> None:
        """Reopen in mode force from the next unprinted byte, then let the old stream go."""
        previous = self._writer
        try:
            stream, restarted = await self._attach(resume=True, mode="force")
        except ChannelRefused as e:
            self._force_pending = False
            self.out.status("cannot take the writer role: %s" % e.message)
            return
        except (SessionClosed, UserError, OSError, asyncio.TimeoutError):
            return  # the session is dying: the pump sees it and reconnects
        old.reset(ResetCode.CANCEL, "replaced by a stream in mode force")
        self._adopt(stream)
        if self._mode == "rw":
            self.out.status("you are now the writer%s" % (
                " (%s is read-only now)" % previous if previous else ""))
        if restarted:
            self.out.status("the console's history began anew meanwhile")

    # ------------------------------------------------------------------ reconnecting

    async def _reconnect(self, error: Optional[Exception]) -> bool:
        """Reattach with backoff; False when giving up (self._finish was called)."""
        loop = asyncio.get_event_loop()
        self._stream = None
        self._connected.clear()
        if self.interactive:
            _clear(self._queue)
        quits = ""
        if self.escape is not None:
            quits = " (%s. quits)" % terminal.describe_escape(self.escape)
        self.out.status("connection lost: %s; reconnecting%s" % (_describe(error), quits))
        began = loop.time()
        delay = RETRY_FIRST
        last = ""
        while True:
            try:
                stream, restarted = await self._attach(resume=True)
            except ChannelRefused as e:
                if e.code in FATAL_REFUSALS:
                    self._finish(2, error=UserError(e.message))
                    return False
                why = e.message
            except UserError as e:
                why = e.message
            except SessionClosed as e:
                why = e.reason
            except (OSError, asyncio.TimeoutError) as e:
                why = str(e) or type(e).__name__
            else:
                away, requested = loop.time() - began, self._pos
                self._adopt(stream)
                self._announce_resumed(away, restarted, requested)
                return True
            if why != last:
                self.out.status("still away: %s" % why)
                last = why
            if not self.interactive and loop.time() - began > PIPE_GIVE_UP:
                self._finish(EXIT_GAVE_UP, error=UserError(
                    "gave up reconnecting to %s after %.0f s: %s"
                    % (self.settings.address, PIPE_GIVE_UP, why), exit_code=EXIT_GAVE_UP))
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    def _announce_resumed(self, away: float, restarted: bool, requested: int) -> None:
        stream = self._stream
        assert stream is not None
        missed = _int(stream.info.get("offset"), self._start) - self._start
        lost = self._start - requested
        if restarted:
            detail = ("the console's history began anew (a new agent?), so output from "
                      "before it is lost; %d bytes it kept meanwhile follow" % missed)
        elif lost > 0:
            detail = ("%d bytes printed while away were lost (more than the agent keeps); "
                      "the %d bytes it kept follow" % (lost, missed))
        elif missed:
            detail = "%d bytes printed while away follow" % missed
        else:
            detail = "nothing was missed"
        self.out.status("reconnected after %.1f s (%s); %s" % (away, self._role(), detail))


def _int(text: Optional[str], default: int = 0) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _clear(queue: "asyncio.Queue[object]") -> None:
    while not queue.empty():
        queue.get_nowait()


def _describe(error: Optional[Exception]) -> str:
    if isinstance(error, StreamResetError):
        return error.message or "the console was reset"
    if isinstance(error, SessionClosed):
        return error.reason
    return str(error) if error is not None else "the stream ended"


async def run_console(settings: ConsoleSettings) -> int:
    """The `vproxy console` command: -> exit code (UserError for refusals and such)."""
    return await ConsoleClient(settings).run()


__all__ = ["ConsoleClient", "ConsoleSettings", "run_console", "parse_replay",
           "DEFAULT_REPLAY_TTY"]
