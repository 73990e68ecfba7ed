"""YAML as regcache reads it (pipelines, manifests, ``--set`` values): safe, and strict about duplicate keys.

PyYAML keeps the last of two equal keys silently, so a pipeline with ``probes:`` twice loses a block and a
manifest with two ``classes:`` lines takes the second. Here a key given twice in one mapping is an error
that names it and both lines.
"""
from __future__ import annotations

from typing import Any

import yaml


class DuplicateKey(ValueError):
    """A mapping that gives one key twice."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            merges = [k.start_mark.line + 1 for k, _ in node.value if k.tag == "tag:yaml.org,2002:merge"]
            if len(merges) > 1:
                raise DuplicateKey(f"key '<<' (a merge) is given twice (lines {merges[0]} and {merges[1]}); the "
                                   "second would silently override the first")
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges, and explicit keys override it, as YAML intends
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    where = f"lines {first} and {line}" if first != line else f"line {line}"
                    raise DuplicateKey(f"key {key!r} is given twice ({where}); the second would silently replace "
                                       "the first")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (`DuplicateKey`)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
