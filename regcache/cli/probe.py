"""Commands that read the cache: probe, score, knn, fewshot, scorers, report, and run for whole pipelines."""
from __future__ import annotations

import os

import click

from ..settings import FewshotSettings, KnnSettings, ProbeSettings, ReportSettings, RunSettings, ScoreSettings
from .common import errors, main, setup_logging
from .options import options, settings


@main.command()
@options(ProbeSettings)
def probe(**given):
    """Train linear heads on cached features and evaluate them (never loads a backbone).

    Writes results.parquet (long format), results.md (accuracy and OOD-detection tables),
    heads.safetensors, config.json and plots/ into the run directory, and prints the tables.
    """
    from ..probe import probe as run

    s = settings(ProbeSettings, given)
    setup_logging(s.quiet)
    with errors():
        s = s.model_copy(update={"device": _init_distributed(s.device)})
        try:
            result = run(s)
        finally:
            _leave_distributed()
    if result is not None:  # None: a rank other than 0 under torchrun
        click.echo((result.out / "results.md").read_text())
        click.echo(f"run directory: {result.out}")


def _init_distributed(device: str) -> str:
    """Under torchrun, join the process group (nccl on GPUs, gloo on CPUs); each rank takes its local GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    import torch.distributed as dist

    if device.startswith("cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def _leave_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@main.command()
@options(ScoreSettings)
def score(**given):
    """Apply the heads saved in RUN to further cached sets.

    Feature scorers fit on the run's training set, streamed from the store in chunks (view 0 only).
    """
    from ..probe import score as run

    s = settings(ScoreSettings, given)
    setup_logging(s.quiet)
    with errors():
        result = run(s)
    click.echo((result.out / "results.md").read_text())
    click.echo(f"written to {result.out}")


@main.command("scorers")
def scorers_cmd():
    """List the OOD scorers: name, what they need, hyperparameters with defaults (and their source), reference."""
    from ..doctables import scorer_rows

    rows = scorer_rows()
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for name, needs, params, defaults, reference in rows:
        click.echo(f"{name:{widths[0]}}  {needs:{widths[1]}}  {params:{widths[2]}}  defaults: {defaults}")
        click.echo(f"{'':{widths[0]}}  {reference}")


@main.command()
@options(ReportSettings)
def report(**given):
    """Merge the results of several runs (directories or results.parquet files) into one report."""
    from ..report import report as run

    s = settings(ReportSettings, given)
    with errors():
        text, out = run(s.runs, s.out, s.plot, s.plot_scorer, s.pool_seeds)
    click.echo(text)
    if out is not None:
        click.echo(f"written to {out}")


@main.command("run")
@options(RunSettings)
def run_cmd(**given):
    """Run PIPELINE (pipelines/NAME.yaml): extract what is not cached, probe, analyse, report.

    Finished jobs are skipped (a rerun loads no backbone and trains no head); an interrupted run does
    only what is missing. Writes OUT/report.md and OUT/pipeline.json.
    """
    import json

    from ..pipeline import STAGES, load_pipeline, parse_overrides, run_pipeline, schema

    s = settings(RunSettings, given)
    if s.print_schema:
        click.echo(json.dumps(schema(), indent=2))
        return
    setup_logging(s.quiet)
    with errors():
        pl = load_pipeline(s.pipeline, parse_overrides(s.set), allow_unset=s.dry_run)
        order = tuple(x for x in STAGES if x in s.stage) if s.stage else STAGES
        run_pipeline(pl, order, s.models or None, dry_run=s.dry_run, progress=not s.quiet, echo=click.echo)


@main.command()
@options(KnnSettings)
def knn(**given):
    """Weighted kNN classifier on cached features (DINOv2's: cosine similarity, votes exp(sim / T)).

    Top-1 (and top-5, with more than 5 classes) per k on --test and --eval sets; labels are mapped into
    --train's classes by name. Writes results.parquet and results.md into the run directory.
    """
    from ..probe import knn as run

    _table(run, settings(KnnSettings, given))


@main.command()
@options(FewshotSettings)
def fewshot(**given):
    """k-shot logistic regression: k images per class drawn per seed from --train, fitted with L-BFGS.

    Reports top-1, top-5 and mean-per-class recall on --test and --eval, per seed (results.parquet) and as
    mean ± std over seeds (results.md, printed).
    """
    from ..probe import fewshot as run

    _table(run, settings(FewshotSettings, given))


def _table(action, s) -> None:
    """Run a protocol that writes one table (kNN, few-shot) and print it with where it went."""
    setup_logging(s.quiet)
    with errors():
        table = action(s)
    click.echo((table.out / "results.md").read_text())
    click.echo(f"run directory: {table.out}")
