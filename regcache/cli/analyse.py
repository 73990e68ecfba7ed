"""Analyses of cached sets and of a model's tokens: norms, feature maps, token probes, attention."""
from __future__ import annotations

import click

from ..settings import AttentionSettings, FeaturemapSettings, NormsSettings, TokenprobeSettings
from .common import errors, main, setup_logging
from .options import options, settings


@main.command()
@options(NormsSettings)
def norms(**given):
    """Token norms from the cache: histograms by token type, outliers (>98th percentile of patch norms)
    and where they sit; several feature sets (e.g. vitl and vitl_reg) side by side.

    Writes norm_histograms.png, outlier_positions.png, summary.json and summary.parquet; for sets
    extracted with --layers, also the per-block view (patch-norm percentiles block by block: where do
    the high-norm tokens appear?) in block_norms.png and the summaries.
    """
    from ..analysis import norms as run

    setup_logging(False)
    with errors():
        done = run(settings(NormsSettings, given))
    for s in done.found:
        click.echo(f"{s.name}: {s.images} images, threshold {s.threshold:.2f}, "
                   f"{100 * s.images_with_outlier:.1f}% of images with an outlier, "
                   f"{s.outliers_per_image:.2f} outliers per image; median norms "
                   + ", ".join(f"{k} {v:.1f}" for k, v in s.median_norm.items()))
        for block, prof in s.blocks.items():
            click.echo(f"  block {block:>3}: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in prof.items()))
    click.echo(f"written to {done.out}")


@main.command()
@options(FeaturemapSettings)
def featuremap(**given):
    """Patch-norm grids of chosen images (the study's feature maps), beside the inputs when the shards are at hand."""
    from ..analysis import featuremap as run

    setup_logging(False)
    with errors():
        done = run(settings(FeaturemapSettings, given))
    for p in done.found:
        click.echo(str(p))


@main.command()
@options(TokenprobeSettings)
def tokenprobe(**given):
    """Linear probes that read a patch token's grid position (and, with --pixels, its patch's pixels) from
    the token, outliers against normal tokens (claim 4 of the reproducibility study).

    Needs feature sets extracted with --features tokens,norms (every patch token: small sets only).
    Writes tokenprobe.json into the output directory.
    """
    from ..analysis import tokenprobe as run

    setup_logging(False)
    with errors():
        done = run(settings(TokenprobeSettings, given))
    for r in done.found:
        click.echo(f"{r['name']}: position accuracy {100 * r['accuracy']:.1f}% (chance {100 * r['chance']:.1f}%), "
                   f"outlier tokens {100 * r['accuracy_outliers']:.1f}% (n={r['outliers']}), "
                   f"normal tokens {100 * r['accuracy_normal']:.1f}%; {r['test_images']} held-out images")
        if "pixels" in r:
            px = r["pixels"]
            click.echo(f"  pixels: held-out RMSE {px['rmse']:.4f} (mean-patch baseline {px['rmse_mean_patch']:.4f}), "
                       f"outlier tokens {px['rmse_outliers']:.4f} (n={px['outliers']}), normal {px['rmse_normal']:.4f}")
    click.echo(f"written to {done.out}")


@main.command()
@options(AttentionSettings)
def attention(**given):
    """Last-block attention of [CLS] (and registers) to the patches, averaged over heads, for a few images."""
    from ..analysis import attention as run

    setup_logging(False)
    with errors():
        done = run(settings(AttentionSettings, given))
    for part in done.found:
        if "figures" in part:
            click.echo("\n".join(part["figures"]))
        if "similarity" in part:
            r = part["similarity"]
            click.echo(f"neighbour similarity: outliers {r['mean_similarity_outliers']:.3f} "
                       f"({r['outliers']} patches), normal {r['mean_similarity_normal']:.3f}")
        if "qkv" in part:
            r = part["qkv"]
            for block, means in r["blocks"].items():
                click.echo(f"block {block}: mean norm at {r['outliers']} outlier / other patches: " + ", ".join(
                    f"{k} {v['outliers']:.2f} / {v['normal']:.2f}" for k, v in means.items()))
    click.echo(f"written to {done.out}")
