"""Reading a pipeline file (docs/pipelines.md): overridden (``--set KEY=VALUE``), ``${VARS}``-expanded and
validated (`blocks`) before any work starts; every error names the file and the field path (``probes[0].C``).
Relative paths are relative to the pipeline file, so a pipeline and its manifests can move together.
"""
from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .. import yamlio
from ..data import VAR, DataError, Dataset, UnsetVariable, expand_vars, load_manifest
from ..data.dataset import read_yaml_mapping
from ..settings import (ANALYSES, DistillSettings, ExtractSettings, ProbeSettings, Settings, SettingsError,
                        default_cache_root, describe, meta, split_spec)
from .blocks import _BACKBONE_SOURCE, DatasetEntry, ModelEntry, PipelineError, PipelineFile

# --------------------------------------------------------------------------- the loaded pipeline

@dataclass(frozen=True)
class Model:
    """A models[] entry: the backbone part of its settings, its own extraction block, and its distill block if the
    pipeline distils registers into it (`students`: its sets are then the student's, ``source`` the student's)."""

    label: str
    source: dict          # model, checkpoint, random_init, model_args: as ExtractSettings takes them
    extract: dict         # given fields of its extract block
    distill: dict | None = None  # given fields of its distill block (data resolved against the pipeline's folder)
    teacher: dict | None = None  # a distilled entry's own backbone, once ``source`` is its student's

    @property
    def name(self) -> str:
        return self.source["model"]


@dataclass(frozen=True)
class Data:
    manifest: Path
    dataset: Dataset               # the loaded manifest
    images: int | None = None      # planning estimate when the manifest has no counts
    extract: dict = field(default_factory=dict)  # given fields of its extract block

    @property
    def name(self) -> str:
        return self.dataset.name

    @property
    def num_images(self) -> int | None:
        c = self.dataset.counts
        return sum(c) if c and all(x is not None for x in c) else self.images


@dataclass(frozen=True)
class Block:
    """A probe or analysis block: its kind, name, models (labels) and the settings it gives."""

    kind: str                      # probe, or an analysis kind
    name: str
    models: list[str]
    given: dict

    @property
    def datasets(self) -> list[str]:
        """The pipeline datasets the block reads."""
        g = self.given
        return [n for n in (g.get("train"), g.get("val"), g.get("test"), *g.get("eval", []), *g.get("anomaly", []),
                            *g.get("sets", [])) if n]


@dataclass(frozen=True)
class Pipeline:
    path: Path
    name: str
    text_sha256: str
    overrides: dict[str, Any]
    vars: dict[str, str]
    cache: Path
    out: Path
    models: list[Model]
    datasets: list[Data]
    extract: dict                  # given fields of the top-level extract block
    probes: list[Block]
    analyses: list[Block]
    tables: list[str]              # probe blocks in the report, in order
    pool_seeds: bool               # the report opens with their runs pooled over seeds
    cost: dict                     # tflops and a label for device-hour estimates
    launcher: dict                 # kind (LAUNCHERS), parts per extraction, submitit parameters
    warnings: list[str] = field(default_factory=list)

    def model(self, label: str) -> Model:
        return next(m for m in self.models if m.label == label)

    def dataset(self, name: str) -> Data:
        return next(d for d in self.datasets if d.name == name)

    def extract_settings(self, m: Model, d: Data) -> ExtractSettings:
        """The settings of one extraction: the file's extract block < the model's < the dataset's (the most
        specific wins), with the model entry's backbone, the dataset's manifest and the pipeline's cache."""
        return ExtractSettings.make({**self.extract, **m.extract, **d.extract, **m.source, "data": str(d.manifest),
                                     "cache": self.cache, "quiet": True},
                                    where=f"{self.path}: models[{m.label}] × datasets[{d.name}]")

    def distill_settings(self, m: Model, out: Path) -> DistillSettings:
        """A distilled entry's distillation: its distill block with the entry's own backbone as the teacher."""
        return DistillSettings.make({**m.distill, **(m.teacher or m.source), "out": out, "cache": self.cache,
                                     "quiet": True}, where=f"{self.path}: models[{m.label}].distill")

    def probe_settings(self, b: Block, m: Model) -> ProbeSettings:
        """The settings of one probe job: the block's, for this model, reading the pipeline's cache."""
        return ProbeSettings.make({**b.given, "model": m.name, "cache": self.cache},
                                  where=f"{self.path}: probes[{b.name}]")

    def analysis_settings(self, b: Block, models: list[Model]) -> Settings:
        """An analysis job's settings: the block's; one that runs a backbone also takes the model entry's
        backbone and the backbone settings its sets were extracted with (so that, e.g., its test-time
        registers and position-table resampling are those of its sets), unless the block gives them."""
        cls = ANALYSES[b.kind]
        values = dict(b.given)
        if "cache" in cls.model_fields:
            values["cache"] = self.cache
        if "model" in cls.model_fields and len(models) == 1:
            values["model"] = models[0].name
        if "model" in cls.model_fields and cls.model_fields["model"].is_required():
            m = models[0]
            merged = {**self.extract, **m.extract, **m.source}
            values = {**{k: v for k, v in merged.items() if k in cls.model_fields}, **values}
        return cls.make(values, where=f"{self.path}: analyses[{b.name}]")


# --------------------------------------------------------------------------- --set and ${VARS}

def parse_overrides(pairs) -> dict[str, Any]:
    """``KEY=VALUE`` (VALUE read as YAML, so ``lr=[0.01,0.1]`` is a list) -> {KEY: value}; a KEY given twice, or a
    key given twice inside a VALUE, is refused."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise PipelineError(f"--set {p!r}: not KEY=VALUE")
        k, v = (x.strip() for x in p.split("=", 1))
        if k in out:
            raise PipelineError(f"--set {k} is given twice ({k}={out[k]!r} and {p!r}): give it once")
        try:
            out[k] = yamlio.load(v)
        except yamlio.DuplicateKey as e:
            raise PipelineError(f"--set {p}: {e}") from None
        except yaml.YAMLError:
            out[k] = v
    return out


def apply_override(doc: dict, key: str, value: Any, file: Path) -> tuple:
    """Set a dotted field: ``extract.precision``, ``probes.table1.iterations`` (a list item by its name or index).
    Returns the field's resolved path (list items by index), so that two keys of one field are found."""
    parts = key.split(".")
    node: Any = doc
    where: list = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = next((j for j, x in enumerate(node) if isinstance(x, dict) and x.get("name") == part), None)
            if idx is None and part.isdigit() and int(part) < len(node):
                idx = int(part)
            if idx is None:
                raise PipelineError(f"{file}: --set {key}: no item {part!r} in '{'.'.join(parts[:i])}'")
            if last:
                node[idx] = value
            node = node[idx]
            where.append(idx)
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            where.append(part)
        else:
            raise PipelineError(f"{file}: --set {key}: '{'.'.join(parts[:i])}' is not a mapping or list")
    return tuple(where)


def expand(value: Any, env: dict[str, str], where: str, missing: dict[str, str]) -> Any:
    """``${NAME}`` in every string; an unknown one goes to ``missing`` (name -> first field) and stays."""
    if isinstance(value, str):
        return expand_vars(value, where, env, missing)
    if isinstance(value, list):
        return [expand(v, env, f"{where}[{i}]", missing) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: expand(v, env, f"{where}.{k}" if where else k, missing) for k, v in value.items()}
    return value


class _manifest_env:
    """Manifests read ``${VARS}`` from the environment: give them the pipeline's values while loading
    (and running: `extract` reads the manifest again), restored afterwards."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def __enter__(self):
        self.saved = dict(os.environ)
        os.environ.update({k: v for k, v in self.env.items() if k not in os.environ or os.environ[k] != v})
        return self

    def __exit__(self, *exc):
        os.environ.clear()
        os.environ.update(self.saved)


def pipeline_env(pl: Pipeline) -> _manifest_env:
    """The environment a pipeline's manifests are read in (its ``vars``), for as long as it runs."""
    return _manifest_env(pl.vars)


def _load_manifest(path: Path, where: str, file: Path, allow_unset: bool, warnings: list) -> Dataset:
    for _ in range(16):
        try:
            return load_manifest(path)
        except UnsetVariable as e:
            if not allow_unset:
                raise PipelineError(f"{file}: field {where!r}: {e}") from None
            os.environ[e.name] = f"/unset-{e.name}"  # a placeholder: the shards are not read
            warnings.append(f"{path}: ${{{e.name}}} is not set; planned without its shards")
        except DataError as e:
            raise PipelineError(f"{file}: field {where!r}: {e}") from None
    raise PipelineError(f"{file}: field {where!r}: too many unset variables")




# --------------------------------------------------------------------------- loading

def _path(base: Path, text: str) -> str:
    p = Path(os.path.expanduser(text))
    return os.path.normpath(p if p.is_absolute() else base / p)


def _paths(values: dict, cls: type[Settings], base: Path) -> dict:
    """File fields (`Meta.path`) relative to the pipeline's folder; ``FILE[:K]`` keeps its K."""
    out = dict(values)
    for name, v in values.items():
        if name not in cls.model_fields or not meta(cls, name).path or v is None:
            continue
        if name == "test_time_registers":
            file, k = split_spec(str(v))
            out[name] = f"{_path(base, file)}:{k}"
        elif isinstance(v, (list, tuple)):
            out[name] = [_path(base, str(x)) for x in v]
        else:
            out[name] = _path(base, str(v))
    return out


def load_pipeline(path: str | os.PathLike, overrides: dict[str, Any] | None = None, *,
                  allow_unset: bool = False) -> Pipeline:
    """Read, override, expand and validate a pipeline; no model or data is loaded (manifests are read).

    ``allow_unset`` (dry runs) plans with a placeholder for an unset ``${VAR}`` and says so in ``warnings``.
    """
    file = Path(path)
    text, raw = read_yaml_mapping(file, "pipeline", PipelineError)
    overrides = dict(overrides or {})
    doc = copy.deepcopy(raw)
    done: dict[str, tuple] = {}
    for k, v in overrides.items():
        at = apply_override(doc, k, v, file)
        clash = next((o for o, p in done.items() if p[:len(at)] == at or at[:len(p)] == p), None)
        if clash is not None:  # one field set twice (by name and by index, or a block and one of its fields)
            raise PipelineError(f"{file}: --set {clash} and --set {k} set the same field: give it once")
        done[k] = at
    defaults = doc.get("vars") or {}
    if not isinstance(defaults, dict):
        raise PipelineError(f"{file}: vars: must be a mapping of NAME: value")
    # precedence: the pipeline's defaults < the environment < --set vars.NAME (already in `defaults`)
    set_vars = {k.split(".", 1)[1] for k in overrides if k.startswith("vars.")}
    env = {**{k: str(v) for k, v in defaults.items()}, **os.environ,
           **{k: str(defaults[k]) for k in set_vars if k in defaults}}
    missing: dict[str, str] = {}
    doc = {**expand({k: v for k, v in doc.items() if k != "vars"}, env, "", missing), "vars": defaults}
    warnings = []
    if missing:
        what = ", ".join(f"${{{k}}} (field {w!r})" for k, w in missing.items())
        if not allow_unset:
            raise PipelineError(f"{file}: not set: {what}; export it, or --set vars.NAME=VALUE")
        warnings.append(f"not set: {what}; planned with the text as it is")
    try:
        spec = PipelineFile.model_validate(doc)
    except ValidationError as e:
        raise PipelineError(f"{file}: {describe(e)}") from None
    # what manifests may need too: every variable the pipeline defines or uses
    used_vars = {k: env[k] for k in [*defaults, *VAR.findall(text)] if k in env}
    base = file.absolute().parent  # relative paths read from where the file is seen (a link: the link's folder)
    with _manifest_env(used_vars):
        pl = _build(spec, file, base, text, overrides, used_vars, warnings, allow_unset)
    _check_settings(pl)
    return pl


def _build(spec: PipelineFile, file: Path, base: Path, text: str, overrides: dict, vars_: dict,
           warnings: list, allow_unset: bool) -> Pipeline:
    models = []
    for m in spec.models:
        m = ModelEntry(model=m) if isinstance(m, str) else m
        source = _paths({"model": m.model, **{k: getattr(m, k) for k in _BACKBONE_SOURCE if k in m.model_fields_set}},
                        ExtractSettings, base)
        distill = None if m.distill is None else _paths(m.distill.given(), DistillSettings, base)
        models.append(Model(m.label or m.model, source, _paths(m.extract.given(), ExtractSettings, base), distill))
    datasets = []
    for i, d in enumerate(spec.datasets):
        d = DatasetEntry(manifest=d) if isinstance(d, str) else d
        manifest = Path(_path(base, d.manifest))
        ds = _load_manifest(manifest, f"datasets[{i}].manifest", file, allow_unset, warnings)
        datasets.append(Data(manifest, ds, d.images, _paths(d.extract.given(), ExtractSettings, base)))
    names = [d.name for d in datasets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PipelineError(f"{file}: datasets: two manifests have the same name ({', '.join(twice)})")
    labels = [m.label for m in models]

    def known(where: str, got: list[str], choices: list[str], what: str) -> list[str]:
        bad = [n for n in got if n not in choices]
        if bad:
            raise PipelineError(f"{file}: {where}: {', '.join(bad)} not among the pipeline's {what} "
                                f"({', '.join(choices)})")
        return got or list(choices)

    probes = []
    for i, p in enumerate(spec.probes):
        given = p.given()
        b = Block("probe", given.pop("name"), known(f"probes[{i}].models", given.pop("models", []), labels, "models"),
                  given)
        known(f"probes[{i}]", b.datasets, names, "datasets")
        probes.append(b)
    analyses = []
    for i, a in enumerate(spec.analyses):
        given = _paths(a.given(), ANALYSES[a.kind], base)
        kind, name = given.pop("kind"), given.pop("name", None) or f"{a.kind}{i}"
        b = Block(kind, name, known(f"analyses[{i}].models", given.pop("models", []), labels, "models"), given)
        known(f"analyses[{i}].sets", b.datasets, names, "datasets")
        analyses.append(b)
    tables = known("report.tables", spec.report.tables, [p.name for p in probes], "probe blocks")
    return Pipeline(
        path=file, name=spec.name, text_sha256=hashlib.sha256(text.encode()).hexdigest(), overrides=overrides,
        vars=vars_, cache=Path(_path(base, spec.cache)) if spec.cache else default_cache_root(),
        out=Path(_path(base, spec.out)) if spec.out else Path.cwd() / "runs" / "pipelines" / spec.name,
        models=models, datasets=datasets, extract=_paths(spec.extract.given(), ExtractSettings, base), probes=probes,
        analyses=analyses, tables=tables, pool_seeds=spec.report.pool_seeds, cost=spec.cost.model_dump(),
        launcher=spec.launcher.model_dump(), warnings=warnings)


def _check_settings(pl: Pipeline) -> None:
    """Every job's whole settings, checked now (before any work) with what each block merges in, so that a
    value wrong only in combination (a streamed set without val) fails at load, naming the block."""
    try:
        for m in pl.models:
            if m.distill is not None:
                pl.distill_settings(m, pl.cache / "distilled" / "check.safetensors")
        for m in pl.models:
            for d in pl.datasets:
                pl.extract_settings(m, d)
        for b in pl.probes:
            for label in b.models:
                pl.probe_settings(b, pl.model(label))
        for b in pl.analyses:
            for label in b.models:
                pl.analysis_settings(b, [pl.model(label)])
    except SettingsError as e:
        raise PipelineError(str(e)) from None
