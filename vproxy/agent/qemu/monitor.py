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

Two modes, one API (`make_monitor` is the one place that picks the class):
- "exclusive" (`VMMonitor`, the default): the connection above, held for the life of
  the QEMU, events as they come. For sockets made for vproxy.
- "shared" (`SharedVMMonitor`, ``qmp = "shared"``): for a socket something else also
  uses (Proxmox's VMID.qmp, which qm and pvedaemon connect to for each command). Every
  `execute` is one short connection (connect, greeting, command, disconnect), and
  `execute_with_fd` one connection for getfd + the consuming command (an fd sent with
  SCM_RIGHTS belongs to the connection it came on). The agent's connections are
  serialised, so at most one of them waits on QEMU's backlog; another client waiting
  on the socket is served as soon as the current command has replied. What exclusive
  mode learns from events is polled every `SHARED_POLL_INTERVAL` seconds: the run
  state (query-status), QEMU gone or replaced (the socket refuses, or answers from a
  different process: SO_PEERCRED), and VSERPORT_CHANGE / DEVICE_DELETED, which the
  poller hands to the owners as if QEMU had sent them (from query-chardev's
  "frontend-open" and the QOM tree). A connection not greeted within `BUSY_NOTICE`
  seconds is logged as busy and waited on until ``connect_timeout``, then `QMPBusy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Set, Tuple

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp.protocol import Runstate

from .errors import QMPBusy, QMPCommandError, VMGone

log = logging.getLogger("vproxy.qemu.monitor")

#: `VMMonitor.state` while no QEMU is connected.
ABSENT = "absent"

# Events after which the run state is asked again, and what some of them imply at once.
_STATUS_EVENTS = frozenset(
    ["STOP", "RESUME", "SHUTDOWN", "SUSPEND", "WAKEUP", "GUEST_PANICKED", "RESET"])
_IMPLIED_STATE = {"STOP": "paused", "RESUME": "running", "SUSPEND": "suspended",
                  "WAKEUP": "running", "GUEST_PANICKED": "guest-panicked"}

_fd_names = itertools.count(1)

#: QMP modes (agent setting ``qmp``, ``vproxy serve --qmp``).
EXCLUSIVE = "exclusive"
SHARED = "shared"
QMP_MODES = (EXCLUSIVE, SHARED)

#: Shared mode: how often the agent asks QEMU what exclusive mode learns from events
#: (run state, QEMU gone or replaced, guest channel ports opened/closed). Each poll is
#: one QMP connection of a few milliseconds; 2 s keeps `vproxy ls` current without
#: taking the socket from its owner more than a few times a second. Documented in
#: vproxy.conf(5).
SHARED_POLL_INTERVAL = 2.0
#: Shared mode: while a ``device_del`` waits for its device to go, it is polled this often.
DELETE_POLL_INTERVAL = 0.25
#: Shared mode: a connection not greeted after this long is logged as busy (another
#: client holds the socket); it is waited on until ``connect_timeout``.
BUSY_NOTICE = 1.0


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

    mode = EXCLUSIVE

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
    def busy(self) -> bool:
        """The last connection attempt found the socket held by another QMP client."""
        return self._warned_busy

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
                await self._set_up(lambda: "QMP connected (%s)" % self.state)
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

    async def _set_up(self, reached: Callable[[], str]) -> None:
        """QEMU is reached: tell every owner (on_connected), log `reached()`, resume a VM
        found in prelaunch if asked, then say ready. Stops early if QEMU goes away
        meanwhile (`_reached()`): the owners then hear on_lost instead."""
        for owner in list(self._owners):
            try:
                await owner.on_connected(self)
            except Exception:
                if not self._reached():
                    return
                log.exception("VM %s: setting up %r failed", self.name, owner)
        if not self._reached():
            return
        log.info("VM %s: %s", self.name, reached())
        if self.resume_prelaunch:
            await self._resume_from_prelaunch()
        if self._reached() and self._ready is not None:  # still, after the cont
            self._ready.set()

    def _reached(self) -> bool:
        """Is QEMU still there for the owners? (Exclusive: the QMP connection is up.)"""
        return self.connected

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
        client, noise = _new_client(self.name)
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


class SharedVMMonitor(VMMonitor):
    """`VMMonitor` for a QMP socket others use too: a connection per operation, and
    polling instead of events (see the module docstring)."""

    mode = SHARED

    def __init__(self, name: str, qmp_path: str, *, poll_interval: float = SHARED_POLL_INTERVAL,
                 **options: Any):
        super().__init__(name, qmp_path, **options)
        self.poll_interval = poll_interval
        self._present = False  # the last contact found a QEMU behind the socket
        self._pid: Optional[int] = None  # that QEMU's pid (SO_PEERCRED), if known
        self._session_pid: Optional[int] = None
        self._conn_lock: Optional[asyncio.Lock] = None
        self._poll_now: Optional[asyncio.Event] = None
        self._frontend_open: Dict[str, bool] = {}  # chardev label -> query-chardev "frontend-open"
        self._port_ids: Dict[str, str] = {}  # chardev label -> id of its virtio-serial port
        self._mapped_labels: Set[str] = set()  # the chardev labels _port_ids was built for
        self._deleting: Set[str] = set()  # device ids of a device_del not yet seen gone
        self._seen_deleted: Set[str] = set()  # of those, the ones the last poll found gone

    @property
    def connected(self) -> bool:
        return self._present

    def _lock(self) -> asyncio.Lock:
        if self._conn_lock is None:
            self._conn_lock = asyncio.Lock()
        return self._conn_lock

    def _wake(self) -> None:
        """Poll now (a command or a channel saw the connection fail)."""
        if self._poll_now is not None:
            self._poll_now.set()

    def busy_message(self) -> str:
        return ("QMP socket %s of VM %s is busy (another client holds it): retrying"
                % (self.qmp_path, self.name))

    # ------------------------------------------------------------------ connections

    async def _open(self) -> QMPClient:
        """One QMP connection; `VMGone` if nothing answers, `QMPBusy` if another client
        held the socket for ``connect_timeout``. Sets `_session_pid`."""
        loop = asyncio.get_event_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, self.qmp_path), self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            sock.close()
            self.last_error = str(e) or type(e).__name__
            self._wake()
            raise VMGone(self.name, self.not_running_message()) from None
        except BaseException:
            sock.close()
            raise
        self._session_pid = _peer_pid(sock)
        client, noise = _new_client(self.name)  # no listener: events are learnt by polling
        noise.connecting = True
        task = asyncio.ensure_future(client.connect(sock))
        try:
            done, _ = await asyncio.wait([task], timeout=BUSY_NOTICE)
            if not done:
                self.last_error = self.busy_message()
                if not self._warned_busy:
                    log.warning("%s", self.last_error)
                    self._warned_busy = True
                done, _ = await asyncio.wait([task], timeout=max(0.0, self.connect_timeout - BUSY_NOTICE))
            if not done:
                raise QMPBusy(self.name, "QMP socket %s of VM %s stayed busy for %g s (another client "
                              "holds it; a QMP socket serves one client at a time)"
                              % (self.qmp_path, self.name, self.connect_timeout))
            exc = task.exception()
            if exc is not None:
                cause = getattr(exc, "exc", exc)
                self.last_error = str(cause) or type(cause).__name__
                self._wake()
                raise VMGone(self.name, self.not_running_message()) from None
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await _quiet_disconnect(client)
            sock.close()
            noise.connecting = False
            raise
        # noise stays on until _session has disconnected: a QEMU exiting under a
        # command is reported by the poller, not by qemu.qmp's reader task.
        if self._warned_busy:
            log.info("QMP socket %s of VM %s is free again", self.qmp_path, self.name)
        self._warned_busy = False
        self.last_error = ""
        return client

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[QMPClient]:
        """A QMP connection for one operation; closed at once after it."""
        async with self._lock():
            client = await self._open()
            try:
                yield client
            finally:
                await _quiet_disconnect(client)
                _qmp_logger(self.name)[1].connecting = False

    async def _run(self, client: QMPClient, cmd: str, args: Optional[Dict[str, Any]] = None) -> Any:
        try:
            return await client.execute(cmd, args)
        except ExecuteError as e:
            raise QMPCommandError(self.name, cmd, args, e.error_class, str(e)) from None
        except Exception as e:  # the connection broke under the command
            self._wake()
            raise VMGone(self.name, self.gone_message()) from e

    # ------------------------------------------------------------------ commands

    async def execute(self, cmd: str, args: Optional[Dict[str, Any]] = None) -> Any:
        if not self._present:
            raise VMGone(self.name, self.not_running_message())
        async with self._session() as client:
            result = await self._run(client, cmd, args)
        if cmd == "device_del" and args and args.get("id"):
            self._deleting.add(str(args["id"]))  # DEVICE_DELETED comes from the poller
            self._wake()
        return result

    async def is_alive(self, timeout: float = 2.0) -> bool:
        """Does the same QEMU still answer? A connect and the greeting, no command: a
        socket held by another client (no greeting within *timeout*) counts as alive,
        a refused connect, a reset (QEMU exiting) or another process as gone."""
        self._wake()
        if not self._present:
            return False
        loop = asyncio.get_event_loop()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, self.qmp_path), timeout)
            except (OSError, asyncio.TimeoutError):
                return False
            pid = _peer_pid(sock)
            if pid is not None and self._pid is not None and pid != self._pid:
                return False
            try:
                greeting = await asyncio.wait_for(loop.sock_recv(sock, 1), timeout)
            except asyncio.TimeoutError:
                return True  # held by another client: QEMU lives
            except OSError:
                return False
            return bool(greeting)

    async def pass_fd(self, fd: int, fdname: str) -> None:
        raise RuntimeError("VM %s: with a shared QMP socket an fd lives only as long as its "
                           "connection: use execute_with_fd" % self.name)

    async def execute_with_fd(self, fd: int, cmd: str,
                              make_args: Callable[[str], Dict[str, Any]]) -> Any:
        """getfd and *cmd* on one connection (the fd belongs to it)."""
        if not self._present:
            raise VMGone(self.name, self.not_running_message())
        fdname = "vproxy%d" % next(_fd_names)
        async with self.fd_lock, self._session() as client:
            try:
                client.send_fd_scm(fd)
            except Exception as e:
                self._wake()
                raise VMGone(self.name, self.gone_message()) from e
            await self._run(client, "getfd", {"fdname": fdname})
            try:
                return await self._run(client, cmd, make_args(fdname))
            except QMPCommandError:
                try:
                    await self._run(client, "closefd", {"fdname": fdname})
                except QMPCommandError:
                    pass  # consumed after all
                raise

    # ------------------------------------------------------------------ supervisor

    async def _supervise(self) -> None:
        self._poll_now = asyncio.Event()
        backoff = self.min_backoff
        try:
            while not self._stopping:
                answered = await self._poll()
                if not self._present:
                    if not answered:
                        await self._sleep(backoff)
                        backoff = min(backoff * 2, self.max_backoff)
                        continue
                    backoff = self.min_backoff
                    await self._attach()
                    continue  # poll again at once: ports' state, a QEMU gone meanwhile
                await self._sleep(DELETE_POLL_INTERVAL if self._deleting else self.poll_interval)
        finally:
            # Also on cancellation (stop()): owners must hear that QEMU is gone.
            if self._present:
                self._lose(self.gone_message())

    async def _sleep(self, seconds: float) -> None:
        assert self._poll_now is not None
        try:
            await asyncio.wait_for(self._poll_now.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self._poll_now.clear()

    async def _attach(self) -> None:
        self._present = True
        self._pid = self._session_pid
        await self._set_up(lambda: "QMP reached on the shared socket %s (%s; polled every %g s)"
                           % (self.qmp_path, self.state, self.poll_interval))

    def _reached(self) -> bool:
        """Shared: QEMU answered the last poll (no connection is held)."""
        return self._present

    def _lose(self, reason: str) -> None:
        if self._ready is not None:
            self._ready.clear()
        self._present = False
        self._pid = None
        self.state = ABSENT
        self._frontend_open.clear()
        self._port_ids.clear()
        self._mapped_labels.clear()
        self._deleting.clear()
        self._seen_deleted.clear()
        log.info("VM %s: %s", self.name, reason)
        for owner in list(self._owners):
            try:
                owner.on_lost(reason)
            except Exception:
                log.exception("VM %s: %r.on_lost failed", self.name, owner)

    async def _poll(self) -> bool:
        """One look at QEMU; True if a QEMU answered. Loses the VM when the socket
        refuses or a different QEMU answers; a busy socket changes nothing."""
        events: List[Dict[str, Any]] = []
        try:
            async with self._session() as client:
                if self._present and self._pid is not None and self._session_pid != self._pid:
                    self._lose(self.gone_message())  # restarted between two polls
                status = await self._run(client, "query-status")
                self.state = str(status.get("status", "unknown"))
                if self._present:
                    events = await self._poll_ports(client)
        except QMPBusy:
            return False
        except VMGone:
            if self._present:
                self._lose(self.gone_message())
            return False
        except QMPCommandError as e:
            log.warning("VM %s: polling QEMU: %s", self.name, e)
            return True
        for event in events:
            self._on_event(event)
        return True

    async def _poll_ports(self, client: QMPClient) -> List[Dict[str, Any]]:
        """The events exclusive mode would have had: VSERPORT_CHANGE for virtio-serial
        ports with an id whose guest side opened or closed, DEVICE_DELETED for a
        device_del whose device is gone."""
        chardevs = await self._run(client, "query-chardev")
        labels = {str(c.get("label", "")) for c in chardevs}
        peripherals: Optional[Dict[str, str]] = None
        if labels != self._mapped_labels or self._deleting:
            peripherals = {str(c["name"]): str(c.get("type", ""))
                           for c in await self._run(client, "qom-list", {"path": "/machine/peripheral"})}
        events: List[Dict[str, Any]] = []
        if peripherals is not None and labels != self._mapped_labels:
            port_ids: Dict[str, str] = {}
            for dev_id, ctype in peripherals.items():
                if ctype in ("child<virtserialport>", "child<virtconsole>"):
                    label = await self._run(client, "qom-get", {
                        "path": "/machine/peripheral/" + dev_id, "property": "chardev"})
                    if label:
                        port_ids[str(label)] = dev_id
            self._port_ids, self._mapped_labels = port_ids, labels
        for c in chardevs:
            label = str(c.get("label", ""))
            if "frontend-open" not in c or label not in self._port_ids:
                continue
            is_open = bool(c["frontend-open"])
            if self._frontend_open.get(label) != is_open:
                self._frontend_open[label] = is_open
                events.append({"event": "VSERPORT_CHANGE", "polled": True,
                               "data": {"id": self._port_ids[label], "open": is_open}})
        if peripherals is not None:
            # A device leaves the QOM tree a moment before QEMU lets go of its chardev
            # (chardev-remove right after it says "busy"): DEVICE_DELETED when it is
            # seen gone by two polls in a row.
            gone = self._deleting - set(peripherals)
            for dev_id in sorted(gone & self._seen_deleted):
                self._deleting.discard(dev_id)
                events.append({"event": "DEVICE_DELETED", "polled": True,
                               "data": {"device": dev_id,
                                        "path": "/machine/peripheral/" + dev_id}})
            self._seen_deleted = gone - self._seen_deleted
        return events


def make_monitor(name: str, qmp_path: str, mode: str = EXCLUSIVE, **options: Any) -> VMMonitor:
    """The monitor for QMP *mode* (EXCLUSIVE or SHARED): the one place that decides."""
    if mode == EXCLUSIVE:
        return VMMonitor(name, qmp_path, **options)
    if mode == SHARED:
        return SharedVMMonitor(name, qmp_path, **options)
    raise ValueError("QMP mode must be one of %s, not %r" % (", ".join(QMP_MODES), mode))


def _peer_pid(sock: socket.socket) -> Optional[int]:
    """The pid of the process listening on *sock*'s peer (Linux SO_PEERCRED), else None.
    Valid even while the connection waits in the listener's backlog."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    pid = int(struct.unpack("3i", creds)[0])
    return pid or None


class _ConnectNoise(logging.Filter):
    """Drops qemu.qmp's error lines while a connection is being attempted: while a VM
    is down the supervisor retries every second, and `last_error` keeps the cause."""

    def __init__(self) -> None:
        super().__init__()
        self.connecting = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.connecting


def _new_client(name: str) -> "Tuple[QMPClient, _ConnectNoise]":
    client = QMPClient(name)
    client.logger, noise = _qmp_logger(name)
    # qemu.qmp's default listener queues every event forever: make it take none.
    client.events.accept = lambda event: False  # type: ignore[method-assign]
    return client, noise


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
