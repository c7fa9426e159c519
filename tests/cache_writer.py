"""Run by tests/test_caching_processes.py: ``mlxterp cache ARGS...`` as a writer that, once it
holds the dataset folder's lock, waits (before changing anything) until the file GO exists, so
that two writers started together are certain to overlap.

    python cache_writer.py GO ARGS...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mlxterp_core import caching
from mlxterp_core.cli import main

go = Path(sys.argv[1])
prepare = caching._prepare_folder  # rank 0 calls it once it holds the lock


def waiting(*args, **kwargs):
    (go.parent / f"holding-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return prepare(*args, **kwargs)


caching._prepare_folder = waiting
sys.exit(main(["cache", *sys.argv[2:]]))
