"""Settings of `regcache run`: which pipeline, which of its models and stages, and overrides."""
from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field, model_validator

from .base import Cli, Settings
from .choices import STAGES, literal
from .types import Names, UserPath


class RunSettings(Settings):
    """`regcache run`: a pipeline file's jobs, in stage order, skipping those a previous run finished."""

    pipeline: Annotated[Optional[UserPath], Cli(argument=True, metavar="PIPELINE"), Field(
        None, description="The pipeline file (pipelines/NAME.yaml).")]
    models: Annotated[Names, Cli(multiple=True, metavar="LIST"), Field(
        default_factory=list, description="Only these of the pipeline's models, by label (comma list or repeated) "
                                          "[default: all].")]
    stage: Annotated[list[literal(STAGES)], Cli(multiple=True), Field(
        default_factory=list, description="Only this stage (repeat for several) [default: all, in order]: "
                                          + "; ".join(f"{k}: {v}" for k, v in STAGES.items()) + ".")]
    dry_run: Annotated[bool, Field(False, description="Load no model and read no image: print every job, cached or "
                                                      "to do, and its cost.")]
    set: Annotated[list[str], Cli(multiple=True, metavar="KEY=VALUE"), Field(
        default_factory=list, description="Override a field, e.g. extract.precision=bf16, "
                                          "probes.table1.iterations=100, vars.REGCACHE_DATA=/data (VALUE is YAML); "
                                          "recorded in pipeline.json.")]
    print_schema: Annotated[bool, Cli(flag="--schema"), Field(False, description="Print the JSON Schema of pipeline files (for editors that "
                                                     "validate YAML) and exit.")]
    quiet: Annotated[bool, Cli(short="-q"), Field(False, description="No progress bars, warnings only.")]

    @model_validator(mode="after")
    def _pipeline_given(self):
        if self.pipeline is None and not self.print_schema:
            raise ValueError("name the pipeline file (or give --schema)")
        return self
