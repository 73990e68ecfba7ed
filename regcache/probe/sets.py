"""The sets of a run: found by name, path, manifest or pin, and checked before any head trains (one backbone, each
set once, no anomaly set that is an ID set, no test set that trained or selected the heads)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..sets import Cache, Named
from ..settings import CachedSets
from ..store import FeatureSet
from .data import ProbeError, check_compatible


@dataclass
class RunSets:
    """The sets of a run: three by role, the eval and anomaly sets by name. Roles and names are apart in the
    structure itself, so a set *named* ``test`` never stands in for the ID test set."""

    train: Named
    val: Named | None = None
    test: Named | None = None
    eval: dict[str, Named] = field(default_factory=dict)
    anomaly: dict[str, Named] = field(default_factory=dict)

    def items(self) -> Iterator[tuple[str, Named]]:
        """(label, set): ``train``, ``val``, ``test``, then ``eval:NAME`` and ``anomaly:NAME``."""
        yield "train", self.train
        for role in ("val", "test"):
            if getattr(self, role) is not None:
                yield role, getattr(self, role)
        yield from ((f"eval:{n}", s) for n, s in self.eval.items())
        yield from ((f"anomaly:{n}", s) for n, s in self.anomaly.items())

    @property
    def id_role(self) -> str | None:
        """The role of the set the ID numbers are on: test, else val, else none (a held-out part of train)."""
        return "test" if self.test is not None else "val" if self.val is not None else None


def find_sets(s: "CachedSets", union: Sequence[str], pins: Mapping[str, "Named | str | Path"] | None = None) -> RunSets:
    """The sets ``s`` names (`sets.Cache.find`); ``pins`` (dataset name -> a set, or a feature-set path read under
    that name) fixes which set a name means, as a pipeline does for the sets it made."""
    cache = Cache(s.cache)

    def find(ref: str) -> Named:
        if pins and ref in pins:
            pin = pins[ref]
            return pin if isinstance(pin, Named) else Named.of(FeatureSet(pin), ref)
        return cache.find(ref, s.model, union)

    val, anomaly = getattr(s, "val", None), getattr(s, "anomaly", [])  # knn and fewshot have neither
    sets = RunSets(find(s.train), find(val) if val else None, find(s.test) if s.test else None,
                   {n: find(n) for n in s.eval}, {n: find(n) for n in anomaly})
    check_compatible([(f"{label} set {n.name}", n.fs) for label, n in sets.items()])
    check_distinct(sets)
    for label, n in sets.items():
        seed = n.fs.identity.get("random_init")
        if seed is not None and not s.allow_random_init:
            raise ProbeError(f"{n.name} ({n.fs.path}) holds features of random weights (extract --random-init {seed}): "
                             "a random-init ViT gives nearly the same embedding for every image, so its numbers say "
                             "nothing about the model; pass --allow-random-init for a smoke test")
    return sets


def check_distinct(sets: RunSets) -> None:
    """Each eval and anomaly set is named once, whatever the spelling (a name, its `ls` name, its path): a set
    given twice would count twice in a mean. An anomaly set holds none of the ID sets' images: the ID test set
    given as an anomaly set would score ID images as OOD."""
    for option, named in (("--eval", sets.eval), ("--anomaly", sets.anomaly)):
        seen: dict[Path, str] = {}
        for ref, n in named.items():
            first = seen.setdefault(n.fs.path.resolve(), ref)
            if first != ref:
                raise ProbeError(f"{option}: {first} and {ref} name the same set ({n.fs.path}): it would count twice "
                                 "in a mean; give it once")
    ids = [(label, n) for label, n in sets.items() if label in ("train", "val", "test")]
    for ref, n in sets.anomaly.items():
        mine = set(n.fs.shard_digests().values())
        for label, i in ids:
            common = mine & set(i.fs.shard_digests().values())
            if common:
                raise ProbeError(f"--anomaly {ref} ({n.fs.path}) holds images of the {label} set {i.name}: read from "
                                 f"{len(common)} of the same shards, its ID images would be scored as OOD; give an "
                                 "anomaly set of other images")


def check_apart(sets: RunSets, selected: bool) -> None:
    """The set the ID numbers are on (test, else val) shares no shard bytes with the set that trained the heads,
    nor with the one that selected them (a copy of a set, or one manifest under two names, is the same data)."""
    role = sets.id_role
    if role is None:
        return
    reported = getattr(sets, role)
    digests = set(reported.fs.shard_digests().values())
    others = ["train", "val"] if selected and role == "test" else ["train"]
    for other in others:
        o = getattr(sets, other)
        if o is None:
            continue
        common = digests & set(o.fs.shard_digests().values())
        if common:
            raise ProbeError(f"the {role} set {reported.name} ({reported.fs.path}), which the ID numbers are on, was "
                             f"read from {len(common)} of the same shards as the {other} set {o.name} ({o.fs.path}): "
                             f"they would be on images that {'trained' if other == 'train' else 'selected'} the "
                             "heads; name a test set of other images")


