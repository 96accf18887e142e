#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris) of the frame decoder and the session state machine.

    pip install atheris
    python3 fuzz/fuzz_session.py fuzz/corpus/session -max_total_time=300

The only invariant: whatever bytes arrive, on either side of a session, the core gives
events (at worst ConnectionTerminated with a GOAWAY queued), never another exception,
and what it queues to send decodes cleanly. Interesting inputs are kept in
fuzz/corpus/session/ and replayed by tests/test_fuzz_corpus.py on every test run.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

import atheris  # noqa: E402

with atheris.instrument_imports():
    from harness import check  # noqa: E402


def main() -> None:
    atheris.Setup(sys.argv, lambda data: check(bytes(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
