"""Settings of `regcache registers distill`: post-hoc registers (PH-Reg, Chen et al., NeurIPS 2025).

A frozen teacher's test-time-augmented patch features (cached as a feature set) train a student made of the
same weights plus new register tokens. Defaults are the authors' DINOv2 recipe (their distill_main.py and
appendix B), but the crop (112 px, the demo's, for a CPU) and the registers (4: timm's reg4 architecture).
"""
from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BeforeValidator, Field, field_validator

from .base import Cli, Meta
from .choices import BACKBONE_DEVICE, DTYPES, PRECISIONS, literal
from .extract import Backbone, Cache, Preprocessing
from .types import Count, NonNegative, Once, Positive, UserPath, split

#: what fills the gap a shifted view leaves (in normalised pixels)
FILLS: dict[str, str] = {"white": "normalised white, (1 - mean) / std per channel (the authors')",
                         "mean": "0 in normalised pixels: the normalisation mean (a grey)"}
#: how the learning rate goes from --lr to --end-lr
SCHEDULES: dict[str, str] = {
    "epoch": "exponential per epoch, lr * (end_lr / lr) ^ ((epoch + 1) / epochs), set after each step, so the "
             "first step runs at lr (the authors')",
    "step": "exponential per step, lr * (end_lr / lr) ^ (step / (steps - 1)): from lr at the first step to end_lr "
            "at the last"}
#: what trains besides the registers (which always do); everything else stays bit-identical
UNLOCK: dict[str, str] = {
    "pos_embed": "the position table, and [CLS] (which carries its position in timm's register layout)",
    "patch_embed": "the patch-embedding convolution (weight and bias)",
    "last_block": "every weight of the last block (norms, attention, MLP, layer scales)",
    "last_2_blocks": "every weight of the last two blocks (the authors' CLIP recipe)"}
DEFAULT_UNLOCK = ["pos_embed", "patch_embed", "last_block"]  # the paper's DINOv2 recipe

Unlock = Annotated[list[literal(UNLOCK)], BeforeValidator(split), Once]


class DistillSettings(Preprocessing, Backbone):
    """`regcache registers distill`: train post-hoc registers into a ViT (PH-Reg)."""

    size: Annotated[Count, Meta(identity="backbone"), Field(
        112, description="Crop size (pixels): the teacher's views and the student's training size (the student's "
                         "position table is saved at this grid).")]
    resize: Annotated[Count, Meta(identity="backbone"), Field(
        128, description="The shorter side is resized to this before the crop.")]
    data: Annotated[str, Cli(short="-d"), Meta(path=True), Field(
        description="Manifest or shard pattern of the training images (labels are not used).")]
    images: Annotated[Optional[Count], Cli(short="-n", show="all"), Field(
        None, description="Train on the first N images (the teacher's targets are made for the shards that hold "
                          "them).")]
    registers: Annotated[int, Field(4, ge=0, description="Register tokens to add (timm's reg4 architecture with "
                                                          "4; the paper uses 16).")]
    views: Annotated[Count, Field(10, description="Teacher views per image, view 0 the image itself.")]
    shift: Annotated[float, Field(0.15, ge=0, lt=0.5, description="Largest shift of a view, as a fraction of the "
                                                                  "crop; rounded to whole patches.")]
    flip: Annotated[float, Field(0.5, ge=0, le=1, description="Probability that a view (but view 0) is flipped "
                                                              "horizontally.")]
    fill: Annotated[literal(FILLS), Field("white", description="The gap a shift leaves: " + "; ".join(
        f"{k}: {v}" for k, v in FILLS.items()) + ".")]
    augment_seed: Annotated[int, Field(0, description="Seed of the teacher's views (with each sample's key).")]
    unlock: Annotated[Unlock, Cli(metavar="LIST"), Field(
        DEFAULT_UNLOCK, description="What trains besides the registers, comma list of: " + "; ".join(
            f"{k}: {v}" for k, v in UNLOCK.items()) + ". '' for the registers only.")]
    lr: Annotated[Positive, Field(1e-4, description="AdamW's first learning rate.")]
    end_lr: Annotated[Positive, Field(5e-6, description="The learning rate at the end of the schedule.")]
    schedule: Annotated[literal(SCHEDULES), Field("epoch", description="; ".join(
        f"{k}: {v}" for k, v in SCHEDULES.items()) + ".")]
    weight_decay: Annotated[NonNegative, Field(0.01, description="AdamW's weight decay, on every trained weight.")]
    mse_scale: Annotated[NonNegative, Field(1.0, description="Loss: (1 - mean cosine) + this x MSE, over the "
                                                             "patch tokens after the final norm.")]
    batch_size: Annotated[Count, Cli(short="-b"), Field(8, description="Images per step (and per teacher "
                                                                       "batch of views).")]
    epochs: Annotated[Count, Field(100, description="Passes over the images.")]
    steps: Annotated[Optional[Count], Cli(show="epochs x steps per epoch"), Field(
        None, description="Optimizer steps instead of --epochs; the schedule's epochs are then the steps' epochs.")]
    seed: Annotated[int, Field(0, description="Seed of the registers' initialisation and the data order.")]
    precision: Annotated[literal(PRECISIONS), Field("fp32", description="Teacher and student forward precision "
                                                                         "(autocast): " + "; ".join(
        f"{k}: {v}" for k, v in PRECISIONS.items()) + ".")]
    dtype: Annotated[literal(DTYPES), Field("float16", description="Stored dtype of the teacher's targets.")]
    device: Annotated[str, Field(**BACKBONE_DEVICE)]
    save_every: Annotated[Count, Field(100, description="Steps between saved training states (a killed run "
                                                        "resumes from the last one).")]
    out: Annotated[UserPath, Cli(short="-o", metavar="FILE"), Field(
        description="The student checkpoint (FILE.safetensors, timm's layout); FILE.json records how it was made.")]
    cache: Cache
    quiet: Annotated[bool, Meta(scope="cli"), Cli(short="-q"), Field(
        False, description="No progress bar, warnings only.")]

    @field_validator("out")
    @classmethod
    def _safetensors(cls, out):
        if out.suffix != ".safetensors":
            raise ValueError(f"{out}: the checkpoint is a .safetensors file")
        return out

