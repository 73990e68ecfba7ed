"""Commands that read the cache: probe, score, report, and run for whole pipelines."""
from __future__ import annotations

import os
from pathlib import Path

import click

from .common import (
    cache_option,
    main,
    new_dir,
    parse_floats,
    setup_logging,
    split_names,
)

scorer_arg_option = click.option(
    "--scorer-arg", "scorer_args", multiple=True, metavar="SCORER.PARAM=VALUE",
    help="A scorer hyperparameter, e.g. react.percentile=0.95 (repeatable); recorded with every result row.")


@main.command()
@click.option("--model", "-m", required=True, help="Alias, timm name, or fingerprint prefix of the cached sets.")
@click.option("--features", "-f", "combos", multiple=True, metavar="LIST",
              help="A feature combination such as cls,reg; repeat for several, all trained in one pass "
              "[default: the --preset's].")
@click.option("--train", required=True, help="Dataset name (manifest name) or feature-set path of the ID train set.")
@click.option("--val", default=None, help="Set that selects the heads [default: a held-out part of --train].")
@click.option("--test", default=None, help="ID test set: ID accuracy, ID side of anomaly scores; required with an "
              "--lr/--wd grid [default: the selection set, allowed only with one head per combination].")
@click.option("--eval", "eval_", multiple=True, metavar="LIST", help="OOD-generalisation sets (top-1).")
@click.option("--anomaly", multiple=True, metavar="LIST", help="Anomaly sets (FPR95, AUROC, AUPR).")
@cache_option
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory [default: runs/MODEL-TIME].")
@click.option("--preset", default=None, metavar="NAME", help="A named protocol (its grid, solver and default "
              "features; options given explicitly win): dinov3-logreg, dinov2-linear, dinov2-linear-last4. See README, Probing.")
@click.option("--solver", type=click.Choice(["minibatch", "lbfgs"]), default="minibatch", show_default=True,
              help="minibatch: SGD/AdamW over --lr x --wd (the paper; works with --stream). lbfgs: full-batch "
              "multinomial logistic regression, one head per --C, all fitted together (sets in memory).")
@click.option("--C", "cs", default="1", show_default=True,
              help="lbfgs: inverse regularisation values (comma list), scikit-learn's C: C * sum(loss) + |W|^2/2.")
@click.option("--tol", default=1e-4, show_default=True, help="lbfgs: stop a head when every gradient entry is below.")
@click.option("--refit", is_flag=True, help="After selection, train the chosen setting again on train + val.")
@click.option("--lr", default="0.01", show_default=True, help="Learning rates (comma list): one head each.")
@click.option("--wd", default="0", show_default=True, help="Weight decays (comma list): one head each.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--iterations", type=int, default=None,
              help="Steps (minibatch) or the iteration cap (lbfgs) [default: 10000, lbfgs 1000].")
@click.option("--batch-size", default=4096, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--val-fraction", default=0.1, show_default=True, help="Held out of --train when no --val.")
@click.option("--scorers", default="msp,energy,maxlogit", show_default=True,
              help="OOD scorers (comma list, or all): `regcache scorers` lists them with their references. "
                   "Those that need training statistics fit on view 0 of --train, read in chunks.")
@scorer_arg_option
@click.option("--knn-k", default=50, show_default=True, help="k of the knn scorer (as --scorer-arg knn.k=K).")
@click.option("--stream", is_flag=True, help="Read the training set window by window (sets larger than memory).")
@click.option("--allow-random-init", is_flag=True,
              help="Use sets extracted with --random-init (smoke tests: their embeddings barely depend on the image).")
@click.option("--stream-window", default=16, show_default=True, help="Shards per shuffle window with --stream.")
@click.option("--no-plots", is_flag=True, help="Skip the ROC and histogram PNGs.")
@click.option("--quiet", "-q", is_flag=True)
def probe(model, combos, train, val, test, eval_, anomaly, cache, out, preset, solver, cs, tol, refit, lr, wd,
          optimizer, iterations, batch_size, seed,
          device, val_fraction, scorers, scorer_args, knn_k, stream, allow_random_init, stream_window, no_plots, quiet):
    """Train linear heads on cached features and evaluate them (never loads a backbone).

    Writes results.parquet (long format), results.md (the paper's Table I layout), heads.safetensors,
    config.json and plots/ into the run directory, and prints the tables.
    """
    from datetime import datetime

    from ..extract import default_cache_root
    from ..probe import ProbeConfig, ProbeJob, run_probe
    from ..report import write_run

    setup_logging(quiet)
    default_out = Path("runs") / f"{model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        job = ProbeJob(model=model, train=train, cache=cache or default_cache_root(), val=val, test=test,
                       eval=split_names(eval_),
                       anomaly=split_names(anomaly), scorers=tuple(split_names((scorers,))), knn_k=knn_k,
                       scorer_args=parse_scorer_args(scorer_args),
                       allow_random_init=allow_random_init)
        device = _init_distributed(device)
        options = dict(features=list(combos), lrs=parse_floats(lr), wds=parse_floats(wd), optimizer=optimizer,
                       iterations=iterations, batch_size=batch_size, seed=seed, device=device,
                       val_fraction=val_fraction, stream=stream, stream_window=stream_window, solver=solver,
                       Cs=parse_floats(cs), tol=tol, refit=refit)
        cfg = ProbeConfig(**_with_preset(preset, options))
        result = run_probe(job, cfg, progress=not quiet)
        if result is not None:  # None: a rank other than 0 under torchrun
            out = out or new_dir(default_out)
            write_run(out, result, job, cfg, plots=not no_plots)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        _leave_distributed()
    if result is not None:
        click.echo((out / "results.md").read_text())
        click.echo(f"run directory: {out}")


#: probe options -> the ProbeConfig field each sets
_FIELDS = {"combos": "features", "lr": "lrs", "wd": "wds", "cs": "Cs", "optimizer": "optimizer",
           "iterations": "iterations", "batch_size": "batch_size", "solver": "solver", "tol": "tol", "refit": "refit"}


def _with_preset(preset: str | None, options: dict) -> dict:
    """ProbeConfig arguments: without a preset the options; with one, its settings under the options the
    user typed (click's parameter source tells typed from default)."""
    from click.core import ParameterSource

    from ..probe.presets import get_preset

    if preset is None:
        if not options["features"]:
            raise click.UsageError("give --features (or a --preset with default features)")
        return options
    ctx = click.get_current_context()
    typed = {f for opt, f in _FIELDS.items() if ctx.get_parameter_source(opt) == ParameterSource.COMMANDLINE}
    return get_preset(preset).config({k: v for k, v in options.items() if k in typed or k not in _FIELDS.values()})


def parse_scorer_args(items) -> dict:
    """``--scorer-arg react.percentile=90`` (repeatable) into {scorer: {param: value}}, names checked."""
    from ..ood import parse_args

    try:
        return parse_args(items)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--scorer-arg") from None


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
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--eval", "eval_", multiple=True, metavar="LIST", help="OOD-generalisation sets (top-1).")
@click.option("--anomaly", multiple=True, metavar="LIST", help="Anomaly sets.")
@click.option("--scorers", default=None, help="Override the run's scorers (comma list, or all).")
@scorer_arg_option
@click.option("--device", default="cpu", show_default=True, help="Where k-NN and NNGuide search the training bank.")
@cache_option
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: RUN/score-TIME]")
def score(run, eval_, anomaly, scorers, scorer_args, device, cache, out):
    """Apply the heads saved in RUN to further cached sets.

    Feature scorers fit on the run's training set, streamed from the store in chunks (view 0 only).
    """
    from datetime import datetime

    from ..probe import score_run
    from ..report import markdown, plot_scores

    setup_logging(False)
    try:
        result = score_run(run, split_names(eval_), split_names(anomaly), split_names((scorers,)) if scorers else None,
                           cache, parse_scorer_args(scorer_args) if scorer_args else None, device)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    out = out or new_dir(run / f"score-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    result.results.to_parquet(out / "results.parquet", index=False)
    (out / "results.md").write_text(markdown(result.results))
    if result.scores:
        plot_scores(out / "plots", result.scores)
    click.echo((out / "results.md").read_text())
    click.echo(f"written to {out}")


@main.command("scorers")
def scorers_cmd():
    """List the OOD scorers: name, what they need, hyperparameters with defaults (and their source), reference."""
    from ..ood import SCORERS

    for name, cls in SCORERS.items():
        needs = cls.inputs + (" + training bank" if cls.needs_bank else "")
        params = ", ".join(f"{k}={v}" for k, v in cls.params.items()) or "-"
        click.echo(f"{name:15} {needs:25} {params:22} defaults: {cls.defaults}\n{'':15} {cls.reference}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write the merged table: .md for Markdown, .parquet or .csv for the long results.")
def report(runs, out):
    """Merge the results of several runs (directories or results.parquet files) into one table."""
    from ..report import markdown, merge

    try:
        df = merge(runs)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    text = markdown(df)
    click.echo(text)
    _write(df, out, text)


@main.command("run")
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--models", "models_", multiple=True, metavar="LIST",
              help="Only these of the pipeline's models (comma list or repeated).")
@click.option("--stage", "stages", multiple=True, type=click.Choice(["extract", "probe", "analyse", "report"]),
              help="Only this stage (repeat for several) [default: all, in order].")
@click.option("--dry-run", is_flag=True, help="Load nothing; print every job, cached or to do, and its cost.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a field, e.g. extract.precision=bf16, probes.table1.iterations=100, "
                   "vars.REGCACHE_DATA=/data (VALUE is YAML); recorded in pipeline.json.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, warnings only.")
def run_cmd(pipeline, models_, stages, dry_run, sets, quiet):
    """Run PIPELINE (pipelines/NAME.yaml): extract what is not cached, probe, analyse, report.

    Finished jobs are skipped (a rerun loads no backbone and trains no head); an interrupted run does
    only what is missing. Writes OUT/report.md and OUT/pipeline.json.
    """
    from ..pipeline import STAGES, load_pipeline, parse_overrides, run_pipeline

    setup_logging(quiet)
    try:
        pl = load_pipeline(pipeline, parse_overrides(sets), allow_unset=dry_run)
        order = tuple(s for s in STAGES if s in stages) if stages else STAGES
        run_pipeline(pl, order, split_names(models_) or None, dry_run=dry_run, progress=not quiet, echo=click.echo)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e


def _id_sets(f):
    """Options shared by knn and fewshot: the model, the sets, the features, where to write."""
    for opt in reversed([
        click.option("--model", "-m", required=True, help="Alias, timm name, or fingerprint prefix of the cached sets."),
        click.option("--features", "-f", "combos", multiple=True, metavar="LIST",
                     help="A feature combination such as cls,patch; repeat for several [default: cls]."),
        click.option("--train", required=True, help="The labelled set to learn from (its view-0 rows)."),
        click.option("--test", required=True, help="ID set to report on."),
        click.option("--eval", "eval_", multiple=True, metavar="LIST", help="OOD-generalisation sets."),
        cache_option,
        click.option("--device", default="cpu", show_default=True),
        click.option("--out", type=click.Path(path_type=Path), default=None,
                     help="Also write the long results: .parquet or .csv."),
    ]):
        f = opt(f)
    return f


def _job(model, train, test, eval_, cache):
    from ..extract import default_cache_root
    from ..probe import ProbeJob

    return ProbeJob(model=model, train=train, cache=cache or default_cache_root(), test=test, eval=split_names(eval_))


def _write(df, out: Path | None, markdown: str | None = None) -> None:
    """A results table to ``--out``, in the format its suffix names (.md where the command has a Markdown form)."""
    writers = {".csv": lambda: df.to_csv(out, index=False), ".parquet": lambda: df.to_parquet(out, index=False),
               **({".md": lambda: out.write_text(markdown)} if markdown is not None else {})}
    if out is None:
        return
    if out.suffix not in writers:
        raise click.BadParameter(f"--out must end in {', '.join(sorted(writers))}")
    writers[out.suffix]()


@main.command()
@_id_sets
@click.option("--preset", type=click.Choice(["dinov2-knn"]), default="dinov2-knn", show_default=True,
              help="The protocol whose k and temperature are the defaults.")
@click.option("--k", "ks", default=None, help="Neighbour counts (comma list) [default: the preset's, 10,20,100,200].")
@click.option("--temperature", type=float, default=None, help="Vote weight exp(sim / T) [default: the preset's, 0.07].")
def knn(model, combos, train, test, eval_, cache, device, out, preset, ks, temperature):
    """Weighted kNN classifier on cached features (DINOv2's: cosine similarity, votes exp(sim / T)).

    Top-1 and top-5 per k on --test and --eval sets; labels are mapped into --train's classes by name.
    """
    from ..probe.knn import run_knn
    from ..probe.presets import get_preset

    setup_logging(False)
    p = get_preset(preset).settings
    try:
        df = run_knn(_job(model, train, test, eval_, cache), [c.split(",") for c in combos] or [["cls"]],
                     tuple(int(k) for k in ks.split(",")) if ks else p["ks"],
                     p["temperature"] if temperature is None else temperature, device)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(df.pivot_table(index=["features", "set", "metric"], columns="k", values="value").round(4).to_string())
    _write(df, out)


@main.command()
@_id_sets
@click.option("--shots", default="1,2,5,10", show_default=True, help="Images per class (comma list).")
@click.option("--seeds", default="0,1,2", show_default=True, help="One draw of the shots per seed (comma list).")
@click.option("--C", "c", default=1.0, show_default=True, help="Logistic regression's C (scikit-learn's objective).")
def fewshot(model, combos, train, test, eval_, cache, device, out, shots, seeds, c):
    """k-shot logistic regression: k images per class drawn per seed from --train, fitted with L-BFGS.

    Reports top-1, top-5 and mean-per-class recall on --test and --eval, per seed and as mean ± std.
    """
    from ..probe.knn import run_few_shot

    setup_logging(False)
    try:
        df, summary = run_few_shot(_job(model, train, test, eval_, cache), [x.split(",") for x in combos] or [["cls"]],
                                   [int(k) for k in shots.split(",")], [int(s) for s in seeds.split(",")], c, device)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(summary.round(4).to_string(index=False))
    _write(df, out)
