"""The version line, importable without click: `--version` answers before the CLI loads."""

import sys

from . import __version__


def version_line() -> str:
    try:
        from ._build import BUILD_HASH  # optional: written into the .pyz by build.py
    except ImportError:
        BUILD_HASH = "dev"
    return "vproxy %s (build %s, Python %s)" % (__version__, BUILD_HASH[:12], sys.version.split()[0])


def answer_version_fast() -> None:
    """`vproxy --version` alone: print and exit without importing click (start-up time)."""
    if sys.argv[1:] == ["--version"]:
        print(version_line())
        raise SystemExit(0)
