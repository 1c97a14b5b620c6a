"""Test session setup: the tests never read or write the developer's data folder.

`definitions.py` reads `$INTERP_DATA_DIR/config/` (extra readers) when it is imported, and resources
built from it write under `$INTERP_DATA_DIR`; the default `./var` would make tests depend on, and change,
what a developer has there. Tests that need a data folder of their own still pass one explicitly.
"""

import atexit
import os
import shutil
import tempfile

_DATA_DIR = tempfile.mkdtemp(prefix="interp_tests_")
os.environ["INTERP_DATA_DIR"] = _DATA_DIR
atexit.register(shutil.rmtree, _DATA_DIR, ignore_errors=True)
