import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from pkitools import pki  # noqa: E402,F401  (a session-wide test CA: see pkitools.py)


# Under CI a skipped test fails the run: a skip there means a test that was claimed
# did not run (no QEMU, no KVM, no root...), and must not pass for green.
_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append("%s: %s" % (report.nodeid, report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr))


def pytest_sessionfinish(session, exitstatus):
    from debian_root import in_ci

    if _skipped and in_ci() and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from debian_root import in_ci

    if _skipped and in_ci():
        terminalreporter.section("skipped under CI: the run fails", red=True)
        for line in _skipped:
            terminalreporter.line(line)
