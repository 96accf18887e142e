import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from pkitools import pki  # noqa: E402,F401  (a session-wide test CA: see pkitools.py)
