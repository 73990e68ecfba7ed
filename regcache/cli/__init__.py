"""The `regcache` command: a thin layer over the Python API (each command calls one function).

One module per stage, each registering its commands on the group in `common`.
"""
from . import analyse, cache, data, extract, probe, verify  # noqa: F401  (registers the commands)
from .common import main

__all__ = ["main"]
