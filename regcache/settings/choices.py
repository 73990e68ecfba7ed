"""Every fixed list of choices a setting takes, each with what it means (``--help`` shows them).

Plain data, so that settings, the command line and pipeline files validate without importing torch.
Things users name and extend (models, features, scorers, presets, analyses) have registries of their own.
"""
from __future__ import annotations

from typing import Literal

#: forward-pass precision (autocast); the stored dtype is separate
PRECISIONS: dict[str, str] = {"fp32": "no autocast", "bf16": "bfloat16 autocast (GPUs; slow on CPUs without native bf16)",
                              "fp16": "float16 autocast"}
DTYPES: dict[str, str] = {"float16": "half the bytes; the probe reads float16 anyway", "float32": "full precision"}
CROP_MODES: dict[str, str] = {"center": "shorter side to --resize, then the center crop",
                              "squash": "both sides to --resize (timm's squash mode), then the center crop"}
INTERPOLATIONS: dict[str, str] = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}
#: where the images are decoded and resized (docs/features.md, "Decoding on the device")
DECODERS: dict[str, str] = {
    "pil": "PIL in the decode workers (the reference)",
    "device": "JPEGs decoded by torchvision on the model's device (nvJPEG on a GPU), batched, and resized there "
              "(antialiased); not PIL's pixels (the features differ slightly, see the docs), one view only, "
              "--device named (cuda or cpu: the decoder is in the set's identity)"}
#: position-embedding resampling when the input grid differs from the weights' table
POS_EMBED: dict[str, str] = {
    "timm": "timm's load-time resample (bicubic, antialiased), as timm.create_model does",
    "dinov2": "DINOv2 hub's interpolate_pos_encoding (bicubic, no antialias, scale factor (n + 0.1) / N): "
              "reproduces numbers made with torch.hub facebookresearch/dinov2 models",
}
#: what the register neurons do at the patch tokens (test-time registers)
PATCH_MODES: dict[str, str] = {
    "zero": "set to zero (the paper's default: the outliers leave the patches)",
    "keep": "left as they are (the registers get the maximum, the patches keep theirs)",
}
#: the activation each register neuron takes in the registers (docs/registers.md, "Rules and their sources")
REGISTER_VALUES: dict[str, str] = {
    "block": "one value per block: the largest |activation| over every token ([CLS], patches, registers) and every "
             "listed neuron of the block, sign kept, in each listed neuron (the authors' sign_max)",
    "neuron": "per neuron: its largest |activation| over the image's patches, sign kept",
}
#: which tokens can be outliers when register neurons are found
OUTLIER_TOKENS: dict[str, str] = {
    "all": "[CLS] and the patch tokens (the authors' code counts [CLS] when its norm is above the threshold)",
    "patches": "the patch tokens only",
}
#: how a neuron's activations at the outliers make its score
NEURON_AVERAGING: dict[str, str] = {
    "per-image": "per image, the mean |activation| over its outliers; then the mean over the images with outliers "
                 "(the authors' code)",
    "pooled": "the mean |activation| over every outlier of every image (images with more outliers weigh more)",
}
ROLES: dict[str, str] = {"id-train": "in-distribution training set", "id-val": "in-distribution validation/test set",
                         "ood-gen": "OOD generalisation set (labelled, top-1)",
                         "anomaly": "anomaly set (unlabelled, detection metrics)"}
#: a manifest's split: where its set stands in a benchmark (OpenOOD v1.5's groups; docs/design.md, "Datasets")
SPLITS: dict[str, str] = {
    "train": "the source dataset's training split (for the reader)",
    "val": "the source dataset's validation split (for the reader)",
    "test": "the source dataset's test split (for the reader)",
    "near-ood": "an anomaly set semantically near the ID classes: its own mean (mean near-ood)",
    "far-ood": "an anomaly set far from the ID classes: its own mean (mean far-ood)",
    "ood-val": "an OOD validation set, for choosing hyperparameters: reported alone, in no mean",
    "covariate-shift": "ID classes under a distribution shift (ImageNet-V2, -C, -ES): an OOD-generalisation set, "
                       "reported by top-1 as any other (OpenOOD's full-spectrum ID)"}
SOLVERS: dict[str, str] = {
    "minibatch": "SGD/AdamW over --lr x --wd, one head each (the paper's; works with --stream)",
    "lbfgs": "full-batch multinomial logistic regression, one head per --C, fitted together to the optimum (sets in "
             "memory)",
    "sklearn": "scikit-learn's LogisticRegression (lbfgs, float64, CPU), one fit per --C after another: the solver "
               "DINOv3's code runs, its numbers exactly, about 10x slower than lbfgs (sets in memory)"}
#: solvers whose grid is --C (one full-batch logistic regression a head), not --lr x --wd
BY_C: tuple[str, ...] = ("lbfgs", "sklearn")
OPTIMIZERS: dict[str, str] = {"sgd": "SGD with momentum and a cosine schedule", "adamw": "AdamW, cosine schedule"}
#: how a minibatch head starts (lbfgs always starts at zero: its objective is convex)
INITS: dict[str, str] = {"zeros": "weights and bias zero",
                         "normal": "weights drawn from N(0, init_std^2), bias zero (DINOv2's LinearClassifier)"}
#: how the selection set is held out of --train when there is no --val
HOLDOUTS: dict[str, str] = {"random": "--val-fraction of the images, drawn at random",
                            "stratified": "--val-fraction of each class's images (at least one of a class with two "
                                          "or more; DINOv3's split)"}
DEVICE_HELP = "cpu, cuda, cuda:1, …"
#: the device a backbone runs on (extract, distill)
BACKBONE_DEVICE = {"default": "auto", "description": f"{DEVICE_HELP} (auto: cuda if present)."}
#: stages of a pipeline run, in order
STAGES: dict[str, str] = {"distill": "post-hoc registers for the models[] entries with a distill block",
                          "extract": "extract what is not cached", "probe": "train and evaluate heads",
                          "analyse": "norms, feature maps, token probes, attention", "report": "one merged table"}
#: what a data error does (webdataset's handler= in one word): a regcache bug always stops the run with its traceback
HANDLERS: dict[str, str] = {
    "record": "a damaged, missing or undecodable sample or shard is recorded by name (the errors table, the failed "
              "shards) and the run goes on",
    "reraise": "any error stops the run at once with its traceback (to debug a reader)"}
#: where extraction runs: one word, one meaning, for `regcache extract --launcher` and a pipeline's launcher.kind
LAUNCHERS: dict[str, str] = {
    "none": "here, in this process (a pipeline's jobs one after another)",
    "torchrun": "--nproc-per-node ranks on this node through torchrun, one part each (regcache extract)",
    "slurm": "SLURM array jobs through submitit (a pipeline)",
    "local": "submitit's local executor, subprocesses on this machine (a pipeline)"}
EXTRACT_LAUNCHERS = {k: LAUNCHERS[k] for k in ("none", "torchrun")}
PIPELINE_LAUNCHERS = {k: LAUNCHERS[k] for k in ("none", "slurm", "local")}


def literal(choices: dict[str, str]):
    """The ``Literal`` type of a choice list (pydantic validates it, the JSON Schema lists it)."""
    return Literal[tuple(choices)]  # type: ignore[valid-type]
