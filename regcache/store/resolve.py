"""Finding feature sets: the one place that turns (cache, dataset, model, features) or a name into a set.

Extraction asks for a set with an exact identity (`find_reusable`); the probe asks by dataset
name and model (`find_feature_set`); analyses take a path or a name as `regcache ls` prints it
(`open_set`).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from . import FeatureSet
from .meta import META, StoreError

log = logging.getLogger("regcache")


def list_feature_sets(root: str | os.PathLike, damaged: list | None = None) -> list[FeatureSet]:
    """Every readable feature set under a cache root, sorted by path. One that cannot be read is named in a
    warning, and appended to ``damaged`` as (path, reason) when that list is given."""
    found = []
    for p in sorted(Path(root).expanduser().glob(f"**/{META}")):
        try:
            found.append(FeatureSet(p.parent))
        except StoreError as e:
            log.warning("skipped: %s", e)
            if damaged is not None:
                damaged.append((p.parent, str(e)))
    return found


def find_reusable(root: str | os.PathLike, identity: dict) -> FeatureSet | None:
    """A complete feature set with the same identity except that it stores at least the asked features."""
    identity = json.loads(json.dumps(identity))  # as stored: tuples become lists
    want = set(identity["features"])
    same = {k: v for k, v in identity.items() if k != "features"}
    for fs in list_feature_sets(root):
        ident = fs.meta["identity"]
        if {k: v for k, v in ident.items() if k != "features"} == same and want <= set(ident["features"]) \
                and fs.complete:
            return fs
    return None


def open_set(name: str | os.PathLike, cache: str | os.PathLike) -> FeatureSet:
    """A feature set by path, or by its name relative to the cache root (as `regcache ls` prints it)."""
    path = Path(name)
    if not (path / META).is_file() and (Path(cache).expanduser() / path / META).is_file():
        path = Path(cache).expanduser() / path
    if not (path / META).is_file():
        raise StoreError(f"{name}: no feature set there, nor under the cache root {cache} (regcache ls lists them)")
    return FeatureSet(path)


def _of_model(fs: FeatureSet, model: str, timm_name: str) -> bool:
    m = fs.meta["model"]
    return m["name"] == model or m["timm_name"] == timm_name or fs.fingerprint.startswith(model)


def find_feature_set(cache: str | os.PathLike, dataset: str, model: str, features: Sequence[str],
                     available: Sequence[FeatureSet] | None = None) -> FeatureSet:
    """The complete feature set of ``dataset`` (a name, or a feature-set path) for ``model`` (alias, timm
    name or fingerprint prefix) holding ``features``.

    When there is none, the error gives the command that makes it, with the model settings
    (checkpoint, model arguments, size, position embedding) of the model's other sets in the
    cache, so that the new set can be probed beside them. ``available``: the cache's sets when the
    caller already listed them (finding several sets lists the cache once).
    """
    from ..models import ALIASES

    if (Path(dataset) / META).is_file():
        return FeatureSet(dataset)
    timm_name = ALIASES.get(model, model)
    sets = list(available) if available is not None else list_feature_sets(cache)
    ours = [fs for fs in sets if _of_model(fs, model, timm_name)]
    found = [fs for fs in ours if fs.meta["dataset"]["name"] == dataset and fs.complete
             and set(features) <= set(fs.features)]
    if len(found) > 1:
        listing = "\n  ".join(str(fs.path) for fs in found)
        raise StoreError(f"several feature sets of {dataset!r} for {model!r} (different settings); "
                         f"name one by path:\n  {listing}")
    if not found:
        raise StoreError(f"no complete feature set of {dataset!r} for {model!r} with {','.join(features)} under "
                         f"{cache}; make it with:\n  {suggest_extract(dataset, model, features, ours)}")
    return found[0]


def suggest_extract(dataset: str, model: str, features: Sequence[str], siblings: Sequence[FeatureSet]) -> str:
    """The extract command for a missing set, with the model settings its siblings were made with."""
    args = ["regcache", "extract", "--model", model, "--data", f"manifests/{dataset}.yaml",
            "--features", ",".join(features)]
    settings = {_model_args(fs) for fs in siblings}
    if len(settings) == 1:
        return shlex.join([*args, *settings.pop()])
    note = ("\n  (the model's cached sets were made with different checkpoints, model arguments or sizes: "
            "add those of the sets to compare with; regcache ls shows them)") if settings else ""
    return shlex.join(args) + note


def _model_args(fs: FeatureSet) -> tuple[str, ...]:
    """The extract flags that set a cached set's model up as it was: weights, model arguments, size."""
    m, pre = fs.meta["model"], fs.meta.get("preprocess") or {}
    args: list[str] = []
    if m.get("checkpoint"):
        args += ["--checkpoint", str(m["checkpoint"])]
    if m.get("random_init") is not None:
        args += ["--random-init", str(m["random_init"])]
    for k, v in sorted((m.get("kwargs") or {}).items()):
        args += ["--model-arg", f"{k}={json.dumps(v)}"]
    for key in ("size", "resize"):
        if key in pre:
            args += [f"--{key}", str(pre[key])]
    if m.get("pos_embed", "timm") != "timm":
        args += ["--pos-embed", m["pos_embed"]]
    return tuple(args)
