"""Guests that vproxy builds itself, with nothing but the standard library.

`bootsector` writes a tiny real-mode x86 disk image (used by `vproxy demo` and by the
tests): it prints a banner on COM1 and echoes, transformed, whatever it receives.
"""

from .bootsector import BANNER, build_boot_disk, build_boot_sector, expected_echo

__all__ = ["BANNER", "build_boot_disk", "build_boot_sector", "expected_echo"]
