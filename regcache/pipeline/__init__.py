"""Declarative pipelines (docs/pipelines.md): models × datasets × probe settings in one YAML file, run on the public
API.

`load_pipeline` reads and validates a file (`schema`: the JSON Schema of one); `run_pipeline` extracts
what is not cached, probes, analyses and reports, skipping every job a previous run finished.
"""
from .blocks import STAGES, PipelineError, schema
from .jobs import ExtractJob, RunJob
from .load import Pipeline, load_pipeline, parse_overrides
from .run import PipelineRun, plan_text, run_pipeline, write_report

__all__ = ["ExtractJob", "Pipeline", "PipelineError", "PipelineRun", "RunJob", "STAGES", "load_pipeline",
           "parse_overrides", "plan_text", "run_pipeline", "schema", "write_report"]
