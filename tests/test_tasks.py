"""vproxy.net.tasks.Nursery: each rule of its docstring, one test that fails if it breaks.

Every test runs its own event loop and records what the loop reports to its exception
handler ("Task was destroyed but it is pending", "exception was never retrieved"):
a nursery must leave nothing for it to say.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any, Dict, List

import pytest

from vproxy.net.tasks import Nursery


def run(coro, timeout: float = 10.0):
    """Run *coro* on a fresh loop; fail if the loop reported anything lost."""
    reports: List[Dict[str, Any]] = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: reports.append(context))
        too_long = loop.call_later(timeout, asyncio.current_task().cancel)  # a hang fails
        try:
            return await coro  # in this task, so that others() sees only the test's own
        finally:
            too_long.cancel()
            gc.collect()  # a pending task dropped on the floor is reported when collected

    try:
        return asyncio.run(main())
    finally:
        gc.collect()
        assert reports == []


def others() -> set:
    return asyncio.all_tasks() - {asyncio.current_task()}


async def forever() -> None:
    await asyncio.Event().wait()


async def loud_when_cancelled() -> None:
    try:
        await forever()
    except asyncio.CancelledError:
        raise RuntimeError("raised while being cancelled") from None


async def fail(error: BaseException, after: float = 0.0) -> None:
    await asyncio.sleep(after)
    raise error


# --------------------------------------------------------------------- ending together

def test_first_end_then_leaving_cancels_the_sibling_and_awaits_it():
    async def main():
        async with Nursery() as nursery:
            quick = nursery.start(asyncio.sleep(0, "done"))
            slow = nursery.start(forever())
            await nursery.wait_any()
            assert quick.result() == "done" and not slow.done()
        assert slow.cancelled()
        assert others() == set()

    run(main())


def test_a_returning_child_cancels_nobody_and_wait_all_lets_both_finish():
    # the forward bridge: one direction's EOF must not stop the other (half-close)
    async def main():
        async with Nursery() as nursery:
            first = nursery.start(asyncio.sleep(0, "eof one way"))
            second = nursery.start(asyncio.sleep(0.05, "eof the other way"))
            await nursery.wait_all()
        assert first.result() == "eof one way"
        assert second.result() == "eof the other way"

    run(main())


def test_a_failing_child_cancels_its_siblings_at_once():
    async def main():
        seen = []
        with pytest.raises(ValueError, match="broken"):
            async with Nursery() as nursery:
                slow = nursery.start(forever())
                nursery.start(fail(ValueError("broken"), after=0.01))
                await asyncio.sleep(0.2)  # the body does not wait on the nursery
                seen.append(slow.cancelled())  # ...and the sibling is cancelled anyway
        assert seen == [True]

    run(main())


def test_wait_all_raises_the_first_error_after_every_child_ended():
    async def main():
        async with Nursery() as nursery:
            slow = nursery.start(forever())
            nursery.start(fail(ValueError("broken")))
            with pytest.raises(ValueError, match="broken"):
                await nursery.wait_all()
            assert slow.cancelled()
        assert others() == set()

    run(main())


# --------------------------------------------------------------------- errors once

def test_the_first_error_surfaces_once_and_later_ones_are_dropped():
    async def main():
        raised = []
        async with Nursery() as nursery:
            nursery.start(loud_when_cancelled())
            nursery.start(fail(ValueError("the first")))
            try:
                await nursery.wait_any()
            except ValueError as e:
                raised.append(e)
            await nursery.wait_all()  # seen once: not raised again here...
        return raised  # ...nor when the block is left

    raised = run(main())
    assert [str(e) for e in raised] == ["the first"]


def test_an_error_no_wait_saw_is_raised_when_the_block_is_left():
    async def main():
        async with Nursery() as nursery:
            nursery.start(fail(KeyError("lost?")))
            await asyncio.sleep(0.05)

    with pytest.raises(KeyError):
        run(main())


def test_the_body_error_wins_over_the_children():
    async def main():
        async with Nursery() as nursery:
            child = nursery.start(forever())
            raise LookupError("from the body")
        assert child.cancelled()

    with pytest.raises(LookupError, match="from the body"):
        run(main())


# --------------------------------------------------------------------- cancellation

def test_cancelling_the_caller_cancels_the_children_and_propagates():
    async def main():
        children: List[asyncio.Task] = []

        async def caller() -> None:
            async with Nursery() as nursery:
                children.append(nursery.start(forever()))
                children.append(nursery.start(forever()))
                await nursery.wait_any()

        task = asyncio.ensure_future(caller())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert all(child.cancelled() for child in children)
        assert others() == set()

    run(main())


async def slow_to_stop(ended: List[bool]) -> None:
    try:
        await forever()
    finally:  # cleanup that takes a moment, cancelled or not
        loop = asyncio.get_running_loop()
        done_at = loop.time() + 0.05
        while loop.time() < done_at:
            try:
                await asyncio.sleep(done_at - loop.time())
            except asyncio.CancelledError:
                pass
        ended.append(True)


def test_a_caller_cancelled_again_still_awaits_every_child():
    async def main():
        ended: List[bool] = []

        async def caller() -> None:
            async with Nursery() as nursery:
                nursery.start(slow_to_stop(ended))
                await nursery.wait_any()

        task = asyncio.ensure_future(caller())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.01)
        task.cancel()  # cancelled again while the nursery waits for its child
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended == [True]
        assert others() == set()

    run(main())


def test_a_caller_cancelled_while_leaving_ends_cancelled_not_with_a_child_error():
    async def main():
        ended: List[bool] = []

        async def caller() -> None:
            async with Nursery() as nursery:
                nursery.start(slow_to_stop(ended))
                nursery.start(loud_when_cancelled())
                await asyncio.sleep(0.01)  # the body ends normally; leaving takes 0.05 s

        task = asyncio.ensure_future(caller())
        await asyncio.sleep(0.03)
        task.cancel()  # while the block is being left
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled() and ended == [True]

    run(main())


def test_cancel_ends_the_children_without_an_error():
    async def main():
        async with Nursery() as nursery:
            one = nursery.start(forever())
            two = nursery.start(forever())
            asyncio.get_running_loop().call_later(0.01, nursery.cancel)
            await nursery.wait_any()
            late = nursery.start(forever())  # started after cancel(): cancelled too
            await asyncio.sleep(0)
            assert one.cancelled() and two.cancelled() and late.cancelled()

    run(main())


def test_a_child_cancelled_from_outside_is_an_end_not_an_error():
    async def main():
        async with Nursery() as nursery:
            one = nursery.start(forever())
            two = nursery.start(forever())
            asyncio.get_running_loop().call_later(0.01, one.cancel)
            await nursery.wait_any()
            assert one.cancelled() and not two.done()

    run(main())


# --------------------------------------------------------------------- nothing left

def test_no_task_is_left_pending_or_unretrieved():
    # run() fails the test if the loop reports a pending task destroyed or an
    # exception never retrieved; here every way out is taken once
    async def main():
        for error in (None, ValueError("x")):
            try:
                async with Nursery() as nursery:
                    nursery.start(forever())
                    nursery.start(forever())
                    if error is not None:
                        nursery.start(fail(error))
                    nursery.start(fail(OSError("second"), after=0.01))
                    await asyncio.sleep(0)
            except (ValueError, OSError):
                pass
            assert others() == set()

    run(main())


def test_no_task_starts_once_the_block_has_ended():
    async def main():
        async with Nursery() as nursery:
            pass
        coro = forever()
        with pytest.raises(RuntimeError):
            nursery.start(coro)

    run(main())
