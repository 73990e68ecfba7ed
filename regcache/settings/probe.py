"""Settings of the commands that read the cache: probe, score, knn and fewshot.

Ranges are constraints of the fields (a learning rate is finite and positive, a validation fraction
lies in (0, 0.5]), so a value that would train nothing or report chance is refused the same way on
the command line, in a pipeline file and from Python.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, create_model, model_validator

from ..ood import SCORERS, make, parse_args, resolve
from .base import Cli, Meta, Settings
from .choices import BY_C, DEVICE_HELP, HOLDOUTS, INITS, OPTIMIZERS, SOLVERS, literal
from .extract import Cache
from .presets import presets_of
from .types import (Combos, Count, Counts, Ints, Names, NonNegativeFloats, Positive, PositiveFloats, UniquePaths,
                    UserPath, comma_list, listed, split)


def parse_scorer_args(value: Any) -> Any:
    """``("react.percentile=0.9", …)`` -> {"react": {"percentile": "0.9"}} (names checked, values cast by the
    scorer itself)."""
    return parse_args(value) if isinstance(value, (list, tuple)) else value


MODEL_HELP = "Alias, timm name, or fingerprint prefix of the cached sets."
SET_HELP = "a dataset name (as its manifest names it), a manifest file, or a feature-set path"


class Device(Settings):
    device: Annotated[str, Field("cpu", description=f"{DEVICE_HELP}")]


class CachedSets(Device):
    """Which cached sets a command reads: the model's sets of these datasets, under the cache root."""

    model: Annotated[str, Cli(short="-m"), Meta(scope="job"), Field(description=MODEL_HELP)]
    train: Annotated[str, Field(description=f"The ID training set: {SET_HELP}.")]
    test: Annotated[Optional[str], Field(None, description="The ID test set.")]
    eval: Annotated[Names, Cli(multiple=True, metavar="LIST"), Field(
        default_factory=list, description="OOD-generalisation sets (top-1): comma list, or repeat the option.")]
    cache: Cache
    allow_random_init: Annotated[bool, Field(
        False, description="Use sets extracted with --random-init (smoke tests: their embeddings barely depend on "
                           "the image).")]
    quiet: Annotated[bool, Meta(scope="cli"), Cli(short="-q"), Field(False, description="No progress, warnings only.")]


def _scorer_args(args: dict) -> dict:
    """Each scorer's given hyperparameters, checked (names, types, ranges) and cast by the scorer's own `Params`."""
    out = {}
    for name, params in args.items():
        if not isinstance(params, dict):
            raise ValueError(f"{name}: give its hyperparameters as a mapping, e.g. {{percentile: 0.9}}")
        made = make(name, **params)
        out[name] = {k: made.args[k] for k in params}
    return out


ScorerText = comma_list("|".join(["all", *SCORERS]), "scorer names joined by commas, or all")
#: the JSON Schema of scorer_args: each scorer's `Params`, or SCORER.PARAM=VALUE texts
_ArgsSchema = create_model("ScorerArgs", __config__=ConfigDict(extra="forbid"),
                           **{n: (Optional[c.Params], None) for n, c in SCORERS.items() if c.Params.model_fields})
ScorerNames = Annotated[list[str], BeforeValidator(split, json_schema_input_type=listed(ScorerText)),
                        AfterValidator(resolve)]
ScorerArgs = Annotated[dict[str, dict[str, Any]], BeforeValidator(
    parse_scorer_args, json_schema_input_type=Union[_ArgsSchema, list[Annotated[str, Field(
        pattern=r"^[^.=]+\.[^=]+=")]]]), AfterValidator(_scorer_args)]
SCORERS_HELP = ("OOD scorers (comma list, or all): `regcache scorers` lists them with their references. Those that "
                "need training statistics fit on view 0 of --train.")
SCORER_ARG_HELP = "A scorer hyperparameter, e.g. react.percentile=0.95 (repeatable); recorded with every result row."


class Scoring(Settings):
    """The OOD scorers a command applies, with their hyperparameters."""

    scorers: Annotated[ScorerNames, Cli(metavar="LIST"), Field(["msp", "energy", "maxlogit"],
                                                                description=SCORERS_HELP)]
    scorer_args: Annotated[ScorerArgs, Cli(flag="--scorer-arg", multiple=True, metavar="SCORER.PARAM=VALUE"),
                           Field(default_factory=dict, description=SCORER_ARG_HELP)]


def _preset(command: str, values: Any) -> Any:
    """Fill the fields the user left out from the named preset of ``command``."""
    if not isinstance(values, dict) or values.get("preset") is None:
        return values
    known = presets_of(command)
    name = values["preset"]
    if name not in known:
        return values  # the field's own check names the choices
    return known[name].fill({k: v for k, v in values.items() if v is not None})


class Training(Device):
    """How heads are trained: the solver and its grid (one head per value), shared by every head of a run."""

    features: Annotated[Combos, Cli(short="-f", multiple=True, metavar="LIST", show="the --preset's"), Field(
        min_length=1, description="A feature combination such as cls,reg; repeat for several, all trained in one "
                                  "pass.")]
    solver: Annotated[literal(SOLVERS), Field("minibatch", description="; ".join(
        f"{k}: {v}" for k, v in SOLVERS.items()) + ".")]
    C: Annotated[PositiveFloats, Cli(metavar="LIST"), Field(
        [1.0], description="lbfgs: inverse regularisation values (comma list), scikit-learn's C: "
                           "C * sum(loss) + |W|^2/2.")]
    tol: Annotated[Positive, Field(1e-4, description="lbfgs: stop a head when every gradient entry is below this.")]
    lr: Annotated[PositiveFloats, Cli(metavar="LIST"), Field(
        [0.01], description="Learning rates (comma list): one head each (minibatch).")]
    wd: Annotated[NonNegativeFloats, Cli(metavar="LIST"), Field(
        [0.0], description="Weight decays (comma list): one head each (minibatch).")]
    optimizer: Annotated[literal(OPTIMIZERS), Field("sgd", description="; ".join(
        f"{k}: {v}" for k, v in OPTIMIZERS.items()) + ".")]
    iterations: Annotated[Optional[Count], Cli(show="10000; lbfgs 1000"), Field(
        None, description="Steps (minibatch) or the iteration cap (lbfgs).")]
    batch_size: Annotated[Count, Field(4096, description="Rows per step (minibatch).")]
    momentum: Annotated[float, Field(0.9, ge=0, lt=1, description="SGD momentum.")]
    init: Annotated[literal(INITS), Field("zeros", description="How minibatch heads start: " + "; ".join(
        f"{k}: {v}" for k, v in INITS.items()) + ".")]
    init_std: Annotated[Positive, Field(0.01, description="The std of --init normal.")]
    seed: Annotated[int, Field(0, description="Seed of batches, of the held-out split and of --init normal.")]

    @model_validator(mode="after")
    def _init_for_minibatch(self):
        if self.solver in BY_C and self.init != "zeros":
            raise ValueError(f"{self.solver} starts every head at zero (its objective is convex: the optimum does not "
                             "depend on the start); init applies to the minibatch solver")
        return self

    @property
    def max_iter(self) -> int:
        """``iterations``, or the solver's default (10,000 steps; an lbfgs cap of 1,000)."""
        return self.iterations or (1_000 if self.solver in BY_C else 10_000)

    @property
    def grid(self) -> list[tuple[float, float]]:
        """The minibatch solver's (lr, wd) pairs, one head each per combination."""
        return [(lr, wd) for lr in self.lr for wd in self.wd]

    @property
    def heads_per_combination(self) -> int:
        return len(self.C) if self.solver in BY_C else len(self.grid)


class ProbeSettings(Scoring, Training, CachedSets):
    """`regcache probe`: train linear heads on cached features, select, evaluate (never loads a backbone)."""

    val: Annotated[Optional[str], Field(
        None, description="The set that selects the heads [default: a held-out part of --train].")]
    test: Annotated[Optional[str], Field(
        None, description="ID test set: ID accuracy, ID side of anomaly scores; required with several heads per "
                          "combination [default: the selection set, allowed only with one head per combination].")]
    anomaly: Annotated[Names, Cli(multiple=True, metavar="LIST"), Field(
        default_factory=list, description="Anomaly sets (FPR95, AUROC, AP): comma list, or repeat the option.")]
    preset: Annotated[Optional[literal({n: p.summary for n, p in presets_of("probe").items()})], Field(
        None, description="A named protocol (its grid, solver and default features; options given explicitly "
                          "win): " + "; ".join(f"{n}: {p.summary}" for n, p in presets_of("probe").items()) + ".")]
    refit: Annotated[bool, Field(False, description="After selection, train the chosen setting again on "
                                                    "train + val.")]
    val_fraction: Annotated[float, Field(0.1, gt=0, le=0.5, description="Held out of --train when there is "
                                                                        "no --val.")]
    holdout: Annotated[literal(HOLDOUTS), Field("random", description="How --val-fraction is held out: " + "; ".join(
        f"{k}: {v}" for k, v in HOLDOUTS.items()) + ".")]
    stream: Annotated[bool, Field(False, description="Read the training set window by window (sets larger than "
                                                     "memory).")]
    stream_window: Annotated[Count, Field(16, description="Shards per shuffle window with --stream.")]
    augmented: Annotated[bool, Field(
        False, description="The protocol trains on augmented views (extract --views > 1): warn when the training "
                           "set holds the plain crop only.")]
    plots: Annotated[bool, Field(True, description="Write the ROC and histogram PNGs.")]
    out: Annotated[Optional[UserPath], Meta(scope="cli"), Cli(show="runs/MODEL-TIME"), Field(
        None, description="Run directory (must not exist, or be empty).")]

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, values: Any) -> Any:
        return _preset("probe", values)

    @model_validator(mode="after")
    def _consistent(self):
        if self.solver in BY_C and self.stream:
            raise ValueError(f"{self.solver} is full-batch: it needs the training set in memory; drop stream "
                             "(--stream) or use the minibatch solver")
        if self.stream and not self.val:
            raise ValueError("a streamed training set needs a val set (--val): no rows are held out of it")
        if self.heads_per_combination > 1 and (not self.test or self.test == self.val):
            raise ValueError(self.selection_needs_test())
        if self.refit and (not self.test or self.test == self.val):
            raise ValueError(f"refit trains the selected heads again on {self.train} + "
                             f"{self.val or 'its held-out part'}, so the ID numbers need a set apart from both: "
                             "name one as test (--test)")
        return self

    def selection_needs_test(self) -> str:
        """Why several heads a combination need a test set apart from the one that selects them."""
        sel = f"val ({self.val})" if self.val else f"a held-out part of train ({self.train})"
        return (f"{self.heads_per_combination} heads per feature combination are selected on {sel}; the set that "
                "selects them must not also give the ID test numbers: name another ID set as test (--test; e.g. the "
                "official validation split)")


class ScoreSettings(Device):
    """`regcache score`: a run's saved heads on further cached sets."""

    run: Annotated[UserPath, Cli(argument=True), Field(description="A probe run directory.")]
    eval: Annotated[Names, Cli(multiple=True, metavar="LIST"), Field(
        default_factory=list, description="OOD-generalisation sets (top-1).")]
    anomaly: Annotated[Names, Cli(multiple=True, metavar="LIST"), Field(
        default_factory=list, description="Anomaly sets.")]
    scorers: Annotated[Optional[ScorerNames], Cli(metavar="LIST", show="the run's"), Field(
        None, description=SCORERS_HELP)]
    scorer_args: Annotated[Optional[ScorerArgs], Cli(flag="--scorer-arg", multiple=True,
                                                     metavar="SCORER.PARAM=VALUE", show="the run's"), Field(
        None, description=SCORER_ARG_HELP + " Replaces the run's.")]
    cache: Annotated[Optional[UserPath], Cli(show="the run's"), Field(None, description="Cache root.")]
    out: Annotated[Optional[UserPath], Cli(show="RUN/score-TIME"), Field(None, description="Where to write.")]
    quiet: Annotated[bool, Meta(scope="cli"), Cli(short="-q"), Field(False, description="No progress, warnings only.")]


class KnnSettings(CachedSets):
    """`regcache knn`: DINOv2's weighted kNN classifier on cached features."""

    features: Annotated[Combos, Cli(short="-f", multiple=True, metavar="LIST"), Field(
        ["cls"], min_length=1, description="A feature combination such as cls,patch; repeat for several.")]
    test: Annotated[str, Field(description="ID set to report on.")]
    preset: Annotated[Optional[literal({n: p.summary for n, p in presets_of("knn").items()})], Field(
        "dinov2-knn", description="The protocol whose k and temperature are the defaults.")]
    k: Annotated[Counts, Cli(metavar="LIST"), Field([10, 20, 100, 200], description="Neighbour counts (comma list); "
                                                    "each at most the training rows.")]
    temperature: Annotated[Positive, Field(0.07, description="Vote weight exp(sim / T).")]
    out: Annotated[Optional[UserPath], Meta(scope="cli"), Cli(show="runs/knn-MODEL-TIME"), Field(
        None, description="Run directory: results.parquet, results.md.")]

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, values: Any) -> Any:
        return _preset("knn", values)


class FewshotSettings(CachedSets):
    """`regcache fewshot`: k-shot logistic regression over several seeds."""

    features: Annotated[Combos, Cli(short="-f", multiple=True, metavar="LIST"), Field(
        ["cls"], min_length=1, description="A feature combination such as cls,patch; repeat for several.")]
    test: Annotated[str, Field(description="ID set to report on.")]
    shots: Annotated[Counts, Cli(metavar="LIST"), Field([1, 2, 5, 10], description="Images per class (comma list).")]
    seeds: Annotated[Ints, Cli(metavar="LIST"), Field([0, 1, 2], description="One draw of the shots per seed.")]
    C: Annotated[Positive, Field(1.0, description="Logistic regression's C (scikit-learn's objective).")]
    out: Annotated[Optional[UserPath], Meta(scope="cli"), Cli(show="runs/fewshot-MODEL-TIME"), Field(
        None, description="Run directory: results.parquet, results.md.")]


class ReportSettings(Settings):
    """`regcache report`: several runs' results in one table."""

    runs: Annotated[UniquePaths, Cli(argument=True, multiple=True, metavar="RUN..."), Field(
        min_length=1, description="Run directories (or their results.parquet files).")]
    out: Annotated[Optional[UserPath], Cli(show="print only"), Field(
        None, description="Also write the merged report here: report.md, results.parquet and results.csv (a new "
                          "or empty directory).")]
    plot: Annotated[bool, Field(False, description="Also draw report.png into --out: per metric (top-1, AUROC, FPR95) "
                                                   "a group of bars per set, a bar per model and feature combination "
                                                   "(the paper's Table I as a picture).")]
    plot_scorer: Annotated[Optional[str], Cli(show="the runs' first"), Field(
        None, description="The scorer whose AUROC and FPR95 --plot draws.")]
    pool_seeds: Annotated[bool, Field(False, description=(
        "Runs that differ only in their --seed are one row: each cell is the mean over the seeds ± their sample "
        "standard deviation. Runs that differ in any other setting or set stay apart; two runs of one seed with "
        "the same settings are refused (not independent draws)."))]

    @model_validator(mode="after")
    def _plot_needs_out(self):
        if self.plot and self.out is None:
            raise ValueError("plot (--plot) draws report.png into --out: give --out")
        return self
