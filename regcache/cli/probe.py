"""Commands that read the cache: probe, score, report, and run for whole pipelines."""
from __future__ import annotations

import os
from pathlib import Path

import click

from .common import cache_option, main, parse_floats, setup_logging, split_names

scorer_arg_option = click.option(
    "--scorer-arg", "scorer_args", multiple=True, metavar="SCORER.PARAM=VALUE",
    help="A scorer hyperparameter, e.g. react.percentile=0.95 (repeatable); recorded with every result row.")


@main.command()
@click.option("--model", "-m", required=True, help="Alias, timm name, or fingerprint prefix of the cached sets.")
@click.option("--features", "-f", "combos", multiple=True, required=True, metavar="LIST",
              help="A feature combination such as cls,reg; repeat for several, all trained in one pass.")
@click.option("--train", required=True, help="Dataset name (manifest name) or feature-set path of the ID train set.")
@click.option("--val", default=None, help="Set that selects the heads [default: a held-out part of --train].")
@click.option("--test", default=None, help="ID test set: ID accuracy, ID side of anomaly scores; required with an "
              "--lr/--wd grid [default: the selection set, allowed only with one head per combination].")
@click.option("--eval", "eval_", multiple=True, metavar="LIST", help="OOD-generalisation sets (top-1).")
@click.option("--anomaly", multiple=True, metavar="LIST", help="Anomaly sets (FPR95, AUROC, AUPR).")
@cache_option
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory [default: runs/MODEL-TIME].")
@click.option("--lr", default="0.01", show_default=True, help="Learning rates (comma list): one head each.")
@click.option("--wd", default="0", show_default=True, help="Weight decays (comma list): one head each.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--iterations", default=10_000, show_default=True)
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
def probe(model, combos, train, val, test, eval_, anomaly, cache, out, lr, wd, optimizer, iterations, batch_size, seed,
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
    out = out or Path("runs") / f"{model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        job = ProbeJob(model=model, train=train, cache=cache or default_cache_root(), val=val, test=test,
                       eval=split_names(eval_),
                       anomaly=split_names(anomaly), scorers=tuple(split_names((scorers,))), knn_k=knn_k,
                       scorer_args=parse_scorer_args(scorer_args),
                       allow_random_init=allow_random_init)
        device = _init_distributed(device)
        cfg = ProbeConfig(features=list(combos), lrs=parse_floats(lr), wds=parse_floats(wd), optimizer=optimizer,
                          iterations=iterations, batch_size=batch_size, seed=seed, device=device,
                          val_fraction=val_fraction, stream=stream, stream_window=stream_window)
        result = run_probe(job, cfg, progress=not quiet)
        if result is not None:  # None: a rank other than 0 under torchrun
            write_run(out, result, job, cfg, plots=not no_plots)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        _leave_distributed()
    if result is not None:
        click.echo((out / "results.md").read_text())
        click.echo(f"run directory: {out}")


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
    out = out or run / f"score-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        result = score_run(run, split_names(eval_), split_names(anomaly), split_names((scorers,)) if scorers else None,
                           cache, parse_scorer_args(scorer_args) if scorer_args else None, device)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
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
    if out is None:
        return
    if out.suffix == ".md":
        out.write_text(text)
    elif out.suffix == ".csv":
        df.to_csv(out, index=False)
    elif out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    else:
        raise click.BadParameter("--out must end in .md, .csv or .parquet")


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
