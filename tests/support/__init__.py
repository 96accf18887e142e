"""What the tests share: helpers, fixtures and the test-only guests, kept apart from
the test files so that every file directly under tests/ is a test.

pytest puts tests/ on sys.path (``pythonpath`` in pyproject.toml), so test files import
these as ``from support.vmtools import ...``; tests/conftest.py holds the fixtures
every test may take (``pki``).

- `aio`: `run(coro)`, the one way a synchronous test runs a coroutine.
- `agenttools`: `vproxy serve` as a child process (`AgentProcess`), its config file.
- `debian_root`: debootstrap'ed Debian roots to run the built .pyz on a bare host.
- `memstream`: in-memory Streams for channel tests without a session.
- `muxpair`: two sans-IO mux Connections wired back to back (`Pair`).
- `pkitools`: a complete test PKI and a real TLS handshake helper.
- `pyztools`: builds the .pyz (and its wheels) once per session.
- `sessiontools`: two Sessions over a real socket pair, per transport.
- `vmtools`: real QEMU guests (`boot_sector_vm`, `linux_vm`) and QMP helpers.
- `guests/`: the test-only Linux guest (the boot-sector guest ships, in vproxy/guests).
"""
