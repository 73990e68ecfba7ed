"""`regcache registers distill`: post-hoc registers (PH-Reg), on the `registers` group of `extract`."""
from __future__ import annotations

import click

from ..settings.distill import DistillSettings
from .common import errors, setup_logging
from .extract import registers
from .options import options, settings


@registers.command("distill")
@options(DistillSettings)
def registers_distill(**given):
    """Train register tokens into a ViT trained without them (PH-Reg, Chen et al. 2025): no labels.

    The frozen teacher sees --views shifted and flipped views of every image; its patch tokens, aligned
    back and averaged, are the targets (cached as a feature set under --cache, reused by any other
    distillation of the same teacher, data and views). The student is timm's register architecture with
    the teacher's weights and --registers new tokens; the registers and --unlock train to match the
    targets. A killed run resumes from its last saved state (every --save-every steps) to the same weights.

    Writes --out (safetensors, timm's layout) and OUT.json (settings, losses, targets, and the
    'regcache extract' command that reads the student, which it prints).
    """
    from ..distill import distill

    s = settings(DistillSettings, given)
    setup_logging(s.quiet)
    with errors():
        res = distill(s)
    if res.reused:
        click.echo(f"already made with these settings: {res.checkpoint} ({res.record})")
    else:
        teacher = ("cached" if res.reused_targets else
                   f"{res.teacher_images} images x {s.views} views in {res.teacher_seconds:.1f} s")
        resumed = f", resumed at step {res.resumed_at}" if res.resumed_at else ""
        click.echo(f"teacher targets: {teacher} ({res.targets})")
        click.echo(f"student: {res.steps} steps{resumed} in {res.train_seconds:.1f} s, loss "
                   f"{res.losses[0]:.4f} -> {res.losses[-1]:.4f}")
        click.echo(f"written {res.checkpoint} and {res.record}")
    click.echo(f"extract with it:\n  {res.command}")
