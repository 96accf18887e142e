"""man/vproxy-protocol.7 is true: every worked example decodes to what the page says."""

import os
import re
import shutil
import subprocess

import pytest

from vproxy.mux import frames as fr

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "man", "vproxy-protocol.7")


def examples():
    text = open(PAGE).read()
    pattern = re.compile(r'^\.\\" expect: ([^\n]*)\n\.Bd -literal[^\n]*\n(.*?)\n\.Ed', re.M | re.S)
    return [(m.group(1), bytes.fromhex(m.group(2).replace("\n", " "))) for m in pattern.finditer(text)]


def expected_fields(spec):
    fields = {}
    for key in ("message",):  # free text: the rest of the line
        if " %s=" % key in spec:
            spec, fields[key] = spec.split(" %s=" % key, 1)
    for item in spec.split():
        key, _, value = item.partition("=")
        fields[key] = value
    return fields


def test_the_page_has_an_example_of_every_frame_type():
    kinds = {expected_fields(spec)["type"] for spec, _ in examples()}
    assert kinds == {t.name for t in fr.FrameType}


@pytest.mark.parametrize("spec, wire", examples())
def test_example_decodes_as_described(spec, wire):
    want = expected_fields(spec)
    decoder = fr.FrameDecoder()
    decoder.feed(wire)
    frame = decoder.next_frame()
    assert decoder.next_frame() is None and decoder.buffered == 0
    assert frame.type.name == want.pop("type")
    assert frame.stream_id == int(want.pop("stream"))
    named = {"window": frame.window, "priority": frame.priority, "code": frame.code,
             "message": frame.message, "flags": frame.flags, "last": frame.last_stream_id,
             "data": frame.data.hex()}
    for key, value in want.items():
        if key in named:
            assert str(named[key]) == value, key
        else:
            assert frame.field_dict()[key] == value, key
    if frame.fields:
        assert set(frame.field_dict()) <= set(want)
    assert fr.encode(frame) == wire


def test_man_pages_are_lint_clean():
    assert shutil.which("mandoc"), "mandoc is missing: scripts/test.sh installs it"
    man_dir = os.path.dirname(PAGE)
    pages = sorted(os.path.join(man_dir, p) for p in os.listdir(man_dir))
    out = subprocess.run(["mandoc", "-T", "lint", "-W", "warning"] + pages, capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr
