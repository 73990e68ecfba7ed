"""Running a pipeline: its jobs in stage order through the public API, one merged report, pipeline.json.

Every job calls the action of its command (`extract`, `probe`, an analysis) with settings validated
by the same model as the command's options, so a pipeline entry and the hand-typed command give the
same sets and numbers. A done job is skipped without loading a backbone or training a head (an
extraction is done when the cache holds its set; a probe or analysis when its ``job.json`` is
written), so an interrupted run does only what is missing.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import __version__
from ..data import MissingShards
from ..report import markdown, merge, pool_seeds
from ..store import Description, FeatureSet
from ..store.meta import weights_tag
from .blocks import STAGES, PipelineError
from .jobs import ExtractJob, RunJob, analysis_jobs, extract_jobs, passes, probe_jobs
from .load import Pipeline, pipeline_env

if TYPE_CHECKING:
    from .students import DistillJob


@dataclass
class PipelineRun:
    """What a run planned and did; ``pipeline.json`` is this, written after every job."""

    pipeline: Pipeline
    extract: list[ExtractJob] = field(default_factory=list)
    distill: list["DistillJob"] = field(default_factory=list)
    probes: list[RunJob] = field(default_factory=list)
    analyses: list[RunJob] = field(default_factory=list)
    report: Path | None = None
    finished: bool = False

    def to_dict(self) -> dict:
        pl = self.pipeline
        return {
            "pipeline": str(pl.path), "name": pl.name, "text_sha256": pl.text_sha256, "overrides": pl.overrides,
            "vars": pl.vars, "cache": str(pl.cache), "out": str(pl.out), "finished": self.finished,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"regcache": __version__, **{p: version(p) for p in ("torch", "timm", "zarr")},
                         "python": platform.python_version()},
            "distill": [{"model": j.model.label, "status": j.status, "checkpoint": j.student["checkpoint"],
                         "student": j.student} for j in self.distill],
            "extract": [{"model": j.model.label, "dataset": j.dataset.name, "key": j.key, "status": j.status,
                         "path": j.path, "fingerprint": j.fingerprint} for j in self.extract],
            "probes": [{"block": j.block.name, "model": j.model.label,
                        "features": [",".join(c) for c in j.settings.features] if j.settings else [],
                        "key": j.key, "status": j.status, "run": str(j.run) if j.run else None, "inputs": j.inputs,
                        **({"skipped": j.skipped} if j.skipped else {})} for j in self.probes],
            "analyses": [{"name": j.block.name, "kind": j.block.kind, "models": [m.label for m in j.models],
                          "key": j.key, "status": j.status, "run": str(j.run) if j.run else None, "inputs": j.inputs}
                         for j in self.analyses],
            "report": str(self.report) if self.report else None,
        }

    def save(self) -> Path:
        out = self.pipeline.out / "pipeline.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(out)
        return out


Hook = Callable[[object], None]


def run_pipeline(pl: Pipeline, stages: tuple[str, ...] = STAGES, models: list[str] | None = None,
                 dry_run: bool = False, progress: bool = True, echo: Callable[[str], None] = print,
                 after_job: Hook | None = None) -> PipelineRun:
    """Plan, then (unless ``dry_run``) run the jobs of ``stages`` that are not done; ``after_job`` is called
    after each job that did work (tests interrupt a run there)."""
    unknown = [m for m in models or [] if m not in [x.label for x in pl.models]]
    if unknown:
        raise PipelineError(f"{pl.path}: --models {', '.join(unknown)}: not in field 'models' "
                            f"({', '.join(m.label for m in pl.models)})")
    for w in pl.warnings:
        echo(f"warning: {w}")
    from .students import distill_jobs, run_distill, with_students  # torch-side: a run's, not a validation's

    with pipeline_env(pl):
        students = distill_jobs(pl, models, dry_run)
        pl = with_students(pl, students)
        run = PipelineRun(pl, extract_jobs(pl, models, dry_run), students)
    hook = after_job or (lambda job: None)
    with pipeline_env(pl):
        if dry_run:
            run.probes, run.analyses = probe_jobs(pl, run.extract, models), analysis_jobs(pl, run.extract, models)
            echo(plan_text(run))
            return run
        if "distill" in stages and any(j.status == "to do" for j in students):
            for job in students:
                if job.status == "to do":
                    run_distill(job, progress, echo)
                    run.save()
                    hook(job)
            run.extract = extract_jobs(pl, models)  # the students' checkpoints exist now: plan their sets
        if "extract" in stages:
            unplanned = [j for j in run.extract if j.status == "to do" and j.plan is None]
            if unplanned:
                raise PipelineError(f"{pl.path}: cannot extract "
                                    + "; ".join(f"{j.label} ({j.why})" for j in unplanned))
            for job in run.extract:
                if job.status == "cached":
                    _verify(job)
            todo = passes([j for j in run.extract if j.status == "to do"])
            arrays = submit_arrays(todo, pl, echo) if pl.launcher["kind"] != "none" else {}
            for group in todo:
                _extract(group, pl, progress, echo, arrays.get(group[0].key))
                run.save()
                hook(group)
        run.probes, run.analyses = probe_jobs(pl, run.extract, models), analysis_jobs(pl, run.extract, models)
        if "probe" in stages:
            for job in run.probes:
                if job.status == "to do":
                    _probe(job, pl, progress, echo)
                    run.save()
                    hook(job)
        if "analyse" in stages:
            for job in run.analyses:
                if job.status == "to do":
                    _analyse(job, pl, echo)
                    run.save()
                    hook(job)
        if "report" in stages and pl.tables:
            run.report = write_report(run)
            echo(f"report: {run.report}")
    run.finished = tuple(stages) == STAGES and not models
    echo(f"pipeline.json: {run.save()}")
    return run


def _missing(job: RunJob, pl: Pipeline) -> PipelineError:
    need = ", ".join(k for k, v in job.inputs.items() if v is None)
    return PipelineError(f"{job.label}: the pipeline has not extracted {need} yet; run "
                         f"'regcache run {pl.path} --stage extract' first")


def _verify(job: ExtractJob) -> None:
    """A cached set's shards must still hold what it read (sampled bytes, no decoding), as extract checks on reuse;
    the set then carries this dataset's name too, as a reuse by extract records it."""
    from ..extract import verify_shards

    fs = FeatureSet(job.path)
    verify_shards(fs, job.dataset.dataset, list(job.plan.shards))
    fs.add_name(Description(**job.dataset.dataset.description()))


def submit_arrays(groups: list[list[ExtractJob]], pl: Pipeline, echo) -> dict[str, list]:
    """SLURM through submitit: per extraction pass (one dataset, its models), one array job whose task I runs
    part I of its shards for every model of the pass.

    Every array is submitted before any is waited for; `_extract` then waits and finalizes. kind
    ``local`` uses submitit's local executor (subprocesses on this machine), as the tests do.
    """
    try:
        import submitit
    except ImportError:
        raise PipelineError(f"{pl.path}: field 'launcher.kind' {pl.launcher['kind']} needs submitit: "
                            "pip install 'regcache[slurm]'") from None
    from ..extract import extract_many

    parts, arrays = pl.launcher["parts"], {}
    for group in groups:
        key, label = group[0].key, _label(group)
        ex = submitit.AutoExecutor(folder=pl.out / "submitit" / key[:16],
                                   cluster="local" if pl.launcher["kind"] == "local" else "slurm")
        ex.update_parameters(name=f"regcache-{label.replace(' ', '')}", **pl.launcher["params"])
        with ex.batch():
            arrays[key] = [ex.submit(extract_many, [j.settings.model_copy(update={"part": i, "num_parts": parts})
                                                    for j in group]) for i in range(parts)]
        echo(f"submitted {label}: {parts} parts, job {arrays[key][0].job_id.split('_')[0]}")
    return arrays


def _label(group: list[ExtractJob]) -> str:
    return f"{' + '.join(j.model.label for j in group)} × {group[0].dataset.name}"


def _extract(group: list[ExtractJob], pl: Pipeline, progress: bool, echo, array: list | None = None) -> None:
    """One extraction pass: the group's models over its dataset, each shard decoded once (`extract_many`)."""
    from ..extract import extract, extract_many

    echo(f"extract {_label(group)}")
    if array is None:
        try:
            results = extract_many([j.settings.model_copy(update={"quiet": not progress}) for j in group])
        except MissingShards as e:
            if not pl.vars:
                raise
            where = ", ".join(f"{k}={v}" for k, v in pl.vars.items())
            raise PipelineError(f"{e}. The manifests' paths come from the pipeline's vars ({where}: {pl.path}'s "
                                "'vars', or the environment); point them at your data with --set vars.NAME=PATH "
                                "(with make: make extract ARGS='--set vars.NAME=PATH')") from None
    else:  # wait for every part, then write each index without loading a model (as --finalize)
        done = [a.result() for a in array]
        results = []
        for k, job in enumerate(group):
            res = extract(job.settings.model_copy(update={"store": done[0][k].path, "finalize": True}))
            for d in done:
                res.failed_shards.update(d[k].failed_shards)
                res.error = res.error or d[k].error
            res.reused = all(d[k].reused for d in done)
            results.append(res)
    failed = []
    for job, res in zip(group, results):
        if not (res.complete or res.failed_shards or res.error) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            job.status = "part done"  # under torchrun: the rank that finishes the set last records it
        elif res.failed_shards or res.error or not res.complete:
            why = "; ".join(f"{s}: {r}" for s, r in res.failed_shards.items()) or res.error or \
                f"{res.missing_units} shards not committed"
            failed.append(f"{job.label}: extraction incomplete ({why}); the store {res.path} keeps what is done")
        else:
            job.path, job.fingerprint = str(res.path), res.fingerprint
            job.status = "reused" if res.reused else "ran"
    if failed:  # the pass's other sets are made and recorded: a rerun resumes only these
        raise PipelineError("; ".join(failed) + "; run the pipeline again to resume")


def _fresh(run: Path) -> Path:
    """A job's own run directory, emptied of what an interrupted attempt left (its job.json is not there)."""
    import shutil

    if run.exists():
        shutil.rmtree(run)
    return run


def _probe(job: RunJob, pl: Pipeline, progress: bool, echo) -> None:
    from ..probe import probe

    if job.key is None:
        raise _missing(job, pl)
    echo(f"probe {job.label}: {' '.join('[' + ';'.join(c) + ']' for c in job.settings.features)}")
    result = probe(job.settings.model_copy(update={"out": _fresh(job.run), "quiet": not progress}), pins=job.pins)
    for w in result.warnings:
        echo(f"warning: probe {job.label}: {w}")
    _done(job)


def _done(job: RunJob) -> None:
    (job.run / "job.json").write_text(json.dumps({"key": job.key, "inputs": job.inputs, "paths": job.paths},
                                                 indent=2))
    job.status = "ran"


def _analyse(job: RunJob, pl: Pipeline, echo) -> None:
    from ..analysis import ACTIONS

    if job.key is None:
        raise _missing(job, pl)
    echo(f"analyse {job.label}")
    ACTIONS[job.block.kind](job.settings.model_copy(update={"out": _fresh(job.run)}))
    _done(job)


def write_report(run: PipelineRun) -> Path:
    """One Markdown file: per probe block in the report's order, its runs merged (Table I layout)."""
    pl = run.pipeline
    parts = [f"# {pl.name}\n\nPipeline {pl.path} (sha256 {pl.text_sha256[:12]})"
             + (f", overrides {json.dumps(pl.overrides)}" if pl.overrides else "") + "."]
    def labelled(blocks: list[str]):
        """The finished runs of these blocks merged, each row's model the entry's label, tagged as its sets are
        where the weights are not the model's own (a student never reads as the hub's model)."""
        done = {str(j.run): j.model for j in run.probes
                if j.block.name in blocks and j.run and (j.run / "job.json").is_file()}
        if not done:
            return None
        df = merge(done)
        df["model"] = df.run.map({r: m.label + weights_tag(m.name, m.source.get("checkpoint"),
                                                           m.source.get("random_init")) for r, m in done.items()})
        return df

    pooled = labelled(pl.tables) if pl.pool_seeds else None
    if pooled is not None:
        parts.append(f"## {', '.join(pl.tables)}, pooled over seeds\n\n{markdown(pool_seeds(pooled), pooled=True)}")
    for table in pl.tables:
        df = labelled([table])
        if df is None:
            continue
        keys = ["model", "features", "set", "metric", "scorer", "role"]
        if not df[df.role != "selection"].duplicated(keys).any():  # one run per model: rows by model, not run
            df = df.drop(columns="run")
        parts.append(f"## {table}\n\n{markdown(df)}")
    out = pl.out / "report.md"
    out.write_text("\n\n".join(parts))
    return out


# --------------------------------------------------------------------------- the plan, as --dry-run prints it

def _n(x: float) -> str:
    return f"{x:,.0f}"


def plan_text(run: PipelineRun) -> str:
    pl = run.pipeline
    lines = [f"pipeline {pl.name} ({pl.path}, sha256 {pl.text_sha256[:12]}); cache {pl.cache}; out {pl.out}"]
    if run.distill:
        from .students import plan_lines

        lines += plan_lines(run.distill, pl.cost["tflops"])
    todo = [j for j in run.extract if j.status == "to do"]
    lines.append(f"extraction jobs: {len(run.extract)} ({len(run.extract) - len(todo)} cached, {len(todo)} to do)")
    total, unknown = 0.0, 0
    for j in run.extract:
        n, g, views = j.dataset.num_images, j.gflops(), j.settings.views
        if n is not None and g is not None:
            flop = n * views * g
            cost = f"{_n(n)} img × {views} view{'s' if views > 1 else ''} × {g:.1f} GFLOP = {flop / 1e6:,.1f} PFLOP"
            if j.status == "to do":
                total += flop
        else:
            cost = f"{'? img' if n is None else _n(n) + ' img'} × {'? GFLOP' if g is None else f'{g:.1f} GFLOP'}"
            unknown += j.status == "to do"
        lines.append(f"  {j.status:<7} {j.model.label:<28} {j.dataset.name:<18} {cost}"
                     + (f" (not planned: {j.why})" if j.why else ""))
    hours = total * 1e9 / (pl.cost["tflops"] * 1e12) / 3600
    lines.append(f"  to do: {total / 1e6:,.1f} PFLOP = {hours:,.2f} device-hours at {pl.cost['tflops']:g} TFLOP/s "
                 f"({pl.cost['device']})" + (f"; {unknown} jobs of unknown cost" if unknown else ""))
    groups = passes(todo)
    if groups:
        images = {id(g): g[0].dataset.num_images or 0 for g in groups}  # an image is decoded once, whatever its views
        once, each = sum(images.values()), sum(images[id(g)] * len(g) for g in groups)
        lines.append(f"extraction passes: {len(groups)} for the {len(todo)} jobs to do, each reading and decoding its "
                     f"shards once for all its models: {_n(once)} image decodes instead of {_n(each)} "
                     f"({_n(each - once)} saved{'' if all(images.values()) else '; sets of unknown size left out'})")
        lines += [f"  pass {k + 1:<3} {g[0].dataset.name:<18} {' + '.join(j.model.label for j in g)}"
                  for k, g in enumerate(groups)]
    lines.append(f"probe jobs: {len(run.probes)}")
    for j in run.probes:
        s = j.settings
        what = (j.skipped or f"{' '.join('[' + ';'.join(c) + ']' for c in s.features)}; "
                f"{s.heads_per_combination} head(s) per combination ({s.solver}), {s.max_iter} it"
                f"{f' × batch {s.batch_size}' if s.solver == 'minibatch' else ''}, train {s.train}")
        lines.append(f"  {j.status:<7} {j.label:<40} {what}")
    if run.analyses:
        lines.append(f"analyses: {len(run.analyses)}")
        lines += [f"  {j.status:<7} {j.label}" for j in run.analyses]
    lines.append(f"report: {pl.out / 'report.md'} (tables: {', '.join(pl.tables) or 'none'})")
    return "\n".join(lines)
