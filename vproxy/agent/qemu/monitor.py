"""One QMP connection per VM, kept for the life of the agent (`VMMonitor`).

Rules this module keeps:
- At most one `QMPClient` per VM at a time. A supervisor task connects, and when the
  connection drops it tells the owners (`MonitorOwner.on_lost`) and polls the socket
  path again with a backoff (50 ms doubling to 1 s) until a QEMU answers there, then
  tells the owners again (`on_connected`). A QMP socket serves one client at a time,
  so a socket that accepts but never greets is reported as busy, not waited on forever.
- No event ever queues up inside qemu.qmp: the library's default all-events listener
  is made to accept nothing (its queue and history would grow without bound), and one
  dispatching listener hands each event, synchronously, to the owners' `on_event`.
- fd passing is serialised by `fd_lock`: ONE fd is in flight (SCM_RIGHTS + ``getfd``)
  until the command that consumes its name has replied, because QEMU loses fds sent
  back to back. `execute_with_fd` does the whole dance and closes the name in
  QEMU if the consuming command fails.
- With `resume_prelaunch` (the agent's ``resume_prelaunch`` setting, default off), a
  QEMU whose status is "prelaunch" once every owner's `on_connected` has finished (it
  was started with -S and never ran) gets ``cont``, on every (re)connection; `ready`
  is set after that. "paused" and "inmigrate" are never resumed; a failed ``cont`` is
  a warning.
- QMP failures become `VMGone` / `QMPCommandError` (vproxy.agent.qemu.errors), whose text is
  meant for the user.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp.protocol import Runstate

from .errors import QMPCommandError, VMGone

log = logging.getLogger("vproxy.qemu.monitor")

#: `VMMonitor.state` while no QEMU is connected.
ABSENT = "absent"

# Events after which the run state is asked again, and what some of them imply at once.
_STATUS_EVENTS = frozenset(
    ["STOP", "RESUME", "SHUTDOWN", "SUSPEND", "WAKEUP", "GUEST_PANICKED", "RESET"])
_IMPLIED_STATE = {"STOP": "paused", "RESUME": "running", "SUSPEND": "suspended",
                  "WAKEUP": "running", "GUEST_PANICKED": "guest-panicked"}

_fd_names = itertools.count(1)


class MonitorOwner:
    """Something that lives on a VM's QMP connection (consoles, guest channels, VNC).

    Hooks are called by the monitor's supervisor task, in registration order."""

    async def on_connected(self, monitor: "VMMonitor") -> None:
        """A QEMU answered (first time or after a restart); runs before `ready` is set."""

    def on_event(self, event: Dict[str, Any]) -> None:
        """A QMP event (``{"event": NAME, "data": {...}, ...}``); must not block."""

    def on_lost(self, reason: str) -> None:
        """The QEMU went away; *reason* is a sentence for users ("VM x went away ...")."""


class _Dispatcher(EventListener):
    """An EventListener that keeps nothing: each event goes straight to a callback."""

    def __init__(self, callback: Callable[[Dict[str, Any]], None]):
        super().__init__()
        self._callback = callback

    async def put(self, event: Any) -> None:  # called by QMPClient's reader task
        try:
            self._callback(event)
        except Exception:  # an owner's bug must not kill the QMP reader
            log.exception("event handler failed for %s", event.get("event"))


class VMMonitor:
    """The agent's QMP connection to one VM's QEMU, reconnecting across restarts."""

    def __init__(self, name: str, qmp_path: str, *, connect_timeout: float = 5.0,
                 min_backoff: float = 0.05, max_backoff: float = 1.0,
                 resume_prelaunch: bool = False):
        self.name = name
        self.qmp_path = str(qmp_path)
        self.connect_timeout = connect_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        #: Send ``cont`` to a QEMU found in "prelaunch" (started with -S, never run),
        #: once every owner's `on_connected` has finished (see `_resume_from_prelaunch`).
        self.resume_prelaunch = resume_prelaunch
        #: "absent" while no QEMU is connected, else QEMU's run state from
        #: query-status ("running", "paused", "prelaunch", "shutdown", ...).
        self.state = ABSENT
        #: Why the last connection attempt failed (for `vproxy ls`), "" if none.
        self.last_error = ""
        self._owners: List[MonitorOwner] = []
        self._client: Optional[QMPClient] = None
        self._task: Optional[asyncio.Task] = None
        self._ready: Optional[asyncio.Event] = None
        self._status_task: Optional[asyncio.Task] = None
        self._state_gen = 0  # counts status events, so a stale query-status is dropped
        self._shutdown_reason = ""
        self._fd_lock: Optional[asyncio.Lock] = None
        self._warned_busy = False
        self._stopping = ""  # why stop() was called, while it runs

    def __repr__(self) -> str:
        return "<VMMonitor %s %s %s>" % (self.name, self.qmp_path, self.state)

    # ------------------------------------------------------------------ life cycle

    def add_owner(self, owner: MonitorOwner) -> None:
        self._owners.append(owner)

    def remove_owner(self, owner: MonitorOwner) -> None:
        if owner in self._owners:
            self._owners.remove(owner)

    @property
    def fd_lock(self) -> asyncio.Lock:
        """Held from sending an fd until the command that consumes it has replied."""
        if self._fd_lock is None:
            self._fd_lock = asyncio.Lock()
        return self._fd_lock

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    @property
    def ready(self) -> bool:
        """Connected and every owner's `on_connected` has finished."""
        return self.connected and self._ready is not None and self._ready.is_set()

    def start(self) -> None:
        """Start the supervisor task (connect now, reconnect whenever QEMU comes back)."""
        if self._task is None:
            self._stopping = ""
            self._ready = asyncio.Event()
            self._task = asyncio.ensure_future(self._supervise())

    async def stop(self, reason: str = "") -> None:
        """Stop supervising and drop the QMP connection (QEMU keeps running). Owners
        hear `on_lost(reason)` (default: the agent is shutting down)."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = reason or ("VM %s is no longer served: the agent is shutting "
                                        "down" % self.name)
            # On Python < 3.12 asyncio.wait_for can swallow a cancellation that lands
            # as the awaited connect() fails (bpo-42130); the supervisor also checks
            # _stopping, and a cancellation that got lost is sent again.
            task.cancel()
            while not task.done():
                await asyncio.wait([task], timeout=1.0)
                if not task.done():
                    task.cancel()
        if self._status_task is not None:
            self._status_task.cancel()
        await self._drop_client()
        self.state = ABSENT

    async def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Wait until connected and set up; False on timeout."""
        if self._ready is None:
            return False
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return self.ready

    def not_running_message(self) -> str:
        msg = "VM %s is not running (no QEMU answers on %s)" % (self.name, self.qmp_path)
        if self.last_error:
            msg += ": " + self.last_error
        return msg

    def gone_message(self) -> str:
        if self._stopping:
            return self._stopping
        if self._shutdown_reason:
            return "VM %s went away (QEMU shut down: %s)" % (self.name, self._shutdown_reason)
        return "VM %s went away (QEMU exited)" % self.name

    # ------------------------------------------------------------------ commands

    async def execute(self, cmd: str, args: Optional[Dict[str, Any]] = None) -> Any:
        """Run one QMP command; raises `VMGone` or `QMPCommandError`."""
        client = self._client
        if client is None or client.runstate != Runstate.RUNNING:
            raise VMGone(self.name, self.not_running_message())
        try:
            return await client.execute(cmd, args)
        except ExecuteError as e:
            raise QMPCommandError(self.name, cmd, args, e.error_class, str(e)) from None
        except ExecInterruptedError:
            raise VMGone(self.name, self.gone_message()) from None
        except Exception as e:  # StateError and friends: the connection is going down
            if client.runstate != Runstate.RUNNING:
                raise VMGone(self.name, self.gone_message()) from e
            raise

    async def is_alive(self, timeout: float = 2.0) -> bool:
        """Does the QEMU still answer? (A channel whose socket hit EOF asks this to tell
        "QEMU exited" from "QEMU closed this one connection".)"""
        try:
            await asyncio.wait_for(self.execute("query-status"), timeout)
        except (VMGone, asyncio.TimeoutError):
            return False
        except QMPCommandError:
            return True
        return True

    async def pass_fd(self, fd: int, fdname: str) -> None:
        """Send *fd* to QEMU and name it *fdname* (``getfd``). QEMU gets its own copy;
        the caller still owns *fd*. Hold `fd_lock` until the command consuming
        *fdname* has replied (or use `execute_with_fd`)."""
        client = self._client
        if client is None or client.runstate != Runstate.RUNNING:
            raise VMGone(self.name, self.not_running_message())
        try:
            client.send_fd_scm(fd)
        except Exception as e:
            raise VMGone(self.name, self.gone_message()) from e
        await self.execute("getfd", {"fdname": fdname})

    async def execute_with_fd(self, fd: int, cmd: str,
                              make_args: Callable[[str], Dict[str, Any]]) -> Any:
        """Pass *fd* under a fresh name, then run *cmd* with ``make_args(name)``, all
        under `fd_lock`. If *cmd* fails, the name is closed in QEMU (no leaked fd)."""
        fdname = "vproxy%d" % next(_fd_names)
        async with self.fd_lock:
            await self.pass_fd(fd, fdname)
            try:
                return await self.execute(cmd, make_args(fdname))
            except QMPCommandError:
                try:
                    await self.execute("closefd", {"fdname": fdname})
                except QMPCommandError:
                    pass  # consumed after all
                raise

    # ------------------------------------------------------------------ supervisor

    async def _supervise(self) -> None:
        backoff = self.min_backoff
        while not self._stopping:
            if not await self._connect():
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = self.min_backoff
            client = self._client
            assert client is not None
            try:
                await self._refresh_status()
                for owner in list(self._owners):
                    try:
                        await owner.on_connected(self)
                    except Exception:
                        if not self.connected:
                            break
                        log.exception("VM %s: setting up %r failed", self.name, owner)
                if self.connected:
                    log.info("VM %s: QMP connected (%s)", self.name, self.state)
                    if self.resume_prelaunch:
                        await self._resume_from_prelaunch()
                    if self.connected:  # still, after the cont
                        assert self._ready is not None
                        self._ready.set()
                while client.runstate == Runstate.RUNNING:
                    await client.runstate_changed()
            finally:
                # Also on cancellation (stop()): owners must hear that QEMU is gone.
                # They hear it first: nothing here may be skipped by a cancellation.
                if self._ready is not None:
                    self._ready.clear()
                self.state = ABSENT
                reason = self.gone_message()
                log.info("VM %s: %s", self.name, reason)
                for owner in list(self._owners):
                    try:
                        owner.on_lost(reason)
                    except Exception:
                        log.exception("VM %s: %r.on_lost failed", self.name, owner)
                await self._drop_client()

    async def _resume_from_prelaunch(self) -> None:
        """``cont`` if QEMU is in "prelaunch" (started with -S and never run): the
        owners have taken over what they need (consoles), so nothing the guest prints
        from its first instruction on is lost. "paused" (someone stopped it) and
        "inmigrate" (an incoming migration) are left alone. Failures are warnings."""
        try:
            status = await self.execute("query-status")
            if str(status.get("status")) != "prelaunch":
                return
            await self.execute("cont")
        except (VMGone, QMPCommandError) as e:
            log.warning("VM %s: could not resume it from prelaunch: %s", self.name, e)
        except Exception as e:  # never let this kill the supervisor
            log.warning("VM %s: could not resume it from prelaunch: %r", self.name, e)
        else:
            log.info("VM %s: resumed from prelaunch after taking over its consoles", self.name)

    async def _connect(self) -> bool:
        client = QMPClient(self.name)
        client.logger, noise = _qmp_logger(self.name)
        # qemu.qmp's default listener queues every event forever: make it take none.
        client.events.accept = lambda event: False  # type: ignore[method-assign]
        client.register_listener(_Dispatcher(self._on_event))
        noise.connecting = True
        try:
            await asyncio.wait_for(client.connect(self.qmp_path), self.connect_timeout)
        except asyncio.TimeoutError:
            self.last_error = ("the QMP socket accepts but does not answer: is another "
                               "client connected? (a QMP socket serves one at a time)")
            if not self._warned_busy:
                log.warning("VM %s: %s", self.name, self.last_error)
                self._warned_busy = True
        except Exception as e:  # ConnectError wrapping OSError/EOFError
            cause = getattr(e, "exc", e)
            self.last_error = str(cause) or type(cause).__name__
        else:
            self.last_error = ""
            self._warned_busy = False
            self._shutdown_reason = ""
            self._client = client
            return True
        finally:
            if self._client is not client:  # failed or cancelled
                await _quiet_disconnect(client)
            noise.connecting = False
        return False

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await _quiet_disconnect(client)

    # ------------------------------------------------------------------ events

    def _on_event(self, event: Dict[str, Any]) -> None:
        name = event.get("event", "")
        data = event.get("data") or {}
        if name == "SHUTDOWN":
            self._shutdown_reason = str(data.get("reason", "shutdown"))
        if name in _STATUS_EVENTS:
            self._state_gen += 1
            self.state = _IMPLIED_STATE.get(name, self.state)
            if self._status_task is None or self._status_task.done():
                self._status_task = asyncio.ensure_future(self._refresh_status())
        for owner in list(self._owners):
            try:
                owner.on_event(event)
            except Exception:
                log.exception("VM %s: %r.on_event failed", self.name, owner)

    async def _refresh_status(self) -> None:
        """Ask query-status; an answer overtaken by a status event is asked again."""
        while True:
            gen = self._state_gen
            try:
                status = await self.execute("query-status")
            except (VMGone, QMPCommandError):
                return
            if not self.connected:
                return
            if gen == self._state_gen:
                self.state = str(status.get("status", "unknown"))
                return


class _ConnectNoise(logging.Filter):
    """Drops qemu.qmp's error lines while a connection is being attempted: while a VM
    is down the supervisor retries every second, and `last_error` keeps the cause."""

    def __init__(self) -> None:
        super().__init__()
        self.connecting = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.connecting


def _qmp_logger(name: str) -> "Tuple[logging.Logger, _ConnectNoise]":
    logger = logging.getLogger("vproxy.qemu.qmp").getChild(name)
    for f in logger.filters:
        if isinstance(f, _ConnectNoise):
            return logger, f
    noise = _ConnectNoise()
    logger.addFilter(noise)
    return logger, noise


async def _quiet_disconnect(client: QMPClient) -> None:
    try:
        await client.disconnect()
    except Exception:  # the cause was already seen: EOF, reset, protocol error
        pass
