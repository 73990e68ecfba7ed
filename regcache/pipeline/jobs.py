"""A pipeline's jobs: the settings of each, its key, whether it is done, and what it costs.

An extraction job is one `extract` call (model × dataset); its key is the identity of the set it
makes (`identity.plan`: from the settings, the checkpoint's and the shards' bytes, without loading
the model), so it is done exactly when the cache holds a complete set of that identity, whoever
made it (a hand-typed `regcache extract` included). A probe or analysis job is keyed by its settings
and its input sets' fingerprints and contents; its run directory is complete when its ``job.json``
exists, written last.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import UNHASHED, shard_ids
from ..digests import file_digest
from ..features import REGISTER_FEATURES, split_name
from ..names import slug
from ..sets import Named
from ..settings import PER_MODEL, ExtractSettings, Settings
from ..store import Description, FeatureSet, find_reusable, list_feature_sets
from .load import Block, Data, Model, Pipeline

if TYPE_CHECKING:
    from ..models import ModelFacts

#: features that exist only in models with registers (also as reg@-k): combinations naming them skip models without


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ExtractJob:
    model: Model
    dataset: Data
    settings: ExtractSettings
    plan: Any = None               # identity.Plan; None while the data cannot be read (a dry run without them)
    status: str = "to do"          # to do | cached | ran | reused | part done
    path: str | None = None        # the feature set
    fingerprint: str | None = None
    why: str | None = None         # why there is no plan

    @property
    def key(self) -> str | None:
        return self.plan.fingerprint if self.plan is not None else None

    @property
    def label(self) -> str:
        return f"{self.model.label} × {self.dataset.name}"

    def facts(self) -> "ModelFacts":
        """The model's layout and cost at the crop size, from an empty model on the meta device
        (`models.model_facts`)."""
        from ..models import model_facts, preprocess_of  # here: validating a pipeline loads no torch, a dry run does

        size = self.plan.preprocess.size if self.plan is not None else preprocess_of(self.settings).size
        return model_facts(self.settings, size)

    def gflops(self) -> float:
        return self.plan.gflops if self.plan is not None else self.facts().gflops

    def has_registers(self) -> bool:
        """Trained registers (counted in the model's parameters) or test-time ones."""
        if self.plan is not None:
            return self.plan.layout.num_reg > 0
        return bool(self.settings.test_time_registers) or self.facts().layout.num_reg > 0


def extract_jobs(pl: Pipeline, models: list[str] | None = None, dry_run: bool = False) -> list[ExtractJob]:
    """One job per model × dataset, planned, and marked cached where the cache already holds its set."""
    from ..identity import plan  # here, as facts(): validating a pipeline loads no torch, planning does
    from ..models import preprocess_of

    sets = list_feature_sets(pl.cache)
    jobs = []
    for m in pl.models:
        if models and m.label not in models:
            continue
        for d in pl.datasets:
            settings = pl.extract_settings(m, d)
            if m.teacher is not None:  # a student reads its images as its teacher would, whatever its name's defaults
                teacher = preprocess_of(settings.model_copy(update={"model": m.teacher["model"]}))
                settings = settings.model_copy(update=teacher.pinned())
            job = ExtractJob(m, d, settings)
            ids = shard_ids(d.dataset, pl.cache / ".digests", read=not dry_run)  # a dry run reads no shard
            missing = [s.url for s in ids if s.digest == "missing"]
            unhashed = [s.url for s in ids if s.digest == UNHASHED]
            if m.teacher is not None and not Path(m.source["checkpoint"]).is_file():
                job.why = "its student is distilled first (stage distill)"
            elif missing and dry_run:
                job.why = f"{len(missing)} of its {len(ids)} shards are not there (e.g. {missing[0]})"
            elif unhashed:
                job.why = (f"{len(unhashed)} of its {len(ids)} shards not hashed yet (a dry run reads no shard; the "
                           "extraction hashes each once and remembers it)")
            else:
                job.plan = plan(job.settings, d.dataset, ids)
                found = find_reusable(pl.cache, job.plan.identity, sets)
                if found is not None and found.unusable() is None:
                    job.status, job.path, job.fingerprint = "cached", str(found.path), found.fingerprint
            jobs.append(job)
    return jobs


def passes(jobs: list[ExtractJob]) -> list[list[ExtractJob]]:
    """Extraction jobs grouped into passes: one per dataset and shared settings (all but the per-model ones,
    `settings.PER_MODEL`), so that each shard is read and decoded once for all the models of a pass."""
    groups: dict[str, list[ExtractJob]] = {}
    for j in jobs:
        shared = j.settings.model_dump(mode="json", exclude=set(PER_MODEL))
        groups.setdefault(digest(shared), []).append(j)
    return list(groups.values())


@dataclass
class RunJob:
    """A probe or analysis job: its settings, the sets it reads (by dataset name), its key and run directory."""

    block: Block
    models: list[Model]                # norms: all of them side by side; other kinds: one
    settings: Settings | None = None
    inputs: dict[str, str | None] = field(default_factory=dict)  # "model/dataset" -> fingerprint:content
    paths: dict[str, str | None] = field(default_factory=dict)   # "model/dataset" -> feature-set path
    key: str | None = None
    run: Path | None = None
    status: str = "to do"
    skipped: str | None = None         # why this model has no job in this block

    @property
    def model(self) -> Model:
        return self.models[0]

    @property
    def label(self) -> str:
        return f"{self.block.name} × {', '.join(m.label for m in self.models)}"

    descriptions: dict[str, Any] = field(default_factory=dict)  # dataset name -> its manifest's Description

    @property
    def pins(self) -> dict[str, Any]:
        """Dataset name -> the set this pipeline made for it (one model's), read with the manifest's meaning."""
        return {name: Named(FeatureSet(p), self.descriptions[name])
                for name, p in ((k.split("/", 1)[1], p) for k, p in self.paths.items()) if p}


def _inputs(job: RunJob, sets: dict[tuple[str, str], ExtractJob]) -> None:
    for m in job.models:
        for n in job.block.datasets:
            ej = sets.get((m.label, n))
            k = f"{m.label}/{n}"
            if ej:
                job.descriptions[n] = Description(**ej.dataset.dataset.description())
            if ej and ej.path:
                job.inputs[k], job.paths[k] = f"{ej.fingerprint}:{FeatureSet(ej.path).content_id()}", ej.path
            else:
                job.inputs[k], job.paths[k] = None, None


def _key_and_run(job: RunJob, pl: Pipeline, group: str) -> None:
    if all(job.inputs.values()) and job.settings is not None:
        names = "+".join(m.label for m in job.models)
        # what each input's rows mean (classes, subset, role, split) is part of the key: correcting a manifest
        # reruns exactly the jobs that read it
        meanings = {n: d.model_dump(mode="json") for n, d in sorted(job.descriptions.items())}
        job.key = digest({"kind": job.block.kind, "settings": job.settings.model_dump(mode="json", exclude={"out"}),
                          "models": names, "inputs": job.inputs, "descriptions": meanings})
        job.run = pl.out / group / slug(job.block.name) / f"{slug(names)}-{job.key[:12]}"
        f = job.run / "job.json"
        if f.is_file() and json.loads(f.read_text()).get("key") == job.key:
            job.status = "cached"


def _backbone_inputs(s: Settings, pl: Pipeline) -> dict[str, str]:
    """What an analysis that runs a backbone on image files reads: the images' bytes and the weights."""
    from ..identity import weights_of
    from ..models import preprocess_of

    out = {str(p): file_digest(p) if Path(p).is_file() else "missing" for p in s.images}
    out["weights"] = digest(weights_of(s, preprocess_of(s).size, pl.cache / ".digests"))
    return out


def probe_jobs(pl: Pipeline, ext: list[ExtractJob], models: list[str] | None = None) -> list[RunJob]:
    """One job per probe block × model; combinations that need registers skip models without them."""
    sets = {(j.model.label, j.dataset.name): j for j in ext}
    jobs = []
    for b in pl.probes:
        for label in b.models:
            if models and label not in models:
                continue
            m = pl.model(label)
            job = RunJob(b, [m])
            s = pl.probe_settings(b, m)
            train = sets.get((label, s.train))
            regs = train.has_registers() if train else True
            combos = [c for c in s.features if regs or not {split_name(f)[0] for f in c} & set(REGISTER_FEATURES)]
            if not combos:
                job.skipped, job.status = "every combination needs registers, which this model has not", "skipped"
            else:
                job.settings = s.model_copy(update={"features": combos})
                _inputs(job, sets)
                _key_and_run(job, pl, "runs")
            jobs.append(job)
    return jobs


def analysis_jobs(pl: Pipeline, ext: list[ExtractJob], models: list[str] | None = None) -> list[RunJob]:
    """One job per analysis block × model; norms draws every model's sets side by side in one job."""
    sets = {(j.model.label, j.dataset.name): j for j in ext}
    jobs = []
    for b in pl.analyses:
        chosen = [pl.model(n) for n in b.models if not models or n in models]
        groups = [chosen] if b.kind == "norms" and chosen else [[m] for m in chosen]
        for group in groups:
            job = RunJob(b, group)
            _inputs(job, sets)
            if b.kind == "attention":  # reads images and the model, no cached set: keyed by their bytes
                job.settings = pl.analysis_settings(b, group)
                job.inputs = _backbone_inputs(job.settings, pl)
            elif all(job.paths.values()):  # the sets by path: the ones this pipeline made
                job.settings = pl.analysis_settings(
                    Block(b.kind, b.name, b.models, {**b.given, "sets": list(job.paths.values())}), group)
            _key_and_run(job, pl, "analyses")
            jobs.append(job)
    return jobs
