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

from . import yamlio
from .data import UnsetVariable, load_manifest, shard_ids
from .names import did_you_mean
from .registry import ALIASES, MODELS
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
    alias = MODELS.get(model)
    if alias is not None and alias.weights:  # an alias of local weights: sets made with that file
        return wanted == full and Path(fs.meta.model.checkpoint or "").name == alias.weights
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
            return self._by_manifest(path, model, features)
        if model is None:
            raise StoreError(f"{ref}: not a feature-set path, nor a name under the cache root {self.root}; name a "
                             "dataset with --model (regcache ls lists the sets)")
        return self._by_name(ref, model, features)

    def _by_manifest(self, path: Path, model: str | None, features: Sequence[str]) -> Named:
        """The set of a manifest's shards (by their bytes), read with the manifest's meaning. A manifest whose
        ``${VARS}`` are not set here cannot name its shards: its set is found by the manifest's dataset name."""
        try:
            ds = load_manifest(path)
        except UnsetVariable as e:
            if model is None:
                raise
            name = yamlio.load(path.read_text()).get("name")
            try:
                return self._by_name(str(name), model, features)
            except SetNotFound as missing:
                missing.args = (f"{missing} ({e}: its shards cannot be read here to extract it; set the variable "
                                "first)",)
                raise
        content = ds.content_id(shard_ids(ds, self.root / ".digests"))
        fs = self._by_name(ds.name, model, features, content=content).fs
        return Named(fs, Description(**ds.description()))  # the rows, with the manifest's meaning

    def _by_name(self, dataset: str, model: str | None, features: Sequence[str], content: str | None = None) -> Named:
        ours = [fs for fs in self.sets if model is None or of_model(fs, model)]
        found = [fs for fs in ours if fs.complete and set(features) <= set(fs.features)
                 and (dataset in fs.names() if content is None else fs.identity.get("data") == content)]
        if len(found) > 1:
            raise StoreError(f"several feature sets of {dataset!r} for {model!r} hold {','.join(features)}; they "
                             f"differ in {_differences(found)}; name one by its path (as regcache ls prints it):"
                             + "".join(f"\n  {self.label(fs)}: {len(fs.index):,} rows, created "
                                       f"{fs.meta.provenance.created}" for fs in found))
        if not found:
            sources = sorted({fs.meta.dataset.source for fs in self.sets if dataset in fs.names()})
            names = sorted({n for fs in ours for n in fs.names()})
            have = "" if not ours else f" (the model's sets: {', '.join(names)})"
            if model and not ours:  # no set of this model at all: more likely a typo of the model than the set
                models = sorted({fs.meta.model.name for fs in self.sets})
                have = f"; no set under it is of a model named {model!r}{did_you_mean(model, models)}"
            raise SetNotFound(f"no complete feature set of {dataset!r}{did_you_mean(dataset, names)} for {model!r} "
                              f"with {','.join(features)} under {self.root}{have}", dataset, model or "", features,
                              ours, sources)
        return Named.of(found[0], dataset if content is None else None)

    def label(self, fs: FeatureSet) -> str:
        """A set as `regcache ls` names it: its path under the cache root."""
        return str(fs.path.relative_to(self.root)) if fs.path.is_relative_to(self.root) else str(fs.path)


def _differences(sets: Sequence[FeatureSet]) -> str:
    """What tells sets apart, field by field of their identities, the data as their rows and sources."""
    keys = sorted({k for fs in sets for k in fs.identity if len({repr(o.identity.get(k)) for o in sets}) > 1})
    said = []
    for k in keys:
        if k == "data":
            said.append("data (" + " vs ".join(f"{len(fs.index):,} rows of {fs.meta.dataset.source}" for fs in sets)
                        + ")")
        else:
            said.append(f"{k} (" + " vs ".join(str(fs.identity.get(k)) for fs in sets) + ")")
    return "; ".join(said) or "nothing of their identities (copies?)"
