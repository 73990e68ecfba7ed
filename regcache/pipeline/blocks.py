"""A pipeline file's format (docs/pipelines.md): its blocks, made from the settings models, and its JSON Schema.

Every block is validated by the settings model of its action (`regcache.settings`): an extract block takes every
extraction setting, a probe block every probe setting, an analysis block its kind's, a distill block the
distillation's. The pipeline's structure gives the rest (a models[] entry the model and its weights, datasets[]
the data, the file the cache). `schema` is the JSON Schema of the file, for editors; `load` reads a file.
"""
from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, create_model, model_validator

from ..settings import ANALYSES, Backbone, DistillSettings, ExtractSettings, ProbeSettings, Settings, fields
from ..settings.choices import PIPELINE_LAUNCHERS, STAGES, literal
from ..settings.presets import Preset, presets_of
from ..settings.types import Count, Names, Positive

STAGES = tuple(STAGES)


class PipelineError(ValueError):
    """A pipeline that cannot run as written; the message names the file and the field."""


# --------------------------------------------------------------------------- the file's blocks, from the settings

def block(title: str, source: type[Settings], /, exclude: tuple[str, ...] = (), doc: str = "",
          presets: dict[str, Preset] | None = None, **extra: Any) -> type[Settings]:
    """A block of a pipeline file: the fields of ``source`` that a block may give (scope ``any``, but
    ``exclude``), with their types, defaults, checks and help, the source's checks of the raw values (a preset
    fills a block as it fills the command), and ``extra`` fields of the pipeline's own. A required field that one
    of ``presets`` sets is required unless that preset is named, in the JSON Schema too."""
    own = {n: (source.model_fields[n].annotation, copy.copy(source.model_fields[n]))
           for n in fields(source, scope=("any",)) if n not in exclude}
    before = {name: model_validator(mode="before")(classmethod(getattr(d.func, "__func__", d.func)))
              for name, d in source.__pydantic_decorators__.model_validators.items() if d.info.mode == "before"}
    either = []
    for n, (kind, info) in own.items():
        filling = sorted(p for p, preset in (presets or {}).items() if n in preset.settings)
        if info.is_required() and filling:
            info.default = None
            either.append({"anyOf": [{"required": [n]}, {"required": ["preset"],
                                                         "properties": {"preset": {"enum": filling}}}]})
    base = type(f"{title}Base", (Settings,), {"model_config": {**Settings.model_config,
                                                               "json_schema_extra": {"allOf": either}}}
                ) if either else Settings
    return create_model(title, __base__=base, __doc__=doc or source.__doc__, __validators__=before, **own,
                        **extra)


Label = Annotated[str, Field(description="What the pipeline calls this entry (--models, probe and analysis "
                                         "blocks, the report) [default: the model].")]
Models = Annotated[Names, Field(default_factory=list, description="The models (labels) this block runs for "
                                                                  "[default: all].")]
ExtractBlock = block("ExtractBlock", ExtractSettings, doc="Extraction settings (as `regcache extract` takes them).")
_BACKBONE_SOURCE = ("checkpoint", "random_init", "model_args")
#: a distill block: the distillation's settings but the teacher (the entry's backbone), the output and the cache
DistillBlock = block("DistillBlock", DistillSettings, exclude=(*Backbone.model_fields, "out", "cache"),
                     doc="Post-hoc registers (as `regcache registers distill` takes them); data is a manifest.")
ModelEntry = create_model(
    "ModelEntry", __base__=Settings, __doc__="A backbone: a model with its weights, and its own extraction settings.",
    model=(str, ExtractSettings.model_fields["model"]),
    label=(Label, ""),
    **{n: (ExtractSettings.model_fields[n].annotation, copy.copy(ExtractSettings.model_fields[n]))
       for n in _BACKBONE_SOURCE},
    extract=(ExtractBlock, Field(default_factory=ExtractBlock, description="Extraction settings for this model.")),
    distill=(Optional[DistillBlock], Field(None, description="Post-hoc registers (PH-Reg): the pipeline distils "
                                                             "them into this model first and extracts with the "
                                                             "student (`regcache registers distill`).")))
DatasetEntry = create_model(
    "DatasetEntry", __base__=Settings, __doc__="A dataset: its manifest, and its own extraction settings.",
    manifest=(str, Field(description="The manifest file (relative to the pipeline file).")),
    images=(Optional[Count], Field(None, description="Images, for --dry-run's cost while the manifest has no "
                                                     "counts (regcache manifest scan adds them).")),
    extract=(ExtractBlock, Field(default_factory=ExtractBlock, description="Extraction settings for this set.")))
ProbeBlock = block("ProbeBlock", ProbeSettings, doc="A probe block: the settings of `regcache probe`; train, val, "
                   "test, eval and anomaly name datasets of the pipeline.", presets=presets_of("probe"),
                   name=(str, Field(description="The block's name (report tables, run folders).")), models=Models)
AnalysisBlocks = [block(f"{kind.title()}Block", cls, doc=f"An analysis: the settings of `regcache {kind}`" +
                        ("; sets name datasets of the pipeline." if "sets" in cls.model_fields else "."),
                        kind=(Literal[kind], Field(description="What to run.")),
                        name=(Optional[str], Field(None, description="Its name [default: KIND and its index].")),
                        models=Models)
                  for kind, cls in ANALYSES.items()]


class ReportBlock(Settings):
    tables: Annotated[Names, Field(default_factory=list, description="Probe blocks in the report, in order "
                                                                     "[default: all].")]
    pool_seeds: Annotated[bool, Field(False, description=(
        "Open report.md with one table of all its blocks' runs, those that differ only in their seed pooled: "
        "each cell the mean over the seeds ± their sample standard deviation (regcache report --pool-seeds)."))]


class CostBlock(Settings):
    tflops: Annotated[Positive, Field(396.0, description="Sustained TFLOP/s of one device, for --dry-run's "
                                                         "device-hours.")]
    device: Annotated[str, Field("H100 bf16 at 40% of 989 TFLOP/s", description="What that figure is.")]


class LauncherBlock(Settings):
    kind: Annotated[literal(PIPELINE_LAUNCHERS), Field("none", description="Where extraction jobs run: " + "; ".join(
        f"{k}: {v}" for k, v in PIPELINE_LAUNCHERS.items()) + ".")]
    parts: Annotated[Count, Field(1, description="Parts (array tasks) per extraction.")]
    params: Annotated[dict[str, Any], Field(default_factory=dict, description="submitit parameters, e.g. "
                                                                              "slurm_partition, timeout_min.")]


class PipelineFile(Settings):
    """A regcache pipeline: models × datasets, extraction settings, probe blocks, analyses, report."""

    name: Annotated[str, Field(description="The pipeline's name (its output folder by default).")]
    description: Annotated[str, Field("", description="What it is for.")]
    vars: Annotated[dict[str, Union[str, int, float]], Field(
        default_factory=dict, description="Defaults of ${VARS} (the environment wins; --set vars.NAME=VALUE wins "
                                          "over both).")]
    cache: Annotated[Optional[str], Field(None, description="Cache root [default: $REGCACHE_CACHE or "
                                                            "~/.cache/regcache].")]
    out: Annotated[Optional[str], Field(None, description="Output folder [default: runs/pipelines/NAME].")]
    models: Annotated[list[Union[str, ModelEntry]], Field(min_length=1, description="Backbones: an alias or timm "
                                                          "name, or an entry with weights and settings.")]
    datasets: Annotated[list[Union[str, DatasetEntry]], Field(min_length=1, description="Manifests, or entries "
                                                              "with an estimate and settings.")]
    extract: Annotated[ExtractBlock, Field(default_factory=ExtractBlock, description="Extraction settings of every "
                                           "model and dataset (an entry's own win).")]
    probes: Annotated[list[ProbeBlock], Field(default_factory=list, description="Probe blocks.")]
    analyses: Annotated[list[Annotated[Union[tuple(AnalysisBlocks)], Field(discriminator="kind")]], Field(
        default_factory=list, description="Analyses: " + ", ".join(ANALYSES) + ".")]
    report: Annotated[ReportBlock, Field(default_factory=ReportBlock)]
    cost: Annotated[CostBlock, Field(default_factory=CostBlock)]
    launcher: Annotated[LauncherBlock, Field(default_factory=LauncherBlock)]

    @model_validator(mode="after")
    def _labels(self):
        labels = [m if isinstance(m, str) else (m.label or m.model) for m in self.models]
        twice = sorted({n for n in labels if labels.count(n) > 1})
        if twice:
            raise ValueError(f"models: {', '.join(twice)} named twice (give each entry of one model its own label)")
        names = [p.name for p in self.probes]
        if len(set(names)) < len(names):
            raise ValueError("probes: two probe blocks have the same name")
        return self


def schema() -> dict:
    """The JSON Schema of a pipeline file: every block with every setting its command takes."""
    out = PipelineFile.model_json_schema()
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out["title"] = "regcache pipeline"
    return out


