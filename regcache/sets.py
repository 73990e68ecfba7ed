"""Naming cached sets: one way for every command that reads the cache.

A set is named by a feature-set path, by its name relative to the cache root (as `regcache ls`
prints it), by a manifest file, or by a dataset name with a model (an alias, a timm name, or a
fingerprint prefix). A dataset name matches every name a set's rows carry (`FeatureSet.names`), and
the set is read under the name it was asked by, with that name's classes, subset and split.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .registry import ALIASES
from .store import FeatureSet, StoreError, list_feature_sets
from .store.meta import META, Description


class SetNotFound(StoreError):
    """No complete set of this dataset for this model holds these features; ``siblings`` are the model's other
    sets and ``sources`` the data the dataset was extracted from before (for the command that makes it)."""

    def __init__(self, message: str, dataset: str, model: str, features: Sequence[str],
                 siblings: Sequence[FeatureSet], sources: Sequence[str]):
        super().__init__(message)
        self.dataset, self.model, self.features = dataset, model, tuple(features)
        self.siblings, self.sources = list(siblings), list(sources)


@dataclass(frozen=True)
class Named:
    """A set, and the dataset name and description its rows are read under."""

    fs: FeatureSet
    description: Description

    @property
    def name(self) -> str:
        return self.description.name

    @classmethod
    def of(cls, fs: FeatureSet, name: str | None = None) -> "Named":
        return cls(fs, fs.description(name))


def of_model(fs: FeatureSet, model: str) -> bool:
    """Whether ``model`` (as the user typed it, an alias, a timm name with or without its tag, or a fingerprint
    prefix) names the backbone of ``fs``."""
    if fs.meta.model.name == model or fs.fingerprint.startswith(model):
        return True
    full = fs.identity.get("model", "")
    wanted = ALIASES.get(model, model)
    return wanted == full or ("." not in wanted and full.split(".")[0] == wanted)


class Cache:
    """The feature sets under one cache root, listed once when first needed."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    @functools.cached_property
    def sets(self) -> list[FeatureSet]:
        return list_feature_sets(self.root)

    def find(self, ref: str, model: str | None = None, features: Sequence[str] = ()) -> Named:
        """The set ``ref`` names (see the module doc); with a dataset name, the one complete set of ``model``
        holding ``features``."""
        path = Path(os.path.expanduser(ref))
        for candidate in (path, self.root / ref):
            if (candidate / META).is_file():
                return Named.of(FeatureSet(candidate))
        if ref.endswith((".yaml", ".yml")) and path.is_file():
            from .data import load_manifest, shard_ids

            ds = load_manifest(path)
            fs = self._by_name(ds.name, model, features, content=ds.content_id(shard_ids(ds, self.root / ".digests"))).fs
            return Named(fs, Description(**ds.description()))  # the rows, with the manifest's meaning
        if model is None:
            raise StoreError(f"{ref}: not a feature-set path, nor a name under the cache root {self.root}; name a "
                             "dataset with --model (regcache ls lists the sets)")
        return self._by_name(ref, model, features)

    def _by_name(self, dataset: str, model: str | None, features: Sequence[str], content: str | None = None) -> Named:
        ours = [fs for fs in self.sets if model is None or of_model(fs, model)]
        found = [fs for fs in ours if fs.complete and set(features) <= set(fs.features)
                 and (dataset in fs.names() if content is None else fs.identity.get("data") == content)]
        if len(found) > 1:
            listing = "\n  ".join(f"{fs.path.relative_to(self.root) if fs.path.is_relative_to(self.root) else fs.path}"
                                  for fs in found)
            raise StoreError(f"several feature sets of {dataset!r} for {model!r} (made with different settings); "
                             f"name one by its path (regcache ls shows how they differ):\n  {listing}")
        if not found:
            sources = sorted({fs.meta.dataset.source for fs in self.sets if dataset in fs.names()})
            have = "" if not ours else f" (the model's sets: {', '.join(sorted({n for fs in ours for n in fs.names()}))})"
            raise SetNotFound(f"no complete feature set of {dataset!r} for {model!r} with {','.join(features)} under "
                              f"{self.root}{have}", dataset, model or "", features, ours, sources)
        return Named.of(found[0], dataset if content is None else None)
