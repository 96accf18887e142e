"""What every test gets: the session-wide test PKI fixture, and the CI rule on skips.

The helpers live in tests/support/ (a package: see its docstring); pytest puts tests/
on sys.path through ``pythonpath`` in pyproject.toml, which is why nothing here or in a
test file touches sys.path.
"""

import pytest

from support.debian_root import in_ci
from support.pkitools import TestPki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> TestPki:
    """The test PKI (support/pkitools.py), made once per session. Do not modify its files."""
    return make_pki(tmp_path_factory.mktemp("pki"))


# Under CI a skipped test fails the run: a skip there means a test that was claimed
# did not run (no QEMU, no KVM, no root...), and must not pass for green.
_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        _skipped.append("%s: %s" % (report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    if _skipped and in_ci() and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _skipped and in_ci():
        terminalreporter.section("skipped under CI: the run fails", red=True)
        for line in _skipped:
            terminalreporter.line(line)
