"""The `regcache` command: a thin layer over the Python API (each command calls one function).

One module per stage, each registering its commands on the group in `common`. The commands import the stage they
run when they run (the only function-level imports of regcache's own modules besides the pipeline's, which loads
torch-side stages only to run them): `regcache ls` or `--help` start without torch (tests/test_settings.py).
"""
from . import analyse, cache, data, distill, extract, probe, verify  # noqa: F401  (registers the commands)
from .common import main

__all__ = ["main"]
