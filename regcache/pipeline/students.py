"""The distill stage: post-hoc registers for the models[] entries with a distill block (`regcache.distill`).

Each such entry's checkpoint is kept under the cache root, named by a digest of what determines it (the distill
settings, the teacher's weights by their bytes, the data by their shards' bytes), so that a rerun, or another
pipeline asking for the same student, finds it made. The entry's sets are the student's: `with_students` gives
each distilled entry the student's backbone (timm's register architecture and the checkpoint) before extraction
is planned, its own backbone kept as ``teacher``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..data import load_dataset, shard_ids
from ..digests import file_digest
from ..distill import distill
from ..distill.run import record_file
from ..distill.student import alias_of, student_arch, teacher_arch
from ..models import model_facts, preprocess_of
from ..names import slug
from ..settings import DistillSettings
from .jobs import digest
from .load import Model, Pipeline


@dataclass
class DistillJob:
    model: Model                   # the entry, with its own (the teacher's) backbone
    settings: DistillSettings
    student: dict                  # the backbone its sets are extracted with: model, model_args, checkpoint
    status: str = "to do"          # to do | cached | ran

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


def distill_jobs(pl: Pipeline, models: list[str] | None = None) -> list[DistillJob]:
    """One job per distilled entry: its settings, the checkpoint's place and the student backbone."""
    jobs = []
    for m in pl.models:
        if m.distill is None or (models and m.label not in models):
            continue
        draft = pl.distill_settings(m, pl.cache / "distilled" / "unnamed.safetensors")  # out is named by the rest
        memo = pl.cache / ".digests"
        ds = load_dataset(draft.data)
        key = digest({"settings": draft.model_dump(mode="json", exclude={"out", "quiet", "cache"}),
                      "checkpoint": file_digest(draft.checkpoint, memo) if draft.checkpoint else None,
                      "data": ds.content_id(shard_ids(ds, memo))})
        out = pl.cache / "distilled" / f"{slug(draft.model)}-reg{draft.registers}-{key[:12]}.safetensors"
        s = draft.model_copy(update={"out": out})
        arch = student_arch(teacher_arch(s), s.registers)
        alias = None if arch.args else alias_of(arch)
        student = {"model": alias or arch.name, "checkpoint": str(out), **({"model_args": arch.args} if arch.args else {})}
        done = out.is_file() and record_file(out).is_file()
        jobs.append(DistillJob(m, s, student, "cached" if done else "to do"))
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
        steps = s.steps or s.epochs * -(-n // s.batch_size)
        flop = n * teacher + steps * s.batch_size * step
        out.append(f"  {j.status:<7} {j.label:<40} teacher {n:,} img × {teacher:.1f} GFLOP, student {steps:,} steps "
                   f"× {s.batch_size} × {step:.1f} GFLOP = {flop / 1e6:,.2f} PFLOP "
                   f"({flop * 1e9 / (tflops * 1e12) / 3600:,.2f} device-hours)")
    return out
