"""Commands that fill the cache or run a backbone: extract, models, registers find."""
from __future__ import annotations

import os
import sys

import click

from ..settings import PER_MODEL, ExtractSettings, RegistersFindSettings
from .common import errors, main, setup_logging
from .options import flag, options, settings


@main.command()
@options(ExtractSettings, text=PER_MODEL)
def extract(**given):
    """Stream DATA through MODEL once and store its token features.

    Every shard is committed whole; rerunning skips what is committed and retries what failed.
    A feature set that already holds these features is reused with no backbone work.

    Several models in one pass: --model vits,vitb_reg,vitl_reg reads and decodes each shard once for all
    of them, and each writes its own set (the same bytes as its own extraction). The per-model options
    (--checkpoint, --random-init, --pos-embed, --test-time-registers, --test-time-patches, and the
    preprocessing: --size, --resize, --crop-mode, --interpolation; --mean and --std as R,G,B per model,
    separated by ';') then take one value for all, or one per model in the same order, comma-separated.

    Exit status 1 if any shard failed (missing, truncated, damaged), if every sample failed, if a model
    failed, if the set is left incomplete (another extraction of it still holds shards: it says which, by
    pid and host), or if --finalize finds shards that no part has committed yet.
    """
    from ..extract import extract_many

    all_settings = [settings(ExtractSettings, values) for values in _per_model(given)]
    if all_settings[0].launcher == "torchrun" and "LOCAL_RANK" not in os.environ:
        _exec_torchrun(all_settings[0].nproc_per_node)
    setup_logging(all_settings[0].quiet)
    with errors():
        results = extract_many(all_settings)
    failed = False
    for s, res in zip(all_settings, results):
        failed |= _report(res, s.model if len(results) > 1 else "")
    if failed:
        sys.exit(1)


def _per_model(given: dict) -> list[dict]:
    """The command's values for each model of ``--model a,b,c``: per-model options split to one value each."""
    models = [m.strip() for m in (given.get("model") or "").split(",") if m.strip()] or [given.get("model")]
    out = [dict(given, model=m) for m in models]
    for name in PER_MODEL:
        if name == "model" or given.get(name) is None:
            continue
        parts = [v.strip() for v in str(given[name]).split(";" if name in ("mean", "std") else ",")]
        if len(parts) not in (1, len(models)):
            raise click.UsageError(f"{flag(ExtractSettings, name)} takes one value, or one per model "
                                   f"({len(models)}, comma-separated); got {len(parts)}")
        for values, part in zip(out, parts * len(models) if len(parts) == 1 else parts):
            values[name] = part
    twice = sorted({m["model"] for i, m in enumerate(out) if m in out[:i]})
    if twice:  # the same model with the same per-model options: one set, given twice
        raise click.UsageError(f"--model: {', '.join(twice)} given more than once with the same options (each "
                               "model is extracted once: give it once)")
    return out


def _report(res, label: str) -> bool:
    """One model's outcome, as lines; whether it failed."""
    who = f"{label}: " if label else ""
    state = ("complete" if res.complete else "unusable" if res.error
             else f"incomplete ({res.missing_units} of the shards not committed yet)")
    if not res.complete and res.one_part and not res.failed_shards and not res.error:
        holders = ", ".join(f"pid {pid} on host {host}" for host, _, pid in
                            (w.rpartition(":") for w in sorted(set(res.held.values()))))
        res.error = (f"incomplete: {len(res.held)} of its {res.missing_units} missing shards are held by {holders}; "
                     "wait for that extraction to finish, or run this command again (it takes over the shards of a "
                     "writer that died)" if res.held else
                     f"incomplete: {res.missing_units} shards not committed; run this command again")
    click.echo(f"{who}{'reused' if res.reused else 'done'}: {res.ok} rows stored, {res.failed} samples failed, "
               f"{len(res.failed_shards)} shards failed, {res.units_done} shards written, {res.units_skipped} "
               f"skipped{f', {res.units_adopted} taken from an earlier set' if res.units_adopted else ''}, "
               f"{res.seconds:.1f} s; {state} store {res.path}")
    if res.stream_seconds:
        click.echo(f"  streamed {res.units_done} shards in {res.stream_seconds:.1f} s")
    for shard, reason in res.failed_shards.items():
        click.echo(f"  failed shard {shard}: {reason}", err=True)
    if res.error:
        click.echo(f"  {res.error}", err=True)
    return bool(res.failed_shards or res.error)


def _exec_torchrun(nproc: int) -> None:
    """Replace this process by torchrun running the same command once per rank."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a in ("--launcher", "--nproc-per-node"):
            skip = True
        elif not a.startswith(("--launcher=", "--nproc-per-node=")):
            argv.append(a)
    os.execvp(sys.executable, [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                               "-m", "regcache", *argv])


@main.command("models")
def models_cmd():
    """List the model aliases: the timm model each one is, its eval transform, registers, patch size and GFLOPs
    per image at that size (counted on an empty model, as the pipeline's dry run does)."""
    from ..doctables import alias_rows

    rows = [["alias", "timm model", "eval transform", "reg", "patch", "GFLOP", "notes"], *alias_rows()]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        click.echo("  ".join(f"{v:{w}}" for v, w in zip(r, widths)) + ("  " + r[6] if r[6] else ""))
    click.echo("Any other timm ViT name (arch or arch.tag) works as is, at timm's own input size.")


@main.group(short_help="Registers for a ViT without them: find (test-time), distill (PH-Reg).")
def registers():
    """Registers for a ViT trained without them: test-time registers (Jiang et al. 2025; `find` their neurons, then
    extract with --test-time-registers) or post-hoc registers (PH-Reg, Chen et al. 2025; `distill` a student)."""


@registers.command("find")
@options(RegistersFindSettings)
def registers_find(**given):
    """Find the register neurons: score every MLP hidden neuron (blocks[i].mlp.act) by its mean |activation|
    at the high-norm patch tokens of the detection block, and keep the top-k of blocks <= --max-layer.

    Prints the patch-norm profile per block, the outliers (by both threshold and percentile) and the
    neurons; writes them, with the model, its weights and these settings, to --out.
    """
    from ..registers import CLEAR_RATIO, find

    s = settings(RegistersFindSettings, given)
    setup_logging(False)
    with errors():
        found = find(s)
    click.echo("block  median   p99     max    p99/median  (patch-token norms, before any norm)")
    for b, st in found.block_norms.items():
        mark = "  <- detection" if b == found.detect_layer else ""
        click.echo(f"{b:>5}  {st['median']:7.1f} {st['p99']:7.1f} {st['max']:7.1f} {st['ratio']:8.2f}{mark}")
    click.echo(f"{found.images} images, {found.tokens} patch tokens at block {found.detect_layer}: {found.outliers} "
               f"outliers ({100 * found.outliers / found.tokens:.2f}%), norm > {found.threshold:.2f} "
               f"(the {found.percentile:.2f}th percentile)")
    peak = max(st["ratio"] for st in found.block_norms.values())
    if peak < CLEAR_RATIO:
        click.echo(f"note: no block has clearly high-norm patch tokens (p99/median <= {peak:.2f} everywhere, "
                   f"below {CLEAR_RATIO}): the outliers are the top {100 - found.percentile:.2f}% by definition, "
                   "and the neurons found need not be register neurons")
    per_block = ", ".join(f"block {b}: {len(ids)}" for b, ids in found.neurons.items())
    click.echo(f"top {len(found.scores)} neurons ({per_block}): " +
               ", ".join(f"{b}:{n} ({x:.2f})" for b, n, x in found.scores))
    click.echo(f"written to {s.out}")
