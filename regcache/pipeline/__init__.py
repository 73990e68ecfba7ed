"""Declarative pipelines (DESIGN §4): models × datasets × probe settings in one YAML file, run on the public API.

`load_pipeline` reads and validates a file; `run_pipeline` extracts what is not cached, probes, analyses
and reports, skipping every job a previous run finished. See the README, "Pipelines".
"""
from .jobs import AnalysisJob, ExtractJob, ProbeJobPlan
from .run import PipelineRun, plan_text, run_pipeline, write_report
from .schema import STAGES, Pipeline, PipelineError, load_pipeline, parse_overrides

__all__ = ["AnalysisJob", "ExtractJob", "Pipeline", "PipelineError", "PipelineRun", "ProbeJobPlan", "STAGES",
           "load_pipeline", "parse_overrides", "plan_text", "run_pipeline", "write_report"]
