"""A pipeline's jobs: what each one is, its key, whether it is done, and what it costs.

An extraction job is one `extract` call (model × dataset). Its key hashes what determines the set
without loading the model (the model's name and arguments, a cheap digest of a checkpoint file,
preprocessing, precision, features, the dataset's digest); a record under ``OUT/jobs/`` maps the
key to the set extract made, so a rerun finds it with no backbone work. A probe (or analysis) job
is keyed by its settings and its input sets' fingerprints; its run directory is complete when its
``job.json`` exists, written last.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import AnalysisSpec, DatasetEntry, ModelEntry, Pipeline, ProbeBlock

#: GFLOP per image at 224 px by model size (BENCHMARKS.md: DINOv2 ViT-S/B/L/g-14); scaled by (size/224)²
GFLOPS_224: dict[str, float] = {"small": 12.5, "base": 47.0, "large": 165.0, "giant": 608.0}
#: features that exist only in models with registers (also as reg@-k): combinations naming them skip models without
REGISTER_FEATURES = ("reg", "reg_all")


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_")


@dataclass
class ExtractJob:
    model: ModelEntry
    dataset: DatasetEntry
    settings: dict           # the pipeline's extraction settings with the dataset's on top
    key: str
    record: Path             # OUT/jobs/extract/KEY.json once done
    status: str = "to do"    # to do | cached | ran | reused
    path: str | None = None  # the feature set
    fingerprint: str | None = None
    num_reg: int | None = None  # from the set's layout once known

    @property
    def label(self) -> str:
        return f"{self.model.label} × {self.dataset.name}"

    def config(self, cache: Path, progress: bool):
        """The ExtractConfig a hand-typed `regcache extract` with these flags would build."""
        from ..extract import ExtractConfig
        from ..models import preprocess_for

        s = self.settings
        pre = preprocess_for(self.model.name, size=s.get("size"), resize=s.get("resize"),
                             interpolation=s.get("interpolation"), mean=tuple(s["mean"]) if s.get("mean") else None,
                             std=tuple(s["std"]) if s.get("std") else None, crop_mode=s.get("crop_mode"),
                             views=s["views"], seed=s["seed"])
        return ExtractConfig(model=self.model.name, data=str(self.dataset.manifest), features=s.get("features"),
                             cache=cache, checkpoint=self.model.checkpoint, model_kwargs=dict(self.model.args),
                             preprocess=pre, pos_embed=s["pos_embed"], precision=s["precision"], dtype=s["dtype"],
                             batch_size=s["batch_size"], workers=s["workers"], device=s["device"],
                             unit_rows=s.get("unit_rows"), layers=s.get("layers"),
                             test_time_registers=s.get("test_time_registers"),
                             test_time_patches=s.get("test_time_patches") or "zero", progress=progress)

    def gflops(self) -> float | None:
        """Per image, from the model's size class and the crop size; None for an unknown size class."""
        from ..models import ALIASES

        name = ALIASES.get(self.model.name, self.model.name)
        size = next((v for k, v in GFLOPS_224.items() if f"_{k}_" in name), None)
        if size is None:
            return None
        crop = self.settings.get("size") or 224
        return size * (crop / 224) ** 2

    def has_registers(self) -> bool:
        """From the extracted set's layout; before extraction, from the name (aliases *_reg, timm *_reg4_*)."""
        if self.num_reg is not None:
            return self.num_reg > 0
        if self.settings.get("test_time_registers"):
            return True
        from ..models import ALIASES

        name = ALIASES.get(self.model.name, self.model.name)
        return bool(re.search(r"(^|_)reg\d*(_|\.|$)", name)) or "dinov3" in name


def _extras(s: dict) -> dict:
    """Settings that change a set only when given: block features, test-time registers (by the file's digest)."""
    from ..data import shard_id
    from ..registers import split_spec

    out = {}
    if s.get("layers"):
        out["layers"] = list(s["layers"])
    if s.get("test_time_registers"):
        file, k = split_spec(s["test_time_registers"])
        out["test_time_registers"] = {"file": shard_id(file).digest, "k": k,
                                      "patches": s.get("test_time_patches") or "zero"}
    return out


def weights_id(m: ModelEntry) -> str:
    """The weights without loading them: a checkpoint's size and sampled bytes, or the hub's name.tag."""
    from ..data import shard_id
    from ..models import resolve_name

    return shard_id(m.checkpoint).digest if m.checkpoint else "hub:" + resolve_name(m.name)


def extract_jobs(pl: Pipeline, models: list[str] | None = None) -> list[ExtractJob]:
    from ..models import ModelSpec

    jobs = []
    for m in pl.models:
        if models and m.label not in models:
            continue
        spec = ModelSpec(m.name, m.checkpoint, dict(m.args))
        weights = weights_id(m)
        for d in pl.datasets:
            s = {**pl.extract, **m.extract, **d.extract}  # the most specific wins
            job = ExtractJob(m, d, s, "", Path())
            pre = job.config(pl.cache, False).preprocess
            job.key = digest({"model": spec.timm_name, "kwargs": spec.kwargs, "weights": weights,
                              "pos_embed": s["pos_embed"], "preprocess": pre.to_dict(), "precision": s["precision"],
                              "dtype": s["dtype"], "features": s.get("features"), "dataset": d.dataset.digest,
                              **_extras(s)})
            job.record = pl.out / "jobs" / "extract" / f"{_slug(m.label)}__{_slug(d.name)}__{job.key[:16]}.json"
            _check_record(job)
            jobs.append(job)
    return jobs


def _check_record(job: ExtractJob) -> None:
    """Cached when the recorded set is still there, complete, usable and the same (by fingerprint)."""
    from ..store import FeatureSet, StoreError

    if not job.record.is_file():
        return
    rec = json.loads(job.record.read_text())
    try:
        fs = FeatureSet(rec["path"])
    except (StoreError, OSError):
        return
    if rec.get("key") == job.key and fs.fingerprint == rec["fingerprint"] and fs.complete and fs.unusable() is None:
        job.status, job.path, job.fingerprint = "cached", str(fs.path), fs.fingerprint
        job.num_reg = fs.layout.num_reg


def write_record(job: ExtractJob) -> None:
    job.record.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": job.key, "model": job.model.label, "dataset": job.dataset.name,
                               "path": job.path, "fingerprint": job.fingerprint}, indent=2))
    tmp.replace(job.record)


@dataclass
class ProbeJobPlan:
    block: ProbeBlock
    model: ModelEntry
    combos: list[tuple[str, ...]]
    inputs: dict[str, str | None] = field(default_factory=dict)  # dataset -> fingerprint:content (None: not made yet)
    paths: dict[str, str | None] = field(default_factory=dict)
    key: str | None = None
    run: Path | None = None
    status: str = "to do"
    skipped: str | None = None   # why this model has no head in this block

    @property
    def label(self) -> str:
        return f"{self.block.name} × {self.model.label}"


@dataclass
class AnalysisJob:
    spec: AnalysisSpec
    models: list[ModelEntry]       # norms: all of them side by side; other kinds: one
    inputs: dict[str, str | None] = field(default_factory=dict)  # "model/dataset" -> fingerprint
    paths: dict[str, str | None] = field(default_factory=dict)
    key: str | None = None
    run: Path | None = None
    status: str = "to do"

    @property
    def model(self) -> ModelEntry:
        return self.models[0]

    @property
    def label(self) -> str:
        return f"{self.spec.name} ({self.spec.kind}) × {', '.join(m.label for m in self.models)}"


def _done(run: Path, key: str) -> bool:
    f = run / "job.json"
    return f.is_file() and json.loads(f.read_text()).get("key") == key


def _inputs(job, names: list[str], sets: dict[tuple[str, str], ExtractJob], models=None) -> None:
    """Input fingerprints by dataset (one model), or by model/dataset (several)."""
    for m in models or [job.model]:
        for n in names:
            ej = sets.get((m.label, n))
            k = f"{m.label}/{n}" if models else n
            job.inputs[k], job.paths[k] = (_content(ej), ej.path) if ej and ej.fingerprint else (None, None)


def _content(ej: ExtractJob) -> str:
    """A set's settings and the shard bytes its rows were read from: a re-extracted set is a new input."""
    from ..store import FeatureSet

    return f"{ej.fingerprint}:{FeatureSet(ej.path).content_id()}"


def _key_and_run(job, pl: Pipeline, group: str, what: dict) -> None:
    if all(job.inputs.values()):
        names = "+".join(m.label for m in getattr(job, "models", [job.model]))
        job.key = digest({**what, "model": names, "inputs": job.inputs})
        job.run = pl.out / group / _slug(what["name"]) / f"{_slug(names)}-{job.key[:12]}"
        if _done(job.run, job.key):
            job.status = "cached"


def probe_jobs(pl: Pipeline, ext: list[ExtractJob], models: list[str] | None = None) -> list[ProbeJobPlan]:
    sets = {(j.model.label, j.dataset.name): j for j in ext}
    jobs = []
    for b in pl.probes:
        for name in b.models:
            if models and name not in models:
                continue
            m = pl.model(name)
            train = sets.get((name, b.train))
            regs = train.has_registers() if train else True
            combos = [c for c in b.features if regs or not {f.split("@")[0] for f in c} & set(REGISTER_FEATURES)]
            job = ProbeJobPlan(b, m, combos)
            if not combos:
                job.skipped, job.status = "every combination needs registers, which this model has not", "skipped"
            else:
                _inputs(job, b.datasets, sets)
                _key_and_run(job, pl, "runs", {"name": b.name, "combos": combos, "train": b.train, "val": b.val,
                                               "test": b.test, "eval": b.eval, "anomaly": b.anomaly,
                                               **{k: v for k, v in b.settings.items() if k != "plots"}})
            jobs.append(job)
    return jobs


def analysis_jobs(pl: Pipeline, ext: list[ExtractJob], models: list[str] | None = None) -> list[AnalysisJob]:
    sets = {(j.model.label, j.dataset.name): j for j in ext}
    jobs = []
    for a in pl.analyses:
        chosen = [pl.model(n) for n in a.models if not models or n in models]
        groups = [chosen] if a.kind == "norms" and chosen else [[m] for m in chosen]
        for group in groups:
            job = AnalysisJob(a, group)
            _inputs(job, a.datasets, sets, group if a.kind == "norms" else None)
            if a.kind == "attention":  # reads images and the model, no cached set
                job.inputs = {"images": digest(a.options.get("images")), "weights": weights_id(job.model)}
            _key_and_run(job, pl, "analyses", {"name": a.name, "kind": a.kind, **a.options})
            jobs.append(job)
    return jobs
