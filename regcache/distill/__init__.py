"""Post-hoc registers (PH-Reg, Chen et al., NeurIPS 2025): register tokens trained into a frozen ViT, no labels.

One concern a module: `augment` (the teacher's views and their alignment, pure functions), `teacher` (the
denoised targets, cached as a feature set), `student` (timm's register architecture from the teacher's
weights, what trains), `train` (the resumable loop), `output` (checkpoint and record), `run` (`distill`).
Backbone-side: importing it loads torch and timm.
"""
from .run import DistillResult, distill
from .student import DistillError

__all__ = ["DistillError", "DistillResult", "distill"]
