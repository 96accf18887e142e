"""A small nursery: run a few coroutines together and never leave one behind.

trio's nursery is the model; asyncio's own task groups came only in Python 3.11,
and vproxy runs on 3.9. Every "pump pair" (two tasks copying bytes each way, or a task
beside the code that waits for it) is written with it:

    async with Nursery() as nursery:
        to_peer = nursery.start(copy_out())
        nursery.start(copy_in())
        await nursery.wait_any()          # or wait_all(), to let both directions end
        ...                               # look at the tasks, linger, close...

Rules kept here:
- A child that FAILS (raises anything but CancelledError) cancels its siblings at
  once, whatever the body is doing. A child that RETURNS cancels nobody: the body
  decides, with `wait_any()` (the first end is enough) or `wait_all()` (every child
  must end by itself: a forward bridge waits for both directions, for half-close).
- Leaving the block cancels every child still running and waits for it, so no task
  outlives the block, un-awaited or pending ("Task was destroyed but it is pending").
  This differs from trio, whose nursery waits for its children: here every caller
  wants a pump pair over once its block is.
- The first error of a child surfaces once, as itself (no wrapper: callers catch the
  types they know): from `wait_any()`/`wait_all()` if one sees it, else when the
  block is left normally. Later errors of other children (often side effects of the
  first) are logged at debug level and dropped; Python 3.9 has no ExceptionGroup.
- Cancellation of the caller cancels the children, waits for them (even if the
  caller is cancelled again meanwhile) and propagates untouched; it wins over a
  child's error, as it does in trio.
- A child cancelled from outside, or by `cancel()`, has ended without an error: it
  cancels nobody, and `wait_any()` returns.
- The body itself is never cancelled by a failing child (Python 3.9 cannot undo a
  task's cancellation): the body should wait through `wait_any()`/`wait_all()` or
  on the tasks `start()` returned, which end at once when the children do.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any, Coroutine, List, Literal, Optional, Type, TypeVar

log = logging.getLogger("vproxy.tasks")

T = TypeVar("T")

__all__ = ["Nursery"]


class Nursery:
    """Children started with `start()` live no longer than the `async with` block."""

    def __init__(self) -> None:
        self._children: List[asyncio.Task[Any]] = []
        self._error: Optional[BaseException] = None
        self._error_surfaced = False
        self._cancelled = False
        self._closed = False

    async def __aenter__(self) -> Nursery:
        return self

    async def __aexit__(self, exc_type: Optional[Type[BaseException]],
                        exc: Optional[BaseException], tb: Optional[TracebackType]) -> Literal[False]:
        for child in self._children:
            child.cancel()
        try:
            cancelled_meanwhile = await self._join()
        finally:
            self._closed = True
        if exc_type is None and not cancelled_meanwhile:
            self._surface_error()
        elif self._error is not None and not self._error_surfaced:
            log.debug("a child's error, dropped for the caller's own: %r", self._error,
                      exc_info=self._error)
        if cancelled_meanwhile and not isinstance(exc, asyncio.CancelledError):
            raise asyncio.CancelledError()
        return False  # the body's own exception (and the caller's cancellation) goes on

    def start(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run *coro* as a child; its task is returned for the body to look at."""
        if self._closed:
            coro.close()
            raise RuntimeError("this nursery's block has ended: it starts no more tasks")
        task = asyncio.ensure_future(coro)
        self._children.append(task)
        task.add_done_callback(self._child_ended)
        if self._cancelled:
            task.cancel()
        return task

    def cancel(self) -> None:
        """Cancel every child, now and started later; not an error (e.g. the channel
        is gone). The body's waits return; the block then ends as usual."""
        self._cancelled = True
        for child in self._children:
            child.cancel()

    async def wait_any(self) -> None:
        """Until one child has ended (returned, failed or been cancelled); raises the
        first error if there is one."""
        if self._children and not any(child.done() for child in self._children):
            await asyncio.wait(self._children, return_when=asyncio.FIRST_COMPLETED)
        self._surface_error()

    async def wait_all(self) -> None:
        """Until every child has ended; raises the first error if there is one (the
        others were then cancelled)."""
        running = [child for child in self._children if not child.done()]
        if running:
            await asyncio.wait(running)
        self._surface_error()

    # -- inside ---------------------------------------------------------------------

    def _child_ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()  # retrieved here, so asyncio never logs it as lost
        if error is None:
            return
        if self._error is None:
            self._error = error
            for child in self._children:
                child.cancel()
        else:
            log.debug("a second error in a nursery, dropped: %r", error, exc_info=error)

    def _surface_error(self) -> None:
        if self._error is not None and not self._error_surfaced:
            self._error_surfaced = True
            raise self._error

    async def _join(self) -> bool:
        """Wait for every child to end; True if the caller was cancelled meanwhile."""
        cancelled = False
        while True:
            running = [child for child in self._children if not child.done()]
            if not running:
                return cancelled
            try:
                await asyncio.wait(running)
            except asyncio.CancelledError:
                cancelled = True  # go on waiting: no child is left behind
