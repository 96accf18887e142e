"""Test-only guests (the boot-sector guest lives in vproxy/guests, it ships)."""
