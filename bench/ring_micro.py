#!/usr/bin/env python3
"""The console ring's hot path, in microseconds per call: appending console output and
reading it out for viewers, on a full (wrapping) 1 MiB ring and on fresh ones.

    python3 bench/ring_micro.py [--tree DIR,DIR...]

--tree compares the RingBuffer of other source trees (e.g. ``git archive main | tar -x
-C /tmp/before``) with this one's, in one run, taking turns (best of 3 x 3 repeats).
Asserts nothing.
"""

import argparse
import importlib.util
import os
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAP = 1 << 20
FULL = "r = R(CAP); r.append(b'y' * (CAP + 7))"
CASES = [
    ("append 64 B, full ring", "r.append(d)", FULL + "; d = b'x' * 64", 200000),
    ("append 4 KiB, full ring", "r.append(d)", FULL + "; d = b'x' * 4096", 50000),
    ("new ring + 1,000 appends of 64 B", "r = R(CAP)\nfor _ in range(1000): r.append(d)", "d = b'x' * 64", 300),
    ("new ring + 1 MiB in 4 KiB appends", "r = R(CAP)\nfor _ in range(257): r.append(d)", "d = b'x' * 4096", 100),
    ("read 64 B, full ring", "r.read(r.end - 200, 64)", FULL, 100000),
    ("read 64 KiB, full ring", "r.read(r.end - 70000, 65536)", FULL, 20000),
]


def load(tree: Path):
    spec = importlib.util.spec_from_file_location("ring_%d" % abs(hash(str(tree))),
                                                  tree / "vproxy" / "agent" / "qemu" / "ring.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RingBuffer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default="", help="other source trees to compare, comma-separated")
    args = ap.parse_args()
    trees = [Path(t).resolve() for t in args.tree.split(",") if t] + [ROOT]
    rings = [(t.name, load(t)) for t in trees]
    print("load average %s; Python %s" % (" ".join("%.2f" % x for x in os.getloadavg()), sys.version.split()[0]))
    print("| us per call | %s |" % " | ".join(name for name, _ in rings))
    print("|---|%s" % ("---|" * len(rings)))
    for label, stmt, setup, number in CASES:
        best = {}
        for _ in range(3):
            for name, ring in rings:
                t = min(timeit.repeat(stmt, setup, number=number, repeat=3, globals={"R": ring, "CAP": CAP}))
                best[name] = min(best.get(name, float("inf")), t / number * 1e6)
        print("| %s | %s |" % (label, " | ".join("%.3f" % best[name] for name, _ in rings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
