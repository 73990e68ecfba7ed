"""The distill stage: post-hoc registers for the models[] entries with a distill block (`regcache.distill`).

Each such entry's checkpoint is kept under the cache root, named by a digest of what determines it
(`distill.student_key`: the teacher's identity with its weights' bytes, the data's bytes, the views, the
student's architecture and the training settings), so that a rerun, or another pipeline asking for the same
student, finds it made. The entry's sets are the student's: `with_students` gives each distilled entry the
student's backbone (timm's register architecture and the checkpoint) before extraction is planned, its own
backbone kept as ``teacher``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..data import UNHASHED, load_dataset
from ..distill import distill
from ..distill.run import record_file, student_key
from ..distill.student import alias_of, student_arch, teacher_arch
from ..distill.teacher import teacher_plan
from ..distill.train import Schedule
from ..models import model_facts, preprocess_of
from ..names import slug
from ..settings import DistillSettings
from .jobs import digest
from .blocks import PipelineError
from .load import Model, Pipeline


@dataclass
class DistillJob:
    model: Model                   # the entry, with its own (the teacher's) backbone
    settings: DistillSettings
    student: dict                  # the backbone its sets are extracted with: model, model_args, checkpoint
    status: str = "to do"          # to do | cached | ran
    why: str = ""                  # what the dry run cannot say yet

    @property
    def label(self) -> str:
        return f"{self.model.label}: {self.settings.registers} registers into {self.settings.model}"

    def images(self) -> int | None:
        counts = load_dataset(self.settings.data).counts
        n = sum(counts) if counts and None not in counts else None
        return n if self.settings.images is None or n is None else min(n, self.settings.images)

    def gflops(self) -> tuple[float, float]:
        """Per image: the teacher's views (forward) and a student step (forward and backward, about 3 forwards)."""
        s = self.settings
        g = model_facts(s, preprocess_of(s).size).gflops
        return s.views * g, 3 * g


def distill_jobs(pl: Pipeline, models: list[str] | None = None, dry_run: bool = False) -> list[DistillJob]:
    """One job per distilled entry: its settings, the checkpoint's place and the student backbone. The checkpoint
    is named by the digest of `distill.student_key` (everything that determines it), so a changed setting,
    teacher weight or image makes another; a dry run that finds the data not hashed yet cannot name it."""
    jobs = []
    for m in pl.models:
        if m.distill is None or (models and m.label not in models):
            continue
        draft = pl.distill_settings(m, pl.cache / "distilled" / "unnamed.safetensors")  # named below
        p = teacher_plan(draft, read=not dry_run)
        missing = [sid.url for sid in p.shards if sid.digest == "missing"]
        if missing and not dry_run:
            raise PipelineError(f"{pl.path}: models[{m.label}].distill: {len(missing)} of the data's shards are not "
                                f"there (e.g. {missing[0]})")
        unhashed = bool(missing) or any(sid.digest == UNHASHED for sid in p.shards)
        name = "unhashed" if unhashed else digest(student_key(draft, p))[:12]
        s = draft.model_copy(update={"out": pl.cache / "distilled" / f"{slug(draft.model)}-reg{draft.registers}-"
                                                                        f"{name}.safetensors"})
        arch = student_arch(teacher_arch(s), s.registers)
        alias = None if arch.args else alias_of(arch)
        student = {"model": alias or arch.name, "checkpoint": str(s.out),
                   **({"model_args": arch.args} if arch.args else {})}
        done = not unhashed and s.out.is_file() and record_file(s.out).is_file()
        jobs.append(DistillJob(m, s, student, "cached" if done else "to do",
                               "its data are not hashed yet (a dry run reads no shard)" if unhashed else ""))
    return jobs


def with_students(pl: Pipeline, jobs: list[DistillJob]) -> Pipeline:
    """The pipeline with each distilled entry's backbone the student's (its own kept as ``teacher``)."""
    students = {j.model.label: j.student for j in jobs}
    models = [replace(m, source=students[m.label], teacher=m.source) if m.label in students else m
              for m in pl.models]
    return replace(pl, models=models)


def run_distill(job: DistillJob, progress: bool, echo: Callable[[str], None]) -> None:
    echo(f"distill {job.label}")
    res = distill(job.settings.model_copy(update={"quiet": not progress}))
    echo(f"  {res.checkpoint}: loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}" if res.losses else
         f"  {res.checkpoint}")
    job.status = "ran"


def plan_lines(jobs: list[DistillJob], tflops: float) -> list[str]:
    """The dry run's lines: each distillation, its status and its cost."""
    if not jobs:
        return []
    out = [f"distillations: {len(jobs)} ({sum(j.status == 'cached' for j in jobs)} cached)"]
    for j in jobs:
        n, s = j.images(), j.settings
        teacher, step = j.gflops()
        if n is None:
            out.append(f"  {j.status:<7} {j.label:<40} ? img (the manifest has no counts)")
            continue
        steps = Schedule.of(s, n).steps
        flop = n * teacher + steps * s.batch_size * step
        out.append(f"  {j.status:<7} {j.label:<40} teacher {n:,} img × {teacher:.1f} GFLOP, student {steps:,} steps "
                   f"× {s.batch_size} × {step:.1f} GFLOP = {flop / 1e6:,.2f} PFLOP "
                   f"({flop * 1e9 / (tflops * 1e12) / 3600:,.2f} device-hours)" + (f"; {j.why}" if j.why else ""))
    return out
