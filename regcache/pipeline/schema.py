"""A pipeline file (DESIGN §4): the grid models × datasets, extraction settings, probe blocks, analyses, report.

Read, overridden (``--set KEY=VALUE``), ``${VARS}``-expanded and validated before any work starts;
every error names the file and the field. Relative paths are relative to the pipeline file, so a
pipeline and its manifests can move together (the shipped ones point at ``../manifests``).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import DataError, Dataset, load_manifest
from ..data.dataset import read_yaml_mapping
from ..features import FeatureError, parse_features, parse_layers

STAGES = ("extract", "probe", "analyse", "report")
#: where extraction jobs run: here, or as submitit array jobs (one part per task; local: submitit's local executor)
LAUNCHERS = ("none", "slurm", "local")
ANALYSES = ("norms", "featuremap", "tokenprobe", "attention")
#: probe settings a pipeline may give, with their types and defaults (those of `regcache probe`)
PROBE_FIELDS: dict[str, tuple[type | tuple, Any]] = {
    "lr": ((float, int, list), [0.01]), "wd": ((float, int, list), [0.0]), "optimizer": (str, "sgd"),
    "iterations": (int, 10_000), "batch_size": (int, 4096), "momentum": ((float, int), 0.9), "seed": (int, 0),
    "device": (str, "cpu"), "val_fraction": ((float, int), 0.1), "stream": (bool, False),
    "stream_window": (int, 16), "scorers": (list, ["msp", "energy", "maxlogit"]), "knn_k": (int, 50),
    "scorer_args": (dict, {}),  # {scorer: {param: value}}, as --scorer-arg scorer.param=value
    "plots": (bool, True),
    # the protocol trains on augmented views (the paper's random-resized crops): a train set of one view warns
    "augmented": (bool, False),
}
#: extraction settings (as `regcache extract` flags); None leaves the model's own default
EXTRACT_FIELDS: dict[str, tuple[type | tuple, Any]] = {
    "features": ((list, str), None), "size": (int, None), "resize": (int, None), "interpolation": (str, None),
    "crop_mode": (str, None), "mean": (list, None), "std": (list, None), "views": (int, 1), "seed": (int, 0),
    "pos_embed": (str, "timm"), "precision": (str, "fp32"), "dtype": (str, "float16"), "batch_size": (int, 64),
    "workers": (int, None), "device": (str, "auto"), "unit_rows": (int, None),
    "layers": ((list, str), None), "test_time_registers": (str, None), "test_time_patches": (str, None),
}


class PipelineError(ValueError):
    """A pipeline that cannot run as written; the message names the file and the field."""


@dataclass(frozen=True)
class ModelEntry:
    name: str                      # alias or timm name, as `--model` takes it
    checkpoint: str | None = None  # local weights (resolved path)
    args: dict = field(default_factory=dict)  # extra timm.create_model arguments
    extract: dict = field(default_factory=dict)  # extraction settings for this model (e.g. features)
    label: str = ""  # what the pipeline calls it (--models, probe and analysis blocks, reports); default: name

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)


@dataclass(frozen=True)
class DatasetEntry:
    manifest: Path
    dataset: Dataset               # the loaded manifest
    images: int | None = None      # planning estimate when the manifest has no counts
    extract: dict = field(default_factory=dict)  # extraction settings for this set only (e.g. views)

    @property
    def name(self) -> str:
        return self.dataset.name

    @property
    def num_images(self) -> int | None:
        c = self.dataset.counts
        return sum(c) if c and all(x is not None for x in c) else self.images


@dataclass(frozen=True)
class ProbeBlock:
    name: str
    features: list[tuple[str, ...]]
    train: str
    val: str | None
    test: str | None
    eval: list[str]
    anomaly: list[str]
    models: list[str]
    settings: dict                 # PROBE_FIELDS, filled with defaults

    @property
    def datasets(self) -> list[str]:
        return [n for n in (self.train, self.val, self.test, *self.eval, *self.anomaly) if n]


@dataclass(frozen=True)
class AnalysisSpec:
    name: str
    kind: str
    models: list[str]
    datasets: list[str]
    options: dict


@dataclass(frozen=True)
class Pipeline:
    path: Path
    name: str
    text_sha256: str
    overrides: dict[str, Any]
    vars: dict[str, str]
    cache: Path
    out: Path
    models: list[ModelEntry]
    datasets: list[DatasetEntry]
    extract: dict
    probes: list[ProbeBlock]
    analyses: list[AnalysisSpec]
    tables: list[str]              # probe blocks in the report, in order
    cost: dict                     # tflops and a label for device-hour estimates
    launcher: dict                 # kind (LAUNCHERS), parts per extraction, submitit parameters
    warnings: list[str] = field(default_factory=list)

    def model(self, name: str) -> ModelEntry:
        return next(m for m in self.models if m.label == name)

    def dataset(self, name: str) -> DatasetEntry:
        return next(d for d in self.datasets if d.name == name)


# --------------------------------------------------------------------------- --set and ${VARS}

def parse_overrides(pairs) -> dict[str, Any]:
    """``KEY=VALUE`` (VALUE read as YAML, so ``lr=[0.01,0.1]`` is a list) -> {KEY: value}."""
    import yaml

    out = {}
    for p in pairs:
        if "=" not in p:
            raise PipelineError(f"--set {p!r}: not KEY=VALUE")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def apply_override(doc: dict, key: str, value: Any, file: Path) -> None:
    """Set a dotted field: ``extract.precision``, ``probes.table1.iterations`` (a list item by its name or index)."""
    parts = key.split(".")
    node: Any = doc
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
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise PipelineError(f"{file}: --set {key}: '{'.'.join(parts[:i])}' is not a mapping or list")


VAR = re.compile(r"\$\{(\w+)\}")


def expand(value: Any, env: dict[str, str], where: str, missing: dict[str, str]) -> Any:
    """``${NAME}`` in every string; an unknown one goes to ``missing`` (name -> first field) and stays."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(1) in env:
                return env[m.group(1)]
            missing.setdefault(m.group(1), where)
            return m.group(0)
        return VAR.sub(sub, value)
    if isinstance(value, list):
        return [expand(v, env, f"{where}[{i}]", missing) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: expand(v, env, f"{where}.{k}" if where else k, missing) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- checked fields

class _Fields:
    """One mapping of the pipeline and where it is: typed reads whose errors name the file and the field."""

    def __init__(self, data: Any, file: Path, where: str, allowed):
        self.file, self.where = file, where
        if not isinstance(data, dict):
            raise self.error(f"must be a mapping, got {type(data).__name__}")
        self.data = data
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise self.error(f"unknown field(s) {', '.join(map(str, unknown))}; known: {', '.join(allowed)}")

    def at(self, key: str | None = None) -> str:
        return ".".join(p for p in (self.where, key) if p)

    def error(self, msg: str, key: str | None = None) -> PipelineError:
        where = self.at(key)
        return PipelineError(f"{self.file}: {f'field {where!r}: ' if where else ''}{msg}")

    def get(self, key: str, types, default: Any = None, required: bool = False) -> Any:
        v = self.data.get(key)
        if v is None:
            if required:
                raise self.error("missing", key)
            return default
        if isinstance(types, type):
            types = (types,)
        if isinstance(v, bool) and bool not in types:  # YAML's yes/no are not numbers
            raise self.error(f"must be {' or '.join(t.__name__ for t in types)}, got bool", key)
        if not isinstance(v, types):
            raise self.error(f"must be {' or '.join(t.__name__ for t in types)}, got {type(v).__name__}", key)
        return v

    def names(self, key: str, required: bool = False) -> list[str]:
        """A list of names, or one comma-separated string."""
        v = self.get(key, (list, str), [], required)
        items = [s.strip() for s in v.split(",")] if isinstance(v, str) else v
        if not all(isinstance(s, str) and s for s in items):
            raise self.error("must be a list of names", key)
        return [s for s in items if s]


def _choice(f: _Fields, key: str, value: Any, choices) -> None:
    if value is not None and value not in choices:
        raise f.error(f"{value!r} is not one of {', '.join(map(str, choices))}", key)


def _path(base: Path, text: str) -> Path:
    p = Path(os.path.expanduser(text))
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


# --------------------------------------------------------------------------- loading

def load_pipeline(path: str | os.PathLike, overrides: dict[str, Any] | None = None, *,
                  allow_unset: bool = False) -> Pipeline:
    """Read, override, expand and validate a pipeline; no model or data is loaded (manifests are read).

    ``allow_unset`` (dry runs) plans with a placeholder for an unset ``${VAR}`` and says so in ``warnings``.
    """
    import copy

    file = Path(path)
    text, raw = read_yaml_mapping(file, "pipeline", PipelineError)
    overrides = dict(overrides or {})
    doc = copy.deepcopy(raw)
    for k, v in overrides.items():
        apply_override(doc, k, v, file)
    top = _Fields(doc, file, "", ("name", "description", "vars", "cache", "out", "models", "datasets", "extract",
                                  "probes", "analyses", "report", "cost", "launcher"))
    defaults = top.get("vars", dict, {})
    for k, v in defaults.items():
        if not isinstance(v, (str, int, float)):
            raise top.error("must be a string or number", f"vars.{k}")
    # precedence: the pipeline's defaults < the environment < --set vars.NAME (already in `defaults`)
    set_vars = {k.split(".", 1)[1] for k in overrides if k.startswith("vars.")}
    env = {**{k: str(v) for k, v in defaults.items()}, **os.environ,
           **{k: str(defaults[k]) for k in set_vars if k in defaults}}
    missing: dict[str, str] = {}
    doc = expand({k: v for k, v in doc.items() if k != "vars"}, env, "", missing)
    warnings = []
    if missing:
        what = ", ".join(f"${{{k}}} (field {w!r})" for k, w in missing.items())
        if not allow_unset:
            raise PipelineError(f"{file}: not set: {what}; export it, or --set vars.NAME=VALUE")
        warnings.append(f"not set: {what}; planned with the text as it is")
    top.data = doc
    # what manifests may need too: every variable the pipeline defines or uses
    used_vars = {k: env[k] for k in [*defaults, *VAR.findall(text)] if k in env}
    base = file.absolute().parent  # relative paths read from where the file is seen (a link: the link's folder)
    with _manifest_env(used_vars):
        return _build(top, file, base, text, overrides, used_vars, warnings, allow_unset)


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
        except DataError as e:
            m = re.search(r"environment variable \$\{(\w+)\} is not set", str(e))
            if not (allow_unset and m):
                raise PipelineError(f"{file}: field {where!r}: {e}") from None
            os.environ[m.group(1)] = f"/unset-{m.group(1)}"  # a placeholder: the digest is of the text anyway
            warnings.append(f"{path}: ${{{m.group(1)}}} is not set; planned without its shards")
    raise PipelineError(f"{file}: field {where!r}: too many unset variables")


def _build(top: _Fields, file: Path, base: Path, text: str, overrides: dict, vars_: dict,
           warnings: list, allow_unset: bool) -> Pipeline:
    from ..extract import DTYPES, PRECISIONS, default_cache_root
    from ..models import POS_EMBED
    from ..probe import SCORERS

    name = top.get("name", str, required=True)
    checks = (PRECISIONS, DTYPES, POS_EMBED)
    models = []
    for i, m in enumerate(top.get("models", list, required=True)):
        where = f"models[{i}]"
        if isinstance(m, str):
            m = {"name": m}
        f = _Fields(m, file, where, ("name", "label", "checkpoint", "args", "extract"))
        ckpt = f.get("checkpoint", str)
        own = _Fields(f.get("extract", dict, {}), file, f.at("extract"), tuple(EXTRACT_FIELDS))
        models.append(ModelEntry(f.get("name", str, required=True), str(_path(base, ckpt)) if ckpt else None,
                                 dict(f.get("args", dict, {})), _extract_settings(own, *checks, base=base,
                                                                                  defaults=False),
                                 f.get("label", str, "")))
    if not models:
        raise top.error("lists no model", "models")
    if len({m.label for m in models}) < len(models):
        raise top.error("names a model twice (give each entry of one model its own label)", "models")

    ext = _Fields(top.get("extract", dict, {}), file, "extract", tuple(EXTRACT_FIELDS))
    extract = _extract_settings(ext, *checks, base=base)

    datasets = []
    for i, d in enumerate(top.get("datasets", list, required=True)):
        where = f"datasets[{i}]"
        if isinstance(d, str):
            d = {"manifest": d}
        f = _Fields(d, file, where, ("manifest", "images", "extract"))
        manifest = _path(base, f.get("manifest", str, required=True))
        ds = _load_manifest(manifest, f.at("manifest"), file, allow_unset, warnings)
        own = _Fields(f.get("extract", dict, {}), file, f.at("extract"), tuple(EXTRACT_FIELDS))
        datasets.append(DatasetEntry(manifest, ds, f.get("images", int),
                                     _extract_settings(own, *checks, base=base, defaults=False)))
    names = [d.name for d in datasets]
    if len(set(names)) < len(names):
        raise top.error(f"two manifests have the same name ({', '.join(sorted({n for n in names if names.count(n) > 1}))})",
                        "datasets")
    model_names = [m.label for m in models]
    # what some model stores (None: the defaults, which the probe checks itself)
    stored = None if extract.get("features") is None else \
        {f for m in models for f in m.extract.get("features", extract["features"])}

    probes = []
    for i, p in enumerate(top.get("probes", list, [])):
        f = _Fields(p, file, f"probes[{i}]", ("name", "models", "features", "train", "val", "test", "eval",
                                              "anomaly", *PROBE_FIELDS))
        probes.append(_probe_block(f, names, model_names, stored, SCORERS))
    if len({p.name for p in probes}) < len(probes):
        raise top.error("two probe blocks have the same name", "probes")

    analyses = []
    for i, a in enumerate(top.get("analyses", list, [])):
        f = _Fields(a, file, f"analyses[{i}]", ("name", "kind", "models", "datasets", "keys", "iterations", "seed",
                                                 "images", "registers", "similarity", "size", "resize", "display"))
        kind = f.get("kind", str, required=True)
        _choice(f, "kind", kind, ANALYSES)
        opts = {k: v for k, v in f.data.items() if k not in ("name", "kind", "models", "datasets")}
        if kind == "featuremap" and not f.names("keys"):
            raise f.error("a featuremap needs the sample keys to draw", "keys")
        if kind == "attention":
            opts["images"] = [str(_path(base, p)) for p in f.names("images", required=True)]
        analyses.append(AnalysisSpec(f.get("name", str, f"{kind}{i}"), kind, _known(f, "models", model_names),
                                     [] if kind == "attention" else _known(f, "datasets", names, required=True),
                                     opts))

    rep = _Fields(top.get("report", dict, {}), file, "report", ("tables",))
    tables = rep.names("tables") or [p.name for p in probes]
    for t in tables:
        _choice(rep, "tables", t, [p.name for p in probes])
    cost = _Fields(top.get("cost", dict, {}), file, "cost", ("tflops", "device"))
    tflops = cost.get("tflops", (int, float), 396.0)
    if tflops <= 0:
        raise cost.error("must be positive", "tflops")
    la = _Fields(top.get("launcher", dict, {}), file, "launcher", ("kind", "parts", "params"))
    launcher = {"kind": la.get("kind", str, "none"), "parts": la.get("parts", int, 1),
                "params": dict(la.get("params", dict, {}))}
    _choice(la, "kind", launcher["kind"], LAUNCHERS)
    if launcher["parts"] < 1:
        raise la.error("must be at least 1", "parts")
    cwd = Path.cwd()
    return Pipeline(
        path=file, name=name, text_sha256=hashlib.sha256(text.encode()).hexdigest(), overrides=overrides,
        vars=vars_, cache=_path(base, top.get("cache", str)) if top.get("cache", str) else default_cache_root(),
        out=_path(base, top.get("out", str)) if top.get("out", str) else cwd / "runs" / "pipelines" / name,
        models=models, datasets=datasets, extract=extract, probes=probes, analyses=analyses, tables=tables,
        cost={"tflops": float(tflops), "device": cost.get("device", str, "H100 bf16 at 40% of 989 TFLOP/s")},
        launcher=launcher, warnings=warnings)


def _known(f: _Fields, key: str, known: list[str], required: bool = False) -> list[str]:
    """Names from ``known`` (default: all of them)."""
    got = f.names(key, required)
    for n in got:
        _choice(f, key, n, known)
    return got or list(known)


def _extract_settings(f: _Fields, precisions, dtypes, pos_embed, base: Path, defaults: bool = True) -> dict:
    from ..registers import PATCH_MODES, split_spec

    out = {k: f.get(k, t, d if defaults else None) for k, (t, d) in EXTRACT_FIELDS.items()}
    out = {k: v for k, v in out.items() if defaults or v is not None}
    _choice(f, "test_time_patches", out.get("test_time_patches"), PATCH_MODES)
    if out.get("layers") is not None:
        spec = out["layers"] if isinstance(out["layers"], str) else ",".join(str(x) for x in out["layers"])
        try:
            out["layers"] = parse_layers(spec)
        except FeatureError as e:
            raise f.error(str(e), "layers") from None
    if out.get("test_time_registers"):  # FILE[:K] as extract takes it, the file relative to the pipeline
        file, k = split_spec(out["test_time_registers"])
        out["test_time_registers"] = f"{_path(base, file)}:{k}"
    _choice(f, "precision", out.get("precision"), precisions)
    _choice(f, "dtype", out.get("dtype"), dtypes)
    _choice(f, "pos_embed", out.get("pos_embed"), pos_embed)
    _choice(f, "crop_mode", out.get("crop_mode"), ("center", "squash"))
    _choice(f, "interpolation", out.get("interpolation"), ("bicubic", "bilinear", "nearest"))
    if out.get("features") is not None:
        try:
            out["features"] = parse_features(f.names("features"))
        except FeatureError as e:
            raise f.error(str(e), "features") from None
    for k in ("mean", "std"):
        if out.get(k) is not None and (len(out[k]) != 3 or not all(isinstance(x, (int, float)) for x in out[k])):
            raise f.error("must list 3 numbers (R, G, B)", k)
    for k in ("size", "resize", "views", "batch_size", "unit_rows"):
        if out.get(k) is not None and out[k] < 1:
            raise f.error("must be at least 1", k)
    return out


def _probe_block(f: _Fields, datasets: list[str], models: list[str], stored: set | None, scorers) -> ProbeBlock:
    from ..ood import make as make_scorer

    combos = []
    for j, c in enumerate(f.get("features", list, required=True)):
        try:
            combos.append(parse_features(c))
        except (FeatureError, TypeError, AttributeError) as e:
            raise f.error(f"{c!r}: {e}", f"features[{j}]") from None
    if not combos:
        raise f.error("lists no feature combination", "features")
    for c in combos:
        if stored is not None and not set(c) <= set(stored):
            raise f.error(f"[{','.join(c)}] needs {','.join(sorted(set(c) - set(stored)))}, which no model's extract.features "
                          "stores", "features")
    roles = {}
    for key in ("train", "val", "test"):
        roles[key] = f.get(key, str, required=key == "train")
        if roles[key] is not None:
            _choice(f, key, roles[key], datasets)
    lists = {k: f.names(k) for k in ("eval", "anomaly")}
    for k, names in lists.items():
        for n in names:
            _choice(f, k, n, datasets)
    settings = {k: f.get(k, t, d) for k, (t, d) in PROBE_FIELDS.items()}
    for k in ("lr", "wd"):
        v = settings[k]
        settings[k] = [float(x) for x in (v if isinstance(v, list) else [v])]
        if not settings[k]:
            raise f.error("must list at least one value", k)
    _choice(f, "optimizer", settings["optimizer"], ("sgd", "adamw"))
    for s in settings["scorers"]:
        _choice(f, "scorers", s, [*scorers, "all"])
    for name, params in settings["scorer_args"].items():
        try:
            if not isinstance(params, dict):
                raise ValueError(f"{name}: give its hyperparameters as a mapping, e.g. {{percentile: 0.9}}")
            make_scorer(name, **params)  # names, types and ranges checked as the probe will
        except ValueError as e:
            raise f.error(str(e), "scorer_args") from None
    for k in ("iterations", "batch_size", "knn_k", "stream_window"):
        if settings[k] < 1:
            raise f.error("must be at least 1", k)
    heads = len(settings["lr"]) * len(settings["wd"])
    if heads > 1 and (not roles["test"] or roles["test"] == roles["val"]):
        raise f.error(f"{heads} heads per combination (lr × wd) are selected on "
                      f"{roles['val'] or 'a held-out part of train'}; name another ID set as 'test' for the "
                      "ID numbers", "test")
    return ProbeBlock(f.get("name", str, required=True), combos, roles["train"], roles["val"], roles["test"],
                      lists["eval"], lists["anomaly"], _known(f, "models", models), settings)

