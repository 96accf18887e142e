"""`run(coro)`: run a test's coroutine from a synchronous test.

Each call gets a fresh event loop (`asyncio.run`), so no test sees another's tasks or
callbacks, and a bound (60 s unless the test says otherwise) so that a hang fails the
test with a TimeoutError instead of waiting for pytest-timeout to kill the whole run.
"""

import asyncio
from typing import Awaitable, Optional, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 60.0


def run(coro: Awaitable[T], timeout: Optional[float] = DEFAULT_TIMEOUT) -> T:
    """The coroutine's result, run on a new loop; `timeout=None` leaves it unbounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
