"""The analyses as actions: each takes its settings (the CLI and pipelines build them the same way), finds its
sets or loads its backbone, and writes into its output directory."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..identity import registers_of, weights_of
from ..models import ModelError, load_model, preprocess_of
from ..registers import attach
from ..rundir import default_run, run_dir
from ..sets import Cache, Named
from ..settings import (AttentionSettings, CachedAnalysis, FeaturemapSettings, NormsSettings, TokenprobeSettings,
                        default_cache_root)
from ..store import FeatureSet
from ..tokens import layout_of
from .backbone import attention_figure, qkv_report, similarity_report
from .norm_stats import feature_maps, norms_report
from .token_probes import pixel_probe, token_probe


@dataclass
class Analysis:
    """What an analysis found (its summary, per set or image) and where it wrote its files."""

    out: Path
    found: list[Any] = field(default_factory=list)


def _sets(s: CachedAnalysis, features: tuple[str, ...], pins: Mapping[str, str | Path] | None) -> list[Named]:
    cache = Cache(s.cache)
    return [Named.of(FeatureSet(pins[ref]), ref) if pins and ref in pins else cache.find(ref, s.model, features)
            for ref in s.sets]


def norms(s: NormsSettings, pins: Mapping[str, str | Path] | None = None) -> Analysis:
    """`regcache norms`: token norms by type, outliers and where they sit, several sets side by side."""
    sets = _sets(s, ("norms",), pins)
    with run_dir(s.out, default_run("norms")) as out:
        return Analysis(out, norms_report([n.fs for n in sets], out))


def featuremap(s: FeaturemapSettings, pins: Mapping[str, str | Path] | None = None) -> Analysis:
    """`regcache featuremap`: the patch-norm grid of each chosen image, beside its crop."""
    sets = _sets(s, ("norms",), pins)
    with run_dir(s.out, default_run("featuremap")) as out:
        found = []
        for n in sets:
            found += feature_maps(n.fs, s.keys, out / n.name if len(sets) > 1 else out, with_images=s.images)
        return Analysis(out, found)


def tokenprobe(s: TokenprobeSettings, pins: Mapping[str, str | Path] | None = None) -> Analysis:
    """`regcache tokenprobe`: position (and pixel) probes of patch tokens, outliers against the rest."""
    sets = _sets(s, ("tokens", "norms"), pins)
    with run_dir(s.out, default_run("tokenprobe")) as out:
        found = []
        for n in sets:
            r = asdict(token_probe(n.fs, iterations=s.iterations, seed=s.seed))
            if s.pixels:
                r["pixels"] = asdict(pixel_probe(n.fs, ridge=s.ridge, seed=s.seed))
            found.append(r)
        (out / "tokenprobe.json").write_text(json.dumps(found, indent=2))
        return Analysis(out, found)


def attention(s: AttentionSettings) -> Analysis:
    """`regcache attention`: the last block's attention of [CLS] (and registers) to the patches, and with
    ``similarity``/``qkv`` the study's claims 3 and the query/key/value norms, on a few images."""
    pre = preprocess_of(s)
    net = load_model(s, pre.size)
    registers = registers_of(s)
    if registers:

        attach(net, registers, weights_of(s, pre.size, default_cache_root() / ".digests"))
    layout = layout_of(net)
    if s.registers and not layout.num_reg:
        raise ModelError(f"{s.model} has no register tokens (give --test-time-registers to add some)")
    images = [Path(i) for i in s.images]
    with run_dir(s.out, default_run("attention")) as out:
        found: list[Any] = [{"figures": [str(p) for p in attention_figure(net, layout, pre, images, out, s.registers,
                                                                          s.display)]}]
        if s.similarity:
            found.append({"similarity": similarity_report(net, layout, pre, images, out)})
        if s.qkv:
            found.append({"qkv": qkv_report(net, layout, pre, images, out, s.qkv)})
        return Analysis(out, found)
