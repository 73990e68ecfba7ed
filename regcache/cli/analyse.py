"""Analyses of cached sets and of a model's tokens: norms, feature maps, token probes, attention."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .common import cache_option, main, split_names


def _feature_sets(names: tuple[str, ...], cache: Path | None):
    """Feature sets by path, or by the CACHE-relative name `regcache ls` prints."""
    from ..extract import default_cache_root
    from ..store import open_set

    return [open_set(n, cache or default_cache_root()) for n in names]


@main.command()
@click.argument("featuresets", nargs=-1, required=True)
@cache_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("norms"), show_default=True)
def norms(featuresets, cache, out):
    """Token norms from the cache: histograms by token type, outliers (>98th percentile of patch norms)
    and where they sit; several feature sets (e.g. vitl and vitl_reg) side by side.

    FEATURESETS are paths, or names relative to the cache root as `regcache ls` prints them.
    Writes norm_histograms.png, outlier_positions.png, summary.json and summary.parquet; for sets
    extracted with --layers, also the per-block view (patch-norm percentiles block by block: where do
    the high-norm tokens appear?) in block_norms.png and the summaries.
    """
    from ..analysis import norms_report

    try:
        summaries = norms_report(_feature_sets(featuresets, cache), out)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    for s in summaries:
        click.echo(f"{s.name}: {s.images} images, threshold {s.threshold:.2f}, "
                   f"{100 * s.images_with_outlier:.1f}% of images with an outlier, "
                   f"{s.outliers_per_image:.2f} outliers per image; median norms "
                   + ", ".join(f"{k} {v:.1f}" for k, v in s.median_norm.items()))
        for block, prof in s.blocks.items():
            click.echo(f"  block {block:>3}: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in prof.items()))
    click.echo(f"written to {out}")


@main.command()
@click.argument("featureset")
@click.option("--keys", required=True, help="Comma list of sample keys.")
@cache_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("featuremaps"),
              show_default=True)
@click.option("--no-images", is_flag=True, help="Do not look for the input images in the shards.")
def featuremap(featureset, keys, cache, out, no_images):
    """Patch-norm grids of chosen images (the study's feature maps), beside the inputs when the shards are at hand."""
    from ..analysis import feature_maps

    try:
        (fs,) = _feature_sets((featureset,), cache)
        paths = feature_maps(fs, split_names((keys,)), out, with_images=not no_images)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    for p in paths:
        click.echo(str(p))


@main.command()
@click.argument("featuresets", nargs=-1, required=True)
@cache_option
@click.option("--iterations", default=500, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--pixels", is_flag=True,
              help="Also: a ridge map from each patch token to its patch's pixels (read back from the shards), "
                   "held-out RMSE for outlier against normal tokens.")
@click.option("--ridge", default=1.0, show_default=True, help="Ridge penalty of --pixels.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the numbers as JSON.")
def tokenprobe(featuresets, cache, iterations, seed, pixels, ridge, out):
    """Linear probes that read a patch token's grid position (and, with --pixels, its patch's pixels) from
    the token, outliers against normal tokens (claim 4 of the reproducibility study).

    Needs feature sets extracted with --features tokens,norms (every patch token: small sets only).
    """
    from dataclasses import asdict

    from ..analysis import pixel_probe, token_probe

    rows = []
    try:
        for fs in _feature_sets(featuresets, cache):
            r = token_probe(fs, iterations=iterations, seed=seed)
            click.echo(f"{r.name}: position accuracy {100 * r.accuracy:.1f}% (chance {100 * r.chance:.1f}%), "
                       f"outlier tokens {100 * r.accuracy_outliers:.1f}% (n={r.outliers}), "
                       f"normal tokens {100 * r.accuracy_normal:.1f}%; {r.test_images} held-out images")
            rows.append(asdict(r))
            if pixels:
                px = pixel_probe(fs, ridge=ridge, seed=seed)
                click.echo(f"  pixels: held-out RMSE {px.rmse:.4f} (mean-patch baseline {px.rmse_mean_patch:.4f}), "
                           f"outlier tokens {px.rmse_outliers:.4f} (n={px.outliers}), normal {px.rmse_normal:.4f}")
                rows[-1]["pixels"] = asdict(px)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    if out is not None:
        out.write_text(json.dumps(rows, indent=2))


@main.command()
@click.option("--model", "-m", required=True, help="Alias or timm ViT name.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None)
@click.option("--images", "-i", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Image files (repeat the option).")
@click.option("--registers", is_flag=True, help="Also draw each register's attention.")
@click.option("--test-time-registers", "ttr", default=None, metavar="FILE[:K]",
              help="Add test-time registers from this neuron file (see 'regcache registers find') first.")
@click.option("--similarity", is_flag=True,
              help="Also: cosine similarity of each patch embedding to its neighbours, outliers vs the rest.")
@click.option("--qkv", type=int, default=0, metavar="N",
              help="Also: query, key and value norm maps of the last N blocks (the study's Fig. 6), and their "
                   "means at outlier patches (output norm above the 98th percentile) vs the rest, in qkv.json.")
@click.option("--size", default=224, show_default=True)
@click.option("--resize", default=256, show_default=True)
@click.option("--display", default=800, show_default=True, help="Pixels of each drawn map.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("attention"),
              show_default=True)
def attention(model, checkpoint, images, registers, ttr, similarity, qkv, size, resize, display, out):
    """Last-block attention of [CLS] (and registers) to the patches, averaged over heads, for a few images."""
    from ..analysis import attention_figure, qkv_report, similarity_report
    from ..models import ModelSpec, load_model, preprocess_for
    from ..tokens import layout_of

    try:
        spec = ModelSpec(model, checkpoint)
        net = load_model(spec, size)
        if ttr:
            from ..registers import attach

            attach(net, spec.timm_name, ttr)
        layout, pre = layout_of(net), preprocess_for(model, size=size, resize=resize)
        if registers and not layout.num_reg:
            raise click.ClickException(f"{model} has no register tokens")
        for p in attention_figure(net, layout, pre, [Path(i) for i in images], out, registers, display):
            click.echo(str(p))
        if similarity:
            r = similarity_report(net, layout, pre, [Path(i) for i in images], out)
            click.echo(f"neighbour similarity: outliers {r['mean_similarity_outliers']:.3f} "
                       f"({r['outliers']} patches), normal {r['mean_similarity_normal']:.3f}")
        if qkv:
            r = qkv_report(net, layout, pre, [Path(i) for i in images], out, qkv)
            for block, means in r["blocks"].items():
                click.echo(f"block {block}: mean norm at {r['outliers']} outlier / other patches: " + ", ".join(
                    f"{k} {v['outliers']:.2f} / {v['normal']:.2f}" for k, v in means.items()))
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
