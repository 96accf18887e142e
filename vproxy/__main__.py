from vproxy._version import answer_version_fast

answer_version_fast()

from vproxy.cli import entry  # noqa: E402

entry()
